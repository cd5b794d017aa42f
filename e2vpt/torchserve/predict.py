"""`e2vpt predict`: classify image files with a task of the running deployment, from the command line.

    e2vpt predict --task pets cat.jpg dog.png photos/        # a line per image: path, label, score
    e2vpt predict --task pets --top-k 3 --json photos/       # JSON lines: the server's answer per image
    e2vpt predict --task pets --labels-from-folders val/     # val/<class>/*: accuracy of the served task

Each image is one request to TorchServe's inference API (`send`): concurrent requests are batched by
TorchServe together with other clients' tasks. Folders are read recursively (hidden files skipped); the
server decides what is an image, and refuses what is not with that item's own status. The URL and key
come from the TorchServe that `e2vpt serve start` runs (its workdir) unless --url / --token say
otherwise. Results go to stdout in input order, errors and the summary to stderr. Exit codes: 0 every
image answered, 1 some image refused (each named with its status and error), 2 usage, 66 no input file,
69 TorchServe unreachable (no image answered). Imports no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from e2vpt.config import get_settings
from e2vpt.core.promptfile import read_file
from e2vpt.errors import E2VPTError, ImageTooLarge
from e2vpt.registry.cli import EXIT_NOINPUT, EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE
from e2vpt.serving import TASK_HEADER, TOP_K_HEADER
from e2vpt.torchserve.archive import running_keys, running_state

NO_ANSWER = 0  # an Answer's status when no HTTP answer came (connection refused, timeout)
NOT_SENT = -1  # ... when the file was not sent (unreadable, not a regular file, over the size limit)


@dataclass(frozen=True)
class Answer:
    """One request's outcome: HTTP status (NO_ANSWER: none came; NOT_SENT: the file was not sent), the JSON
    body (or text, or the reason there was no answer) and the seconds it took."""

    status: int
    body: Any
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == 200 and isinstance(self.body, dict)


async def send(
    url: str,
    items: Sequence[tuple[str, bytes | Path]],
    *,
    headers: dict[str, str] | None = None,
    concurrency: int = 16,
    timeout: float = 60.0,
    max_bytes: int | None = None,
    on_answer: Callable[[int, Answer], None] | None = None,
) -> list[Answer]:
    """POST each (task id, image bytes or file) to `url` with at most `concurrency` in flight; the answers in
    input order. `on_answer(index, answer)` is called as each arrives. A file is read only when its request
    is sent (a folder of images is never held in memory at once), and only if it is a regular file of at
    most `max_bytes` (default: TorchServe's request limit, `ts_max_request_size`); else it is NOT_SENT."""
    limit = get_settings().ts_max_request_size if max_bytes is None else max_bytes
    sem = asyncio.Semaphore(max(1, concurrency))
    answers: list[Answer | None] = [None] * len(items)
    async with httpx.AsyncClient(timeout=timeout, headers=headers or {}) as client:

        async def one(i: int, task_id: str, image: bytes | Path) -> None:
            async with sem:
                t0 = time.perf_counter()
                try:
                    data = image if isinstance(image, bytes) else read_file(image, limit, ImageTooLarge)
                except (OSError, E2VPTError) as exc:
                    answer = Answer(NOT_SENT, f"not sent: {getattr(exc, 'message', exc)}", 0.0)
                else:
                    answer = await _post(client, url, task_id, data, t0)
            answers[i] = answer
            if on_answer is not None:
                on_answer(i, answer)

        await asyncio.gather(*(one(i, t, image) for i, (t, image) in enumerate(items)))
    return [a for a in answers if a is not None]


async def _post(client: httpx.AsyncClient, url: str, task_id: str, data: bytes, t0: float) -> Answer:
    headers = {TASK_HEADER: task_id, "Content-Type": "application/octet-stream"}
    try:
        r = await client.post(url, content=data, headers=headers)
    except httpx.HTTPError as exc:  # no connection, a timeout
        return Answer(NO_ANSWER, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text
    return Answer(r.status_code, body, time.perf_counter() - t0)


def image_files(paths: Sequence[str]) -> list[Path]:
    """The files named, and every file under the folders named (recursively, sorted, hidden ones skipped).
    A path that does not exist raises FileNotFoundError."""
    out: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            out += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.exists():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return out


def _describe(answer: Answer) -> str:
    """Why an image got no predictions, in one line."""
    if answer.status in (NO_ANSWER, NOT_SENT):
        return f"{'no answer: ' if answer.status == NO_ANSWER else ''}{answer.body}"
    body = answer.body
    if isinstance(body, dict):
        return f"HTTP {answer.status} {body.get('error', body.get('code', ''))}: {body.get('detail', body.get('message', ''))}"
    return f"HTTP {answer.status}: {str(body).strip()[:300]}"


def _line(path: Path, answer: Answer, as_json: bool) -> str | None:
    """The stdout line of an answered image (None for a refused one: it goes to stderr)."""
    if as_json:
        return json.dumps({"path": str(path), "status": answer.status, "answer": answer.body}, sort_keys=True)
    if not answer.ok:
        return None
    preds = answer.body.get("predictions") or []
    return "\t".join([str(path), *(f"{p['label']} {p['score']:.4f}" for p in preds)])


def _cmd_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm  # only here: the parser stays light

    settings = get_settings()
    workdir = Path(args.workdir or settings.ts_workdir)
    url = (
        args.url
        or running_state(workdir).get("predictions_url")
        or (f"http://127.0.0.1:{settings.ts_inference_port}/predictions/{settings.ts_model_name}")
    )
    token = args.token or (running_keys(workdir).get("inference") or {}).get("key")
    try:
        files = image_files(args.paths)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOINPUT
    if not files:
        print(f"error: no files in {', '.join(args.paths)}", file=sys.stderr)
        return EXIT_NOINPUT
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if args.top_k is not None:
        headers[TOP_K_HEADER] = str(args.top_k)
    bar = tqdm(total=len(files), unit="img", disable=args.no_progress or None, file=sys.stderr)
    done: dict[int, Answer] = {}
    printed = 0

    def on_answer(i: int, answer: Answer) -> None:
        nonlocal printed
        bar.update(1)
        done[i] = answer
        while printed in done:  # stdout in input order, as soon as it can be
            line = _line(files[printed], done[printed], args.json)
            if line is not None:
                bar.write(line, file=sys.stdout)
            if not done[printed].ok:
                bar.write(f"{files[printed]}: {_describe(done[printed])}", file=sys.stderr)
            printed += 1

    t0 = time.perf_counter()
    items = [(args.task, f) for f in files]
    answers = asyncio.run(
        send(
            url,
            items,
            headers=headers,
            concurrency=args.concurrency,
            timeout=args.timeout,
            on_answer=on_answer,
        )
    )
    bar.close()
    wall = time.perf_counter() - t0
    failed = sum(not a.ok for a in answers)
    summary = f"{len(files)} image(s), {failed} refused, {len(files) / wall:.1f} images/s ({url})"
    if args.labels_from_folders:
        scored = [
            (f.parent.name, a.body["predictions"][0]["label"])
            for f, a in zip(files, answers, strict=True)
            if a.ok and a.body.get("predictions")
        ]
        right = sum(truth == label for truth, label in scored)
        if scored:
            summary += (
                f"; top-1 accuracy {100 * right / len(scored):.1f}% ({right}/{len(scored)}, folder = label)"
            )
    print(summary, file=sys.stderr)
    if all(a.status == NO_ANSWER for a in answers):
        return EXIT_UNAVAILABLE
    if any(a.status in (401, 403) or "Token Authorization" in str(a.body) for a in answers):
        print("hint: the inference key expired or is wrong: e2vpt serve token --refresh", file=sys.stderr)
    return EXIT_REFUSED if failed else EXIT_OK


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify image files with a served task (over HTTP, through the running TorchServe)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders of them (recursive)")
    p.add_argument("--task", "-t", required=True, help="the task id")
    p.add_argument("--top-k", "-k", type=_positive, help="labels per image (default: the server's, 5)")
    p.add_argument(
        "--json", action="store_true", help="a JSON line per image: path, status, the server's answer"
    )
    p.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="each image's folder name is its true label: report top-1 accuracy",
    )
    p.add_argument("--concurrency", "-c", type=_positive, default=16, help="requests in flight (default 16)")
    p.add_argument("--url", help="the predictions URL (default: the running TorchServe's, from --workdir)")
    p.add_argument("--token", help="the inference key (default: the running TorchServe's, from --workdir)")
    p.add_argument("--workdir", help="`serve start`'s workdir (default: E2VPT_TS_WORKDIR)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)
