"""Issue 13 in serving: one poison item among good items of several tasks fails alone, through the engine
and through the TorchServe adapter (with TorchServe's own Context); a hung Redis (SIGSTOP, not killed)
never makes a cached task wait, and cold loads fail fast with 503 during the hang.

Real Redis (shared one, namespaced; a private redis-server for the hang), real backbone."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import generate_latest
from ts.context import Context, RequestProcessor

from e2vpt.config import Settings
from e2vpt.core.backbone import Backbone
from e2vpt.core.model import PromptedViT, TaskBatch
from e2vpt.core.promptset import PromptSet
from e2vpt.dev.images import image_bytes
from e2vpt.errors import E2VPTError, StoreUnavailable
from e2vpt.registry.store import PromptStore
from e2vpt.serving.engine import MultiTaskEngine, RequestItem, Result
from e2vpt.serving.metrics import ServingMetrics
from e2vpt.torchserve.adapter import handle_batch
from tests.helpers import RedisServer, make_set, tiny_backbone, wait_for
from tests.poison import deep_json
from tests.serving_helpers import offline_predict

pytestmark = pytest.mark.integration  # real Redis


def good_sets(bb: Backbone) -> dict[str, PromptSet]:
    sets = [
        make_set("a", bb, 3, 1),
        make_set("b", bb, 7, 2, num_prompts=4, num_kv=0),
        make_set("c", bb, 2, 3, share_kv=False),
    ]
    return {ps.task_id: ps for ps in sets}


def test_the_table_refuses_a_set_that_does_not_fit_the_backbone(backbone: Backbone) -> None:
    """A set past validation (a store bug, or a set valid yesterday that a newer model rejects) cannot enter
    the prompt table with shapes that differ from the backbone's: it fails its own load, never a batch."""
    from e2vpt.serving.table import PromptTable

    table = PromptTable(backbone.info)
    L = backbone.info.depth
    head = make_set("badhead", backbone, 3, 4)
    with pytest.raises(RuntimeError):
        table.insert(replace(head, head_weight=torch.zeros(3, backbone.info.embed_dim + 1)))
    badkv = replace(make_set("badkv", backbone, 3, 5, num_kv=0), kv=torch.zeros(L, 1, 7, 0, 13))
    slot = table.insert(badkv)  # T = 0: nothing of its KV shape is stored, so it cannot break a batch
    assert slot.num_kv == 0 and table.live_slots == 1  # the refused insert left no rows behind


class FaultyEngine(MultiTaskEngine):
    """An engine whose forward fails whenever one task is in the batch: a device fault tied to that task's
    rows (e.g. out of memory for its head). Everything else is the real engine."""

    bad_task = "badhead"

    def _forward(self, good, entries):  # type: ignore[no-untyped-def]
        if any(e.task_id == self.bad_task for e in entries):
            raise RuntimeError("device fault")
        return super()._forward(good, entries)


def assert_matches_offline(bb: Backbone, ps: PromptSet, image: bytes, res: object) -> None:
    assert isinstance(res, Result), f"good item for {ps.task_id} failed: {res!r}"
    expected = offline_predict(bb, ps, image, 3)
    assert [p.label for p in res.predictions] == [label for label, _ in expected]
    assert [p.score for p in res.predictions] == pytest.approx([s for _, s in expected], abs=1e-5)


@pytest.mark.parametrize("micro_batch", [0, 4])  # one forward / three micro-batches (badhead in two)
def test_poison_prompts_fail_only_their_task(
    backbone: Backbone, store: PromptStore, micro_batch: int
) -> None:
    sets = good_sets(backbone)
    for ps in sets.values():
        store.register(ps)
    metrics = ServingMetrics()
    settings = Settings(cache_version_check_ms=-1, top_k=3, engine_micro_batch=micro_batch)
    engine = FaultyEngine(backbone, store, settings, metrics=metrics)
    try:
        store.register(make_set("badhead", backbone, 3, 4))
        store.register(make_set("badkv", backbone, 3, 5, num_kv=0))
        tasks = ["badhead", "a", "b", "badkv", "c", "a", "badhead", "b", "c"]
        images = [image_bytes(20 + i) for i in range(len(tasks))]
        out = engine.predict([RequestItem(t, im) for t, im in zip(tasks, images, strict=True)])
        for t, im, res in zip(tasks, images, out, strict=True):
            if t in sets:
                assert_matches_offline(backbone, sets[t], im, res)
            elif t == "badhead":
                assert isinstance(res, E2VPTError) and res.http_status == 500 and "badhead" in res.message
            else:  # badkv (T = 0) batched with the failing task: answered after the retry
                assert isinstance(res, Result), res
    finally:
        engine.close()
    text = generate_latest(metrics.registry).decode()
    assert 'e2vpt_item_failures_total{stage="forward",task="badhead"} 2.0' in text
    assert 'e2vpt_requests_total{status="500",task="badhead"} 2.0' in text
    assert 'status="503"' not in text


class _Exploding:
    """A field whose reading raises something no parser expects (a bug, not a bad input)."""

    def __str__(self) -> str:
        raise ZeroDivisionError("boom")


def test_poison_requests_fail_alone_through_the_adapter(backbone: Backbone, store: PromptStore) -> None:
    """TorchServe forwards a JSON body its own json.loads could not parse (RecursionError) as raw bytes:
    the adapter must answer that item 400, not fail the batch (TorchServe's 503)."""
    sets = good_sets(backbone)
    for ps in sets.values():
        store.register(ps)
    engine = MultiTaskEngine(backbone, store, Settings(cache_version_check_ms=-1, top_k=3))
    img = {t: image_bytes(40 + i) for i, t in enumerate(sets)}
    js = {"Content-Type": "application/json"}
    requests: list[tuple[Any, dict[str, str], int]] = [
        ({"body": bytearray(img["a"])}, {"X-Task-Id": "a"}, 200),
        ({"body": bytearray(deep_json())}, js, 400),  # 100,000 levels
        ({"body": bytearray(b'{"task_id": "b", "image": "' + deep_json(900) + b'"}')}, js, 400),
        ({"body": {"task_id": "b", "image": json.loads(deep_json(900))}}, js, 400),  # TorchServe decoded it
        ({"body": bytearray(b'{"task_id": "c", "image": "x", "top_k": NaN}')}, js, 400),
        ({"body": bytearray(b'[{"task_id": "c"}]')}, js, 400),
        ({"body": bytearray(b"\x89PNG\r\n\x1a\n garbage")}, {"X-Task-Id": "b"}, 400),
        ({"body": bytearray(img["b"])}, {"X-Task-Id": "b/../a"}, 400),
        ({"task_id": _Exploding(), "image": bytearray(img["c"])}, {}, 400),
        ({"body": bytearray(img["b"])}, {"X-Task-Id": "b"}, 200),
        (
            {"body": bytearray(json.dumps({"task_id": "c", "image": _b64(img["c"])}).encode())},
            js,
            200,
        ),
        ({"body": bytearray(img["a"])}, {"X-Task-Id": "a"}, 200),
    ]
    ctx = Context("e2vpt", "/tmp", {}, len(requests), None, "0.12.0")
    ctx.request_processor = [RequestProcessor(h) for _, h, _ in requests]
    try:
        out = [json.loads(body) for body in handle_batch(engine, [r for r, _, _ in requests], ctx)]
    finally:
        engine.close()
    statuses = [ctx.get_response_status(i)[0] for i in range(len(requests))]
    assert statuses == [code for _, _, code in requests]
    for (_, headers, code), res in zip(requests, out, strict=True):
        if code == 200:  # each good answer is exactly the task's offline prediction
            task = headers.get("X-Task-Id", "c")
            expected = offline_predict(backbone, sets[task], img[task], 3)
            assert res["task_id"] == task
            assert [p["label"] for p in res["predictions"]] == [label for label, _ in expected]
    assert out[1]["error"] == "bad_request" and "nested" in out[1]["detail"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------- a hung Redis
@pytest.mark.parametrize("version_check_ms", [100, 600_000])  # checks during the hang / practically none
def test_hung_redis_never_stalls_cached_tasks(
    backbone: Backbone, tmp_path: Path, version_check_ms: int
) -> None:
    """SIGSTOP the redis-server (connections hang instead of failing). While it hangs: the request path of
    cached tasks makes no Redis call at all (recorded per thread on the real client), a cold load gets 503
    and, once the store is known down, further cold loads answer 503 without touching Redis. SIGCONT: cold
    loads succeed again, with no restart."""
    server = RedisServer(tmp_path / "redis").start()
    assert server.proc is not None
    store = PromptStore(server.url, backbone.info, namespace="hang", socket_timeout=1.0)
    calls: list[int] = []
    execute = store.client.execute_command

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append(threading.get_ident())
        return execute(*args, **kwargs)

    stopped = False
    try:
        for t in ("cached", "cold", "cold2"):
            store.register(make_set(t, backbone, seed=len(t)))
        engine = MultiTaskEngine(
            backbone, store, Settings(cache_version_check_ms=version_check_ms, cache_store_backoff_ms=200)
        )
        store.client.execute_command = recording  # type: ignore[method-assign]
        me = threading.get_ident()
        img = image_bytes(3)
        assert isinstance(engine.predict([RequestItem("cached", img)])[0], Result)  # cold load: a call
        assert me in calls
        os.kill(server.proc.pid, signal.SIGSTOP)
        stopped = True
        calls.clear()
        for _ in range(20):  # the watcher's version checks hang meanwhile; requests never wait for them
            assert isinstance(engine.predict([RequestItem("cached", img)] * 3)[0], Result)
        assert me not in calls
        (res,) = engine.predict([RequestItem("cold", img)])  # the first cold load waits the timeout once
        assert isinstance(res, StoreUnavailable) and res.http_status == 503
        assert wait_for(lambda: engine.cache._store_down.is_set(), 10)
        calls.clear()
        out = engine.predict(
            [RequestItem("cold2", img), RequestItem("cached", img), RequestItem("cold", img)]
        )
        assert [type(r) for r in out] == [StoreUnavailable, Result, StoreUnavailable]
        assert me not in calls  # known down: answered without waiting on Redis
        os.kill(server.proc.pid, signal.SIGCONT)
        stopped = False
        assert wait_for(lambda: isinstance(engine.predict([RequestItem("cold2", img)])[0], Result), 20)
        engine.close()
    finally:
        if stopped:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prompts_follow_the_backbone_dtype(device: str, dtype: torch.dtype) -> None:
    """A half-precision backbone fed a TaskBatch built without `dtype=` (float32 prompts, the first set's
    dtype): the KV prompts are cast like the visual ones, so the logits are those of a batch built in the
    backbone's dtype (heads in their own dtype) (was, on CUDA: "Expected query, key, and value to have the same dtype")."""
    half = tiny_backbone(dtype=dtype, device=device)
    sets = [make_set("a", half, 3, 1), make_set("b", half, 4, 2, num_kv=3, share_kv=False)]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    index = torch.tensor([0, 1], device=device)
    model = PromptedViT(half)
    with torch.inference_mode():
        loose = model.forward_multi(images, TaskBatch.from_prompt_sets(sets, device=device), index)
        exact = model.forward_multi(
            images, TaskBatch.from_prompt_sets(sets, device=device, dtype=dtype), index
        )
    # the same features (prompts cast to the backbone's dtype); heads applied in the batch's own dtype
    assert torch.allclose(loose.float(), exact.float(), atol=2e-2)
    assert torch.equal(loose.float().argmax(1), exact.float().argmax(1))


@pytest.mark.parametrize("device", DEVICES)
def test_a_task_whose_scores_overflow_fails_alone(device: str, store: PromptStore) -> None:
    """A set inside the registry's limits (every value within float16's range) whose head still overflows a
    float16 engine on some images (+-65504 per feature: logits past float16's largest): those items get
    their own 500, never NaN scores (not JSON); the other task's items in the same batch are answered
    exactly as in a batch without it."""
    half = tiny_backbone(dtype=torch.float16, device=device)
    good = make_set("fine", half, 3, 1)
    sign = torch.ones(half.info.embed_dim).index_fill_(0, torch.arange(0, half.info.embed_dim, 2), -1)
    overflow = make_set("overflow", half, 3, 2)
    overflow = replace(overflow, head_weight=(65504.0 * sign).expand(3, -1).clone())
    for ps in (good, overflow):
        store.register(ps)
    metrics = ServingMetrics()
    engine = MultiTaskEngine(half, store, Settings(cache_version_check_ms=-1, top_k=3), metrics=metrics)
    try:
        tasks = ["fine", "overflow", "fine", "overflow", "overflow", "fine"]
        images = [image_bytes(40 + i) for i in range(len(tasks))]
        out = engine.predict([RequestItem(t, im) for t, im in zip(tasks, images, strict=True)])
        alone = engine.predict(
            [RequestItem("fine", im) for t, im in zip(tasks, images, strict=True) if t == "fine"]
        )
    finally:
        engine.close()
    fine = [r for t, r in zip(tasks, out, strict=True) if t == "fine"]
    assert [r.to_dict() for r in fine] == [r.to_dict() for r in alone]  # type: ignore[union-attr]
    for t, res in zip(tasks, out, strict=True):
        if t == "overflow":
            assert isinstance(res, E2VPTError) and res.http_status == 500, res
            assert "non-finite" in res.message and "float16" in res.message
    text = generate_latest(metrics.registry).decode()
    assert 'e2vpt_item_failures_total{stage="forward",task="overflow"} 3.0' in text
    assert 'e2vpt_requests_total{status="500",task="overflow"} 3.0' in text
