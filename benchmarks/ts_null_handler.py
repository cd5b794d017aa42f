"""Benchmark-only TorchServe handler: the project's request parsing and response writing
(`e2vpt.torchserve.adapter.handle_batch`) around an engine that does no work, so that a load test measures
the front end's own ceiling (TorchServe's Java front end, batching, the worker protocol and the adapter).

Packed into its own .mar by `benchmarks/bench_gpu.py` (never into the product's archive). Every parsed item
is answered at once with one fixed prediction; items that fail parsing keep their typed error and status.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from e2vpt.config import get_settings
from e2vpt.errors import E2VPTError
from e2vpt.serving.engine import Prediction, RequestItem, Result
from e2vpt.serving.metrics import ServingMetrics
from e2vpt.torchserve.adapter import handle_batch


class NullHandler:
    """A TorchServe handler (one class per handler file) that is also its own engine: `predict` keeps
    `MultiTaskEngine.predict`'s contract without decoding, prompts or a forward."""

    def __init__(self) -> None:
        self.initialized = False
        self.settings = get_settings()  # the response size limit, as a worker reads it
        self.metrics = ServingMetrics()

    def initialize(self, context: Any) -> None:
        self.initialized = True

    def predict(
        self, items: Sequence[RequestItem | E2VPTError], top_k: int | None = None
    ) -> list[Result | E2VPTError]:
        return [
            item if isinstance(item, E2VPTError) else Result(item.task_id, 1, [Prediction("null", 1.0)])
            for item in items
        ]

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        return handle_batch(self, data, context)  # type: ignore[arg-type]
