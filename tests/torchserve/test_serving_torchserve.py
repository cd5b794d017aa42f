"""End to end: real TorchServe (2 workers) + a private real Redis + the tiny backbone from a checkpoint.

TorchServe starts once for the module (about a minute on a busy 2-core machine); tests run in file order
and build on each other's state where noted."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from e2vpt.cli import main as cli_main
from e2vpt.config import Settings, get_settings
from e2vpt.core.backbone import Backbone
from e2vpt.core.promptset import PromptSet
from e2vpt.dev.images import image_bytes, png_header_bomb
from e2vpt.registry.store import PromptStore
from e2vpt.torchserve.adapter import WORKER_HEADER
from e2vpt.torchserve.archive import TorchServe, build_mar
from tests.helpers import RedisServer, free_port, tiny_checkpoint
from tests.poison import deep_json
from tests.serving_helpers import burst, offline_predict

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not shutil.which("java") or not shutil.which("redis-server"), reason="needs java + redis"
    ),
]

WORKERS = 2
MAX_PIXELS = 250_000
MAX_RESPONSE = 2_000_000  # TorchServe's max_request_size and max_response_size, bytes


@dataclass
class Served:
    ts: TorchServe
    store: PromptStore
    redis: RedisServer
    backbone: Backbone


def make_set(task_id: str, bb: Backbone, classes: int, seed: int, **kw: object) -> PromptSet:
    g = torch.Generator().manual_seed(seed)
    return PromptSet.create(
        task_id, bb.info, [f"{task_id}-{seed}-c{i}" for i in range(classes)], generator=g, **kw
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    redis = RedisServer(root / "redis").start()
    ckpt, backbone = tiny_checkpoint(root / "backbone.safetensors")
    namespace = f"ts-{uuid.uuid4().hex[:8]}"
    store = PromptStore(redis.url, backbone.info, namespace=namespace)
    for ps in (make_set("t1", backbone, 3, 1), make_set("t2", backbone, 6, 2, num_prompts=4, num_kv=2),
               make_set("t3", backbone, 2, 3, share_kv=False)):  # fmt: skip
        store.register(ps)
    mar = build_mar(root / "mar", checkpoint=ckpt, engine_config={"top_k": 3})
    env = {
        "E2VPT_REDIS_URL": redis.url,
        "E2VPT_STORE_NAMESPACE": namespace,
        "E2VPT_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
        "E2VPT_STORE_SOCKET_TIMEOUT": "1",
        # updates must arrive by pub/sub alone: the version check fallback is effectively off here
        "E2VPT_CACHE_VERSION_CHECK_MS": "600000",
        "E2VPT_MAX_TOP_K": "10000",  # an answer can outgrow MAX_RESPONSE (test_an_answer_over_...)
    }
    settings = Settings(ts_max_request_size=MAX_RESPONSE)
    ts = TorchServe(
        mar, root / "ts", settings=settings, workers=WORKERS, batch_size=8, max_batch_delay_ms=40, env=env
    ).start()
    try:
        yield Served(ts, store, redis, backbone)
    finally:
        killed = ts.stop()
        store.close()
        redis.stop()
    assert not killed, "TorchServe did not exit on SIGTERM (or stop() missed its exit)"


def test_requests_without_token_are_refused(served: Served) -> None:
    img = image_bytes(1)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(served.ts.predictions_url, content=img, headers={**headers, "X-Task-Id": "t1"})
        assert r.status_code in (400, 401) and "Token Authorization failed" in r.text
    assert httpx.get(f"{served.ts.inference_url}/ping").status_code in (400, 401)
    assert httpx.get(f"{served.ts.inference_url}/ping", headers=served.ts.auth()).status_code == 200


def test_a_form_encoded_body_is_told_which_content_type_to_send(served: Served) -> None:
    """curl --data-binary without -H sends a form; TorchServe decodes it before the handler (issue 14).
    A body the form decoder accepts reaches the handler, which names the header to send."""
    headers = {**served.ts.auth(), "X-Task-Id": "t1", "Content-Type": "application/x-www-form-urlencoded"}
    r = httpx.post(served.ts.predictions_url, content=b"not-an-image", headers=headers, timeout=60)
    assert r.status_code == 400 and "Content-Type: application/octet-stream" in r.json()["detail"], r.text
    # binary bytes fail in TorchServe's own form decoder (what the README says to expect)
    r = httpx.post(served.ts.predictions_url, content=image_bytes(3), headers=headers, timeout=60)
    assert r.status_code in (400, 500) and ("ErrorDataDecoderException" in r.text or "octet-stream" in r.text)


def test_concurrent_mixed_requests_match_offline_model(served: Served) -> None:
    kinds = ["raw", "json", "multipart"]
    reqs = [(kinds[i % 3], f"t{1 + i % 3}", image_bytes(100 + i, (40 + i, 32 + i % 5))) for i in range(24)]
    sets = {t: served.store.get(t)[0] for t in ("t1", "t2", "t3")}
    for (_, task, img), r in zip(reqs, burst(served.ts, reqs), strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        expected = offline_predict(served.backbone, sets[task], img, top_k=3)
        assert body["task_id"] == task and body["version"] == 1
        assert [p["label"] for p in body["predictions"]] == [label for label, _ in expected]
        assert [p["score"] for p in body["predictions"]] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_the_predict_command_classifies_a_folder(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`e2vpt predict` against the real TorchServe: a line per image in input order with the offline model's
    labels and scores, a file that is no image refused on stderr with its status (exit 1), hidden files
    skipped, top-1 accuracy from folder names; a FIFO or a file over the request limit is not sent (that
    file's error); nobody listening: 69; a missing path: 66."""
    ps = served.store.get("t1")[0]
    folder = tmp_path / "val"
    images = [image_bytes(300 + i, (40 + i, 36)) for i in range(6)]
    expected = [offline_predict(served.backbone, ps, img, top_k=2) for img in images]
    paths = []
    for i, (img, exp) in enumerate(zip(images, expected, strict=True)):
        truth = exp[0][0] if i < 4 else "some-other-label"  # 4 of 6 in the folder of their top-1 label
        paths.append(folder / truth / f"img{i}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        paths[-1].write_bytes(img)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / ".hidden").write_bytes(images[0])
    key = served.ts.keys()["inference"]
    common = ["--task", "t1", "--url", served.ts.predictions_url, "--token", key, "--no-progress", "-k", "2"]
    assert cli_main(["predict", *common, "--labels-from-folders", str(folder)]) == 1
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.splitlines()]
    order = sorted(paths)  # a folder is read recursively, sorted (broken.jpg has no stdout line)
    assert [Path(line[0]) for line in lines] == order
    for line, path in zip(lines, order, strict=True):
        exp = expected[int(path.stem[3:])]
        got = [cell.rsplit(" ", 1) for cell in line[1:]]
        assert [label for label, _ in got] == [label for label, _ in exp]
        assert all(abs(float(score) - s) < 1e-3 for (_, score), (_, s) in zip(got, exp, strict=True))
    assert f"{folder / 'broken.jpg'}: HTTP 400 invalid_image" in err
    assert "7 image(s), 1 refused" in err and "top-1 accuracy 66.7% (4/6" in err
    assert cli_main(["predict", *common, "--json", str(paths[0])]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["status"] == 200 and answer["answer"]["task_id"] == "t1"
    assert [p["label"] for p in answer["answer"]["predictions"]] == [label for label, _ in expected[0]]
    # not sent: a FIFO (whose open would block) and a file over TorchServe's request limit
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "huge.png").write_bytes(b"\0" * (MAX_RESPONSE + 1))
    odd = [str(tmp_path / "fifo.png"), str(tmp_path / "huge.png"), str(paths[0])]
    monkeypatch.setattr(get_settings(), "ts_max_request_size", MAX_RESPONSE)
    assert cli_main(["predict", *common, *odd]) == 1
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and out.startswith(str(paths[0]))
    assert "fifo.png: not sent: " in err and "is not a regular file" in err
    assert "huge.png: not sent: " in err and f"the limit is {MAX_RESPONSE}" in err
    dead = ["--task", "t1", "--url", f"http://127.0.0.1:{free_port()}/predictions/e2vpt", "--no-progress"]
    assert cli_main(["predict", *dead, str(paths[0])]) == 69
    assert cli_main(["predict", *common, str(folder / "missing.png")]) == 66
    capsys.readouterr()


def test_each_bad_item_gets_its_status_while_the_rest_succeed(served: Served) -> None:
    good = image_bytes(7)
    reqs = [
        ("raw", "t1", good),
        ("raw", "no-such-task", good),  # 404
        ("raw", "bad id!", good),  # 400 invalid task id
        ("raw", None, good),  # 400 missing task id
        ("raw", "t2", b"\x89PNG this is not really a png"),  # 400 corrupt image
        ("raw", "t2", image_bytes(8, (600, 500))),  # 413 over the pixel limit
        ("raw", "t3", png_header_bomb()),  # 413 decompression bomb
        ("raw", "t3", b""),  # 400 empty body
        ("json", "t2", good),
        ("multipart", "t3", good),
    ]
    statuses = [r.status_code for r in burst(served.ts, reqs)]
    assert statuses == [200, 404, 400, 400, 400, 413, 413, 400, 200, 200]


def test_poison_items_fail_alone_in_shared_batches(served: Served) -> None:
    """Issue 13 through a real TorchServe: each hostile request gets its own 4xx (never a 5xx), while the
    good requests of several tasks sharing its batches all answer exactly the offline prediction."""
    info = served.backbone.info
    poisoned = make_set("t6", served.backbone, 3, 6)
    served.store.register(poisoned)  # then its stored blob is replaced: a tampered or stale store
    blob = replace(poisoned, kv=torch.zeros(info.depth, 1, 7, 0, 13)).to_bytes()
    served.store.client.hset(f"{served.store.prefix}:task:t6:blob", 1, blob)
    js = {"Content-Type": "application/json"}
    good = {t: image_bytes(60 + i) for i, t in enumerate(("t1", "t2", "t3"))}
    b64 = base64.b64encode(good["t1"]).decode()
    poison: list[tuple[bytes, dict[str, str], int]] = [
        (deep_json(), js, 400),  # RecursionError in TorchServe's json.loads: forwarded raw, refused here
        (b'{"task_id": "t1", "image": ' + deep_json(900) + b"}", js, 400),  # decoded by TorchServe
        (b'{"task_id": "t2", "image": "' + b64.encode() + b'", "top_k": NaN}', js, 400),
        (b'{"task_id": "t3", "image": "' + b64.encode() + b'", "top_k": 1e999}', js, 400),
        (b"[" + b'{"task_id": "t1"}' + b"]", js, 400),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR garbage", {"X-Task-Id": "t2"}, 400),
        (good["t3"], {"X-Task-Id": "t6"}, 422),  # its prompts are refused at load: its items only
        (good["t3"], {"X-Task-Id": "../t1"}, 400),
    ]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=served.ts.auth(), timeout=60) as client:
            calls = []
            for round_ in range(3):
                for t, img in good.items():
                    calls.append(
                        client.post(served.ts.predictions_url, content=img, headers={"X-Task-Id": t})
                    )
                for body, headers, _ in poison[round_::3]:
                    calls.append(client.post(served.ts.predictions_url, content=body, headers=headers))
            return await asyncio.gather(*calls)

    rs = asyncio.run(run())
    sets = {t: served.store.get(t)[0] for t in good}
    expected_poison = iter(code for round_ in range(3) for _, _, code in poison[round_::3])
    i = 0
    for round_ in range(3):
        for t, img in good.items():
            r = rs[i]
            i += 1
            assert r.status_code == 200, r.text
            expected = offline_predict(served.backbone, sets[t], img, top_k=3)
            assert [p["label"] for p in r.json()["predictions"]] == [label for label, _ in expected]
        for _ in poison[round_::3]:
            r = rs[i]
            i += 1
            assert r.status_code == next(expected_poison), r.text
            assert "error" in r.json()


def test_an_answer_over_the_response_limit_fails_alone(served: Served) -> None:
    """An answer over TorchServe's max_response_size (here 2 MB: 8,000 labels of 250 characters, all asked
    for) made TorchServe's front end drop the worker with every request of its batch ("Worker died", and
    again after each restart). It is now that item's own 500; the requests batched with it are answered,
    and the worker stays up."""
    labels = [f"{i:05d}-" + "x" * 244 for i in range(8000)]
    served.store.register(PromptSet.create("wide", served.backbone.info, labels))
    img = image_bytes(70)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=served.ts.auth(), timeout=60) as client:

            def post(task: str, top_k: int = 3) -> Any:
                headers = {"X-Task-Id": task, "X-Top-K": str(top_k)}
                return client.post(served.ts.predictions_url, content=img, headers=headers)

            calls = [
                post("t1"),
                post("t2"),
                post("t3"),
                post("wide", 8000),
                post("t1"),
                post("t2"),
                post("t3"),
            ]
            return await asyncio.gather(*calls)

    rs = asyncio.run(run())
    wide = rs[3]
    assert wide.status_code == 500 and "over the server's limit of 2000000" in wide.json()["detail"], (
        wide.text
    )
    assert wide.headers["content-type"] == "application/json"
    assert [r.status_code for i, r in enumerate(rs) if i != 3] == [200] * 6, [r.text[:100] for r in rs]
    again = asyncio.run(run())  # no worker restarted: answered as before
    assert [r.status_code for r in again] == [200, 200, 200, 500, 200, 200, 200]
    r = httpx.post(
        served.ts.predictions_url,
        content=img,
        headers={**served.ts.auth(), "X-Task-Id": "wide", "X-Top-K": "5"},
    )
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5


def test_task_registered_while_serving_is_served_at_once(served: Served) -> None:
    ps = make_set("t4", served.backbone, 5, 4)
    version = served.store.register(ps)
    (r,) = burst(served.ts, [("raw", "t4", image_bytes(9))])
    assert r.status_code == 200 and r.json()["version"] == version
    assert [p["label"] for p in r.json()["predictions"]] == [lb for lb, _ in offline_predict(
        served.backbone, ps, image_bytes(9), 3)]  # fmt: skip


def _both_workers_answered(served: Served, task: str) -> set[str]:
    seen: set[str] = set()
    for _ in range(20):
        rs = burst(served.ts, [("raw", task, image_bytes(i)) for i in range(16)])
        assert all(r.status_code == 200 for r in rs)
        seen |= {r.headers[WORKER_HEADER] for r in rs}
        if len(seen) == WORKERS:
            break
    assert len(seen) == WORKERS, "could not reach every worker"
    return seen


def test_update_reaches_every_worker_within_a_second(served: Served) -> None:
    _both_workers_answered(served, "t1")  # every worker has t1 v1 cached
    new = make_set("t1", served.backbone, 4, 11)
    version = served.store.register(new)
    time.sleep(1.0)  # the promise: one second after registration, every worker serves the new version
    seen: set[str] = set()
    for _ in range(20):
        rs = burst(served.ts, [("raw", "t1", image_bytes(i)) for i in range(16)])
        assert [r.json()["version"] for r in rs] == [version] * 16
        assert all(r.json()["predictions"][0]["label"].startswith("t1-11-") for r in rs)
        seen |= {r.headers[WORKER_HEADER] for r in rs}
        if len(seen) == WORKERS:
            break
    assert len(seen) == WORKERS


def test_deleted_task_returns_404(served: Served) -> None:
    _both_workers_answered(served, "t4")
    served.store.delete("t4")
    time.sleep(1.0)
    rs = burst(served.ts, [("raw", "t4", image_bytes(i)) for i in range(16)])
    assert [r.status_code for r in rs] == [404] * 16
    assert rs[0].json()["error"] == "task_not_found"


def _scrape(served: Served) -> str:
    return httpx.get(served.ts.worker_metrics_url, timeout=10).text


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if got == labels:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_expose_per_task_histogram_with_right_counts(served: Served) -> None:
    before = _scrape(served)
    burst(
        served.ts, [("raw", "t2", image_bytes(i)) for i in range(7)] + [("raw", "nope", image_bytes(1))] * 2
    )
    after = _scrape(served)
    count = "e2vpt_request_latency_seconds_count"
    assert _sample(after, count, task="t2") - _sample(before, count, task="t2") == 7
    ok = "e2vpt_requests_total"
    assert _sample(after, ok, status="200", task="t2") - _sample(before, ok, status="200", task="t2") == 7
    assert (
        _sample(after, ok, status="404", task="unknown") - _sample(before, ok, status="404", task="unknown")
        == 2
    )
    assert 'e2vpt_request_latency_seconds_bucket{le="0.0005",task="t2"}' in after
    assert _sample(after, "e2vpt_cache_resident_tasks") >= 2  # summed over the workers
    # TorchServe's own queue time is on its metrics port (no token needed there)
    assert "ts_queue_latency_microseconds" in httpx.get(served.ts.metrics_url, timeout=10).text


def test_redis_outage_cached_tasks_answer_others_503_and_recover(served: Served) -> None:
    served.store.register(make_set("t5", served.backbone, 3, 5))  # registered, never requested: uncached
    _both_workers_answered(served, "t2")
    served.redis.stop()
    try:
        rs = burst(
            served.ts, [("raw", "t2", image_bytes(i)) for i in range(8)] + [("raw", "t5", image_bytes(1))] * 4
        )
        assert [r.status_code for r in rs] == [200] * 8 + [503] * 4
        assert rs[-1].json()["error"] == "store_unavailable"
    finally:
        served.redis.start()
    deadline = time.monotonic() + 30
    statuses: list[int] = []
    while time.monotonic() < deadline:
        rs = burst(
            served.ts, [("raw", "t5", image_bytes(i)) for i in range(8)] + [("raw", "t2", image_bytes(1))] * 2
        )
        statuses = [r.status_code for r in rs]
        if statuses == [200] * 10:
            break
        time.sleep(0.5)
    assert statuses == [200] * 10


def test_helper_isolation(served: Served, tmp_path: Path) -> None:
    """The instance keeps its own TMPDIR, key file and logs under its working directory."""
    wd = served.ts.workdir
    assert (wd / "key_file.json").is_file() and (wd / "tmp").is_dir() and (wd / "logs").is_dir()
    assert served.ts.ready_workers() == WORKERS


def test_serve_token_prints_and_refreshes_the_inference_key(served: Served) -> None:
    """`serve token` reads the running instance's key file; `--refresh` gets a new key from TorchServe
    (the old one stops working). Last in the file: the key changes."""
    import os
    import subprocess
    import sys

    from tests.cli_helpers import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "e2vpt.cli", "serve", "token", "--workdir", str(served.ts.workdir)]
    old = served.ts.keys()["inference"]
    out = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == old and "expires at" in out.stderr
    out = subprocess.run([*base, "--refresh"], capture_output=True, text=True, env=env, timeout=120)
    new = out.stdout.strip()
    assert out.returncode == 0 and new and new != old, out.stderr
    img, task = image_bytes(1), {"X-Task-Id": "t1", "Content-Type": "application/octet-stream"}
    for key, ok in ((old, False), (new, True)):
        r = httpx.post(
            served.ts.predictions_url, content=img, headers={**task, "Authorization": f"Bearer {key}"}
        )
        assert (r.status_code == 200) is ok, r.text
    served.ts._keys = {}  # re-read from the key file by anything after this
