"""E2VPT Serve: one frozen ViT, many tasks, each with its own pruned visual and key-value prompts.

The parts, bottom up (docs/architecture.md): `e2vpt.core` is the method (backbone loading, the prompted
ViT and its attention, the prompt-set file format, image decoding, pruning masks); `e2vpt.registry`
keeps prompt sets in Redis and serves them over HTTP (store, API, client, `e2vpt tasks`);
`e2vpt.serving` answers mixed-task batches (engine, device prompt cache, backends, metrics);
`e2vpt.onnx` exports the backbone and runs it on onnxruntime; `e2vpt.torchserve` is the TorchServe
adapter, handler and archive; `e2vpt.dev` holds development tools (a local Redis, test images).
`e2vpt.config` (Settings) and `e2vpt.errors` (typed errors, HTTP status) are shared by all.

The public API below is imported lazily, so `import e2vpt` (and the light CLI commands) load no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from e2vpt.core.backbone import Backbone, BackboneInfo, load_backbone
    from e2vpt.core.model import PromptedViT, TaskBatch, TaskPrompts
    from e2vpt.core.promptset import FORMAT_VERSION, PromptSet

_HOMES = {
    "Backbone": "e2vpt.core.backbone",
    "BackboneInfo": "e2vpt.core.backbone",
    "load_backbone": "e2vpt.core.backbone",
    "PromptedViT": "e2vpt.core.model",
    "TaskBatch": "e2vpt.core.model",
    "TaskPrompts": "e2vpt.core.model",
    "FORMAT_VERSION": "e2vpt.core.promptset",
    "PromptSet": "e2vpt.core.promptset",
}

__all__ = [
    "FORMAT_VERSION",
    "Backbone",
    "BackboneInfo",
    "PromptSet",
    "PromptedViT",
    "TaskBatch",
    "TaskPrompts",
    "load_backbone",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'e2vpt' has no attribute {name!r}")
