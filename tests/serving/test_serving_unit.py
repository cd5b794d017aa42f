"""Fast tests of the serving pieces without TorchServe: images, request parsing, cache, engine, metrics.

Real Redis (the shared one, namespaced; a private redis-server for the outage test), real backbone."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator

import pytest
from PIL import Image
from prometheus_client import generate_latest
from ts.context import Context, RequestProcessor

from e2vpt.config import Settings, settings_with_defaults
from e2vpt.core.backbone import Backbone
from e2vpt.core.images import decode_image, eval_transform
from e2vpt.dev.images import image_bytes, png_header_bomb
from e2vpt.errors import (
    BadRequest,
    ImageTooLarge,
    IncompatiblePromptSet,
    InvalidImage,
    InvalidTaskId,
    StoreUnavailable,
    TaskNotFound,
)
from e2vpt.registry.store import PromptStore
from e2vpt.serving.cache import PromptCache
from e2vpt.serving.engine import STAGES, MultiTaskEngine, RequestItem, Result, micro_batches
from e2vpt.serving.metrics import ServingMetrics, TaskLabeler
from e2vpt.serving.requests import parse_request
from e2vpt.torchserve.adapter import handle_batch
from tests.helpers import RedisServer, make_set, tiny_backbone, wait_for
from tests.serving_helpers import offline_predict


@pytest.fixture
def engine(backbone: Backbone, store: PromptStore) -> Iterator[MultiTaskEngine]:
    eng = MultiTaskEngine(backbone, store, Settings(cache_version_check_ms=0))
    yield eng
    eng.close()


# ---------------------------------------------------------------------- images
@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("PNG", "RGB"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P")],
)
def test_decode_formats_and_modes(fmt: str, mode: str) -> None:
    img = decode_image(image_bytes(1, (30, 20), fmt, mode))
    assert img.mode == "RGB" and img.size == (30, 20)


def test_alpha_is_composited_on_white() -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buf, "PNG")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 40)


def test_bad_images_get_typed_errors() -> None:
    with pytest.raises(InvalidImage):
        decode_image(b"")
    with pytest.raises(InvalidImage):
        decode_image(b"definitely not an image")
    with pytest.raises(InvalidImage):
        decode_image(image_bytes(2, fmt="PNG")[:60])  # truncated
    with pytest.raises(ImageTooLarge):
        decode_image(png_header_bomb())
    with pytest.raises(ImageTooLarge):
        decode_image(image_bytes(3, (600, 500)), max_pixels=250_000)
    with pytest.raises(ImageTooLarge):
        decode_image(image_bytes(3), max_bytes=10)


def test_eval_transform_shape(backbone: Backbone) -> None:
    x = eval_transform(backbone.info)(decode_image(image_bytes(4, (100, 60))))
    assert tuple(x.shape) == (3, *backbone.info.img_size)


# ---------------------------------------------------------------------- request parsing
def test_parse_raw_body_with_header_any_case() -> None:
    for name in ("X-Task-Id", "x-task-id", "X-TASK-ID"):
        item = parse_request({"body": bytearray(b"img")}, {name: "pets"})
        assert (item.task_id, item.image) == ("pets", b"img")


def test_parse_json_and_multipart() -> None:
    b64 = base64.b64encode(b"img").decode()
    item = parse_request(
        {"body": {"task_id": "a", "image": b64, "top_k": 2}}, {"Content-Type": "application/json"}
    )
    assert (item.task_id, item.image, item.top_k) == ("a", b"img", 2)
    # JSON with a charset arrives undecoded
    raw = json.dumps({"task_id": "a", "image": "data:image/png;base64," + b64}).encode()
    item = parse_request({"body": raw}, {"content-type": "application/json; charset=utf-8"})
    assert item.image == b"img"
    item = parse_request({"task_id": b"b", "file": bytearray(b"img2"), "top_k": "3"}, {})
    assert (item.task_id, item.image, item.top_k) == ("b", b"img2", 3)


@pytest.mark.parametrize(
    ("request_", "headers", "error"),
    [
        ({"body": b"img"}, {}, BadRequest),  # no task id
        ({"body": b""}, {"X-Task-Id": "a"}, InvalidImage),  # empty body
        ({}, {"X-Task-Id": "a"}, InvalidImage),  # no body at all
        ({"body": {"task_id": "a", "image": "%%%"}}, {}, InvalidImage),  # bad base64
        ({"body": {"task_id": 5, "image": "aW1n"}}, {}, BadRequest),
        ({"body": b"{nope"}, {"content-type": "application/json; charset=utf-8"}, BadRequest),
        ({"body": {"task_id": "a", "image": "aW1n"}}, {"X-Task-Id": "b"}, BadRequest),  # conflicting ids
        ({"body": {"task_id": "a", "image": "aW1n", "top_k": 0}}, {}, BadRequest),
    ],
)
def test_parse_errors(request_: dict, headers: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_request(request_, headers)


def test_top_k_is_bounded_and_errors_never_echo_unbounded_input(
    backbone: Backbone, store: PromptStore, engine: MultiTaskEngine
) -> None:
    """top_k up to `max_top_k` (1000) answers, above is 400; a 6-million-character task id or top_k (a
    24 MB request) comes back as an excerpt (under 2 KB of JSON), not as a 72 MB answer."""
    store.register(make_set("a", backbone, 3, 1))
    img = image_bytes(5)
    huge = "\U0001f600" * 6_000_000
    out = engine.predict([RequestItem("a", img, 1000), RequestItem("a", img, 1001), RequestItem(huge, img)])
    assert isinstance(out[0], Result) and len(out[0].predictions) == 3
    assert isinstance(out[1], BadRequest) and "the limit is 1000 (E2VPT_MAX_TOP_K)" in out[1].message
    assert isinstance(out[2], InvalidTaskId) and len(json.dumps(out[2].to_dict())) < 2000
    for request, headers in (
        ({"body": {"task_id": "a", "image": "aGk=", "top_k": huge}}, {}),
        ({"body": {"task_id": huge, "image": "aGk="}}, {"X-Task-Id": "a"}),
    ):
        with pytest.raises(BadRequest) as caught:
            parse_request(request, headers)
        assert len(json.dumps(caught.value.to_dict())) < 2000, caught.value.message[:100]


# ---------------------------------------------------------------------- engine
def test_mixed_batch_equals_offline_model(
    backbone: Backbone, store: PromptStore, engine: MultiTaskEngine
) -> None:
    sets = [
        make_set("a", backbone, 3, 1),
        make_set("b", backbone, 7, 2, num_prompts=4),
        make_set("c", backbone, 2, 3),
        make_set("d", backbone, 5, 4, config={"recipe": "fgvc"}),  # served with its own preprocessing
    ]
    for ps in sets:
        store.register(ps)
    by_id = {ps.task_id: ps for ps in sets}
    tasks = ["a", "b", "c", "b", "a", "d", "c", "a", "d"]
    images = [image_bytes(10 + i, (40 + i, 36)) for i in range(len(tasks))]
    results = engine.predict([RequestItem(t, im) for t, im in zip(tasks, images, strict=True)], top_k=3)
    for t, im, res in zip(tasks, images, results, strict=True):
        assert isinstance(res, Result) and res.task_id == t and res.version == 1
        expected = offline_predict(backbone, by_id[t], im, 3)
        assert [p.label for p in res.predictions] == [label for label, _ in expected]
        assert [p.score for p in res.predictions] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_bad_items_fail_alone(backbone: Backbone, store: PromptStore, engine: MultiTaskEngine) -> None:
    store.register(make_set("a", backbone))
    good = image_bytes(5)
    items = [
        RequestItem("a", good),
        RequestItem("missing", good),
        RequestItem("bad id!", good),
        RequestItem("a", b"garbage"),
        RequestItem("a", png_header_bomb()),
        RequestItem("a", b""),
        BadRequest("missing task id"),
        RequestItem("a", good, top_k=2),
    ]
    out = engine.predict(items)
    kinds = [type(r) for r in out]
    assert kinds == [
        Result,
        TaskNotFound,
        InvalidTaskId,
        InvalidImage,
        ImageTooLarge,
        InvalidImage,
        BadRequest,
        Result,
    ]
    assert len(out[7].predictions) == 2


def test_incompatible_set_is_422(backbone: Backbone, store: PromptStore) -> None:
    """A stored blob made for another backbone (a stale or tampered store) is refused at load: 422."""
    store.register(make_set("x", backbone))
    other = tiny_backbone(seed=1)  # same shapes, other weights: another fingerprint
    store.client.hset(f"{store.prefix}:task:x:blob", 1, make_set("x", other).to_bytes())
    eng = MultiTaskEngine(backbone, store, Settings())
    try:
        (res,) = eng.predict([RequestItem("x", image_bytes(1))])
        assert isinstance(res, IncompatiblePromptSet) and res.http_status == 422
    finally:
        eng.close()


def test_handle_batch_sets_per_item_status(
    backbone: Backbone, store: PromptStore, engine: MultiTaskEngine
) -> None:
    """With TorchServe's own Context class: failed items get their status, the others stay 200."""
    store.register(make_set("a", backbone))
    good = image_bytes(6)
    requests = [
        ({"body": bytearray(good)}, {"X-Task-Id": "a"}),
        ({"body": bytearray(good)}, {"x-task-id": "nope"}),
        ({"body": bytearray(good)}, {}),
        ({"body": bytearray(b"")}, {"X-Task-Id": "a"}),
        ({"task_id": "a", "image": bytearray(image_bytes(7, (600, 500)))}, {}),
    ]
    ctx = Context("e2vpt", "/tmp", {}, len(requests), None, "0.12.0")
    ctx.request_processor = [RequestProcessor(h) for _, h in requests]
    engine.settings = Settings(max_image_pixels=250_000)
    out = [json.loads(body) for body in handle_batch(engine, [r for r, _ in requests], ctx)]
    assert [ctx.get_response_status(i)[0] for i in range(len(requests))] == [200, 404, 400, 400, 413]
    assert out[0]["task_id"] == "a" and out[1]["error"] == "task_not_found"


# ---------------------------------------------------------------------- cache
def test_cache_lru_eviction_and_pinning(backbone: Backbone, store: PromptStore) -> None:
    for i in range(4):
        store.register(make_set(f"t{i}", backbone, seed=i))
    one = PromptCache(store).get("t0").nbytes
    cache = PromptCache(store, max_bytes=2 * one, pinned=["t0"])
    cache.start()
    try:
        cache.get("t0")
        cache.get("t1")
        cache.get("t2")  # evicts t1 (t0 is pinned)
        assert set(cache.resident()) == {"t0", "t2"} and cache.stats.evictions == 1
        cache.get("t3")  # evicts t2
        assert set(cache.resident()) == {"t0", "t3"} and cache.resident_bytes <= 2 * one
    finally:
        cache.close()


def test_concurrent_cold_loads_fetch_once(backbone: Backbone, store: PromptStore) -> None:
    store.register(make_set("a", backbone))
    calls = []

    class CountingStore(PromptStore):
        def get(self, task_id: str, version: int | None = None):  # type: ignore[override]
            calls.append(task_id)
            time.sleep(0.2)  # hold the fetch open so the other threads arrive during it
            return super().get(task_id, version)

    counting = CountingStore(store.redis_url, backbone.info, namespace=store.namespace)
    cache = PromptCache(counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("a").version)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [1] * 8 and calls == ["a"]


def test_events_update_and_delete(backbone: Backbone, store: PromptStore) -> None:
    store.register(make_set("a", backbone, seed=1))
    cache = PromptCache(store, version_check_ms=-1)  # events only
    cache.start()
    try:
        assert cache.get("a").version == 1
        store.register(make_set("a", backbone, seed=2))
        assert wait_for(lambda: cache.resident().get("a") == 2)
        store.delete("a")
        assert wait_for(lambda: "a" not in cache.resident())
        with pytest.raises(TaskNotFound):
            cache.get("a")
    finally:
        cache.close()


def test_version_check_catches_missed_events(backbone: Backbone, store: PromptStore) -> None:
    store.register(make_set("a", backbone, seed=1))
    cache = PromptCache(store, version_check_ms=0)  # never subscribed: every event is "missed"
    assert cache.get("a").version == 1
    store.register(make_set("a", backbone, seed=2))
    assert cache.get("a").version == 2
    store.delete("a")
    with pytest.raises(TaskNotFound):
        cache.get("a")


def test_redis_outage_serves_cached_and_recovers(backbone: Backbone, tmp_path) -> None:  # noqa: ANN001
    server = RedisServer(tmp_path / "redis").start()
    store = PromptStore(server.url, backbone.info, namespace="outage", socket_timeout=0.5)
    metrics = ServingMetrics()
    try:
        store.register(make_set("cached", backbone))
        store.register(make_set("cold", backbone, seed=1))
        eng = MultiTaskEngine(
            backbone, store, Settings(cache_version_check_ms=0, cache_store_backoff_ms=5_000), metrics=metrics
        )
        img = image_bytes(1)
        assert isinstance(eng.predict([RequestItem("cached", img)])[0], Result)
        server.stop()
        out = eng.predict([RequestItem("cached", img), RequestItem("cold", img)])
        assert (
            isinstance(out[0], Result) and isinstance(out[1], StoreUnavailable) and out[1].http_status == 503
        )
        errors = eng.cache.stats.store_errors
        assert errors >= 1
        # within the back-off, a cold load fails at once without waiting on Redis again
        assert isinstance(eng.predict([RequestItem("cold", img)])[0], StoreUnavailable)
        assert eng.cache.stats.store_errors == errors
        server.start()
        assert wait_for(lambda: isinstance(eng.predict([RequestItem("cold", img)])[0], Result), 15)
        # the subscription came back too: an update reaches the cache without a version check
        eng.cache.version_check_s = -1
        assert wait_for(lambda: eng.cache._subscription is not None and eng.cache._subscription.alive, 5)
        store.register(make_set("cached", backbone, seed=9))
        assert wait_for(lambda: eng.cache.resident().get("cached") == 2, 10)
        eng.close()
    finally:
        server.stop()


# ---------------------------------------------------------------------- metrics
def test_task_labels_are_bounded() -> None:
    lab = TaskLabeler(top_n=2)
    assert [lab.label(t) for t in ("a", "b", "c")] == ["a", "b", "other"]
    for _ in range(3):
        lab.label("c")  # c is now busier than a and b: it takes the least busy label
    assert lab.label("c") == "c" and len(lab.labelled) == 2


def test_engine_metrics_counts(backbone: Backbone, store: PromptStore) -> None:
    store.register(make_set("a", backbone))
    metrics = ServingMetrics(top_tasks=10)
    eng = MultiTaskEngine(backbone, store, Settings(), metrics=metrics)
    try:
        eng.predict([RequestItem("a", image_bytes(1))] * 3 + [RequestItem("zzz", image_bytes(1))])
        eng.predict([RequestItem("a", image_bytes(2)), RequestItem("a", b"junk"), RequestItem("b", b"junk")])
    finally:
        eng.close()
    text = generate_latest(metrics.registry).decode()
    assert 'e2vpt_request_latency_seconds_count{task="a"} 5.0' in text
    assert 'e2vpt_requests_total{status="400",task="a"} 1.0' in text  # bad image for a known task
    assert 'e2vpt_requests_total{status="400",task="unknown"} 1.0' in text  # never-loaded task b
    assert 'e2vpt_request_latency_seconds_bucket{le="0.0005",task="a"}' in text
    assert 'e2vpt_requests_total{status="404",task="unknown"} 1.0' in text
    assert "e2vpt_batch_size_count 2.0" in text and "e2vpt_cache_misses_total 2.0" in text


def test_micro_batches_answer_as_one_batch(backbone: Backbone, store: PromptStore) -> None:
    """engine_micro_batch (images) and engine_micro_batch_pixels (decoded pixels) split a batch (the next
    part decoding in the background): the same answers and the same per-item errors in the same slots as
    one forward, with one forward per micro-batch."""
    for t in ("a", "b", "c"):
        store.register(make_set(t, backbone, seed=ord(t)))
    tasks = ["a", "b", "a", "c", "nope", "b", "c", "a", "b", "c", "a"]
    items = [RequestItem(t, image_bytes(60 + i)) for i, t in enumerate(tasks)]  # 48 x 40 pixels each
    items[5] = RequestItem("b", b"not an image")
    # the bad image fails at its header, before the split: 10 items are split, "nope" (not found) has
    # no forward. Of 3: four forwards; of 1: nine; at most two images' pixels: five; 3 or 2 images: five
    variants = {
        "one": ({"engine_micro_batch_pixels": 0}, 1),
        "3 images": ({"engine_micro_batch": 3}, 4),
        "1 image": ({"engine_micro_batch": 1}, 9),
        "2 images' pixels": ({"engine_micro_batch_pixels": 2 * 48 * 40 + 1}, 5),
        "3 images or 2 images' pixels": ({"engine_micro_batch": 3, "engine_micro_batch_pixels": 4000}, 5),
    }
    answers = {}
    for name, (config, forwards) in variants.items():
        metrics = ServingMetrics(top_tasks=10)
        eng = MultiTaskEngine(backbone, store, Settings(**config), metrics=metrics)
        try:
            answers[name] = eng.predict(items)
        finally:
            eng.close()
        text = generate_latest(metrics.registry).decode().split("e2vpt_forward_seconds_count ")[1]
        assert float(text.split()[0]) == forwards, name
    for name in variants:
        for one, many in zip(answers["one"], answers[name], strict=True):
            assert type(one) is type(many)
            if isinstance(one, Result):
                assert [p.label for p in many.predictions] == [p.label for p in one.predictions]
                assert [p.score for p in many.predictions] == pytest.approx(
                    [p.score for p in one.predictions], abs=1e-5
                )
        assert isinstance(answers[name][4], TaskNotFound) and isinstance(answers[name][5], InvalidImage)


@pytest.mark.parametrize(
    ("pixels", "size", "budget", "runs"),
    [
        ([], 0, 0, []),
        ([5, 5, 5], 0, 0, [(0, 3)]),
        ([5, 5, 5], 2, 0, [(0, 2), (2, 3)]),
        ([5, 5, 5], 0, 10, [(0, 2), (2, 3)]),  # exactly the budget fits
        ([5, 5, 5], 0, 9, [(0, 1), (1, 2), (2, 3)]),
        ([50, 1, 1, 50, 1], 0, 10, [(0, 1), (1, 3), (3, 4), (4, 5)]),  # larger than the budget: alone
        ([1, 1, 1, 1, 1], 2, 100, [(0, 2), (2, 4), (4, 5)]),
        ([4, 4, 4, 4], 3, 8, [(0, 2), (2, 4)]),  # whichever bound comes first
    ],
)
def test_micro_batches_split_by_images_and_pixels(
    pixels: list[int], size: int, budget: int, runs: list[tuple[int, int]]
) -> None:
    assert [(r.start, r.stop) for r in micro_batches(pixels, size, budget)] == runs


def test_engine_stages_show_in_a_profile(
    backbone: Backbone, store: PromptStore, engine: MultiTaskEngine
) -> None:
    """Every stage of a call is a named profiler range (what bench_gpu's `stages` section reads), and only
    those of STAGES: a renamed or dropped range fails here, not silently in a GPU run."""
    from torch.profiler import profile

    store.register(make_set("a", backbone))
    engine.predict([RequestItem("a", image_bytes(0))])
    with profile() as p:
        results = engine.predict([RequestItem("a", image_bytes(1)), RequestItem("a", image_bytes(2))])
    assert all(isinstance(r, Result) for r in results)
    seen = {e.key for e in p.key_averages() if e.key.startswith("e2vpt.")}
    assert seen == set(STAGES)


def test_settings_file_defaults_yield_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2VPT_TOP_K", "3")
    s = settings_with_defaults({"top_k": 9, "backend": "torch", "cache_max_bytes": 123})
    assert (s.top_k, s.cache_max_bytes) == (3, 123)
    with pytest.raises(ValueError):
        settings_with_defaults({"no_such_field": 1})


def test_engine_started_while_redis_down_recovers(backbone: Backbone, tmp_path) -> None:  # noqa: ANN001
    """A worker that starts during an outage answers 503, then serves and follows events once Redis is back."""
    server = RedisServer(tmp_path / "redis").start()
    store = PromptStore(server.url, backbone.info, namespace="late", socket_timeout=0.5)
    try:
        store.register(make_set("a", backbone))
        server.stop()
        eng = MultiTaskEngine(backbone, store, Settings(cache_version_check_ms=-1, cache_preload_tasks=["a"]))
        assert isinstance(eng.preload_errors["a"], StoreUnavailable)
        (res,) = eng.predict([RequestItem("a", image_bytes(1))])
        assert isinstance(res, StoreUnavailable)
        server.start()
        assert wait_for(lambda: isinstance(eng.predict([RequestItem("a", image_bytes(1))])[0], Result), 15)
        assert wait_for(lambda: eng.cache._subscription is not None, 10)
        store.register(make_set("a", backbone, seed=3))
        assert wait_for(lambda: eng.cache.resident().get("a") == 2, 10)  # events only (no version check)
        eng.close()
    finally:
        server.stop()
