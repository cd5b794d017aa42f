"""Schemathesis fuzzing of the registry API from its own OpenAPI schema (in process, real Redis).

Every operation gets schema-valid and schema-violating requests; every answer must pass all of
schemathesis's checks (no 5xx, documented status codes, content types and response schemas, invalid
data rejected, auth enforced where declared). One check is excluded for PUT only: schemathesis calls
any schema-valid binary body "valid data" (`positive_data_acceptance`), but the schema cannot say what
a valid prompt-set file is, so random bytes are rightly refused with 422; nor for a write with an
If-Match / If-None-Match header: the schema cannot say which versions a task has, so a well-formed
condition that does not hold is rightly refused with 412.

`E2VPT_FUZZ_EXAMPLES` sets examples per operation and mode (default 25). The counts are printed."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from e2vpt.core.backbone import Backbone
from e2vpt.registry.api import create_app
from e2vpt.registry.store import PromptStore
from tests.registry_helpers import marked_set

pytestmark = pytest.mark.integration  # real Redis

TOKEN = "fuzz-token"
EXAMPLES = int(os.environ.get("E2VPT_FUZZ_EXAMPLES", "25"))


@pytest.fixture
def fuzz_store(backbone: Backbone, redis_url: str) -> Iterator[PromptStore]:
    store = PromptStore(redis_url, backbone.info, namespace=f"test-fuzz-{uuid.uuid4().hex[:8]}")
    for t in ("a", "b", "0"):
        store.register(marked_set(backbone.info, t, 1.0))
    yield store
    store.drop_all()


def _fuzzer(
    op: schemathesis.APIOperation, mode: GenerationMode, examples: int, counts: dict[str, int]
) -> Callable[[], None]:
    write = op.method.upper() in ("PUT", "POST", "DELETE")
    headers = {"Authorization": f"Bearer {TOKEN}"}

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case: schemathesis.Case) -> None:
        counts[op.label] = counts.get(op.label, 0) + 1
        conditional = write and {"if-match", "if-none-match"} & {h.lower() for h in case.headers or {}}
        excluded = [positive_data_acceptance] if op.method.upper() == "PUT" or conditional else []
        case.call_and_validate(headers=headers, excluded_checks=excluded)

    return fuzz


def run_schemathesis(store: PromptStore, examples: int) -> tuple[dict[str, int], list[str]]:
    """Fuzz every operation in both modes; returns cases per operation and the failures found."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(store, token=TOKEN))
    counts: dict[str, int] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        # healthz and metrics take no input: there is nothing to violate
        no_input = op.path in ("/healthz", "/metrics")
        for mode in (
            [GenerationMode.POSITIVE] if no_input else [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
        ):
            try:
                _fuzzer(op, mode, examples, counts)()
            except BaseException as exc:  # schemathesis raises a FailureGroup (a BaseExceptionGroup)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failures.append(f"{op.label} [{mode.value}]: {exc}")
    return counts, failures


def test_api_survives_schemathesis(fuzz_store: PromptStore, capsys: pytest.CaptureFixture[str]) -> None:
    counts, failures = run_schemathesis(fuzz_store, EXAMPLES)
    with capsys.disabled():
        print(f"\nschemathesis: {sum(counts.values())} cases over {len(counts)} operations: {counts}")
    assert not failures, "\n\n".join(failures)
    assert len(counts) == 9 and sum(counts.values()) > 9 * 5
