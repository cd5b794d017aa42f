"""TorchServe handler: a thin adapter over `e2vpt.torchserve.adapter` / `e2vpt.serving.engine.MultiTaskEngine`.

TorchServe allows one class per handler file, so everything else lives in the `e2vpt` package.
"""

from __future__ import annotations

from typing import Any

import e2vpt.torchserve.adapter as serving_io


class E2VPTHandler:
    def __init__(self) -> None:
        self.engine: Any = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        self.engine = serving_io.engine_from_model_dir(props["model_dir"], props.get("gpu_id"))
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        return serving_io.handle_batch(self.engine, data, context)
