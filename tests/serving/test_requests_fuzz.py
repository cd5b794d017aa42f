"""Fuzz of what TorchServe hands the handler: batches of requests whose fields and headers are anything a
client can make TorchServe produce (bytes, bytearray, str, numbers, NaN, nested JSON, non-UTF-8 header
values, odd field names), with one well-formed request among them. Through the real adapter and engine
(tiny backbone, real Redis, TorchServe's own `Context`): every request gets exactly one answer, a JSON
document (no NaN) with its own 4xx status or a result; the well-formed request is answered exactly as
when it is alone; nothing raises.

`E2VPT_REQUEST_FUZZ_EXAMPLES` sets the number of batches (default 300)."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ts.context import Context, RequestProcessor

from e2vpt.config import Settings
from e2vpt.core.backbone import Backbone
from e2vpt.dev.images import image_bytes
from e2vpt.registry.store import PromptStore
from e2vpt.serving.engine import MultiTaskEngine
from e2vpt.torchserve.adapter import handle_batch
from tests.helpers import make_set

pytestmark = pytest.mark.integration  # real Redis

EXAMPLES = int(os.environ.get("E2VPT_REQUEST_FUZZ_EXAMPLES", "300"))
GOOD = image_bytes(3)
B64 = base64.b64encode(GOOD).decode()
TASK = "fuzz"
FIELDS = ("body", "data", "task_id", "image", "file", "top_k")
HEADERS = ("X-Task-Id", "x-task-id", "X-Top-K", "Content-Type", "content-type")
CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "application/x-www-form-urlencoded",
    "application/octet-stream",
    "image/png",
    "multipart/form-data",
    "text/plain",
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from([TASK, B64, "data:image/png;base64," + B64, "3", "0", "-1", "1e3", "nope"]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)  # fmt: skip
json_objects = st.fixed_dictionaries(
    {}, optional={"task_id": json_values, "image": json_values, "top_k": json_values}
) | st.dictionaries(st.sampled_from([*FIELDS, "x"]), json_values, max_size=4)
raw = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([GOOD, GOOD[:40], b"{", b"[]", b"null", b'{"task_id": "fuzz"}', b"\xff\xfe"]),
    json_objects.map(lambda o: json.dumps(o).encode()),
)
field_values = st.one_of(raw, raw.map(bytearray), json_objects, json_values, st.text(max_size=20))
header_values = st.one_of(
    st.sampled_from([TASK, "nope", "", " fuzz ", "3", "0", "x" * 300, *CONTENT_TYPES]),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.integers(),
)
requests = st.tuples(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), field_values, max_size=4),
    st.dictionaries(st.sampled_from(HEADERS) | st.text(max_size=6), header_values, max_size=4),
)


def answer(
    engine: MultiTaskEngine, batch: list[tuple[dict[str, Any], dict[Any, Any]]]
) -> list[tuple[int, Any]]:
    """(status, JSON body) per request, through the adapter with TorchServe's Context."""
    ctx = Context("e2vpt", "/tmp", {}, len(batch), None, "0.12.0")
    ctx.request_processor = [RequestProcessor(h) for _, h in batch]
    out = handle_batch(engine, [r for r, _ in batch], ctx)
    assert len(out) == len(batch)
    return [
        (ctx.get_response_status(i)[0], json.loads(body, parse_constant=no_nan)) for i, body in enumerate(out)
    ]


def no_nan(name: str) -> None:
    raise AssertionError(f"an answer holds {name}: not JSON")


@pytest.fixture
def engine(backbone: Backbone, store: PromptStore) -> MultiTaskEngine:
    store.register(make_set(TASK, backbone, 5, 1))
    eng = MultiTaskEngine(backbone, store, Settings(cache_version_check_ms=-1, top_k=3))
    yield eng  # type: ignore[misc]
    eng.close()


def test_any_batch_answers_each_request_alone(engine: MultiTaskEngine) -> None:
    well_formed = ({"body": bytearray(GOOD)}, {"X-Task-Id": TASK})
    [(status, alone)] = answer(engine, [well_formed])
    assert status == 200 and [p["label"] for p in alone["predictions"]]

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(requests, max_size=6), st.integers(min_value=0, max_value=6))
    def run(junk: list[tuple[dict[str, Any], dict[Any, Any]]], at: int) -> None:
        at = min(at, len(junk))
        batch = [*junk[:at], well_formed, *junk[at:]]
        answers = answer(engine, batch)
        assert answers[at] == (200, alone)
        for status, body in answers:
            if status == 200:
                assert body["task_id"] == TASK and 1 <= len(body["predictions"]) <= 5
            else:  # the client's fault, typed: never a 5xx for what a client sent
                assert status in (400, 404, 413), (status, body)
                assert set(body) >= {"error", "detail"}

    run()
