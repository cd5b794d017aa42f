"""Inference backends: what computes pooled features from images and per-image padded prompts.

The serving engine gathers each image's prompts from its `PromptTable`, asks a backend for features and
applies the per-task heads itself (`TableBatch.logits`), so every backend gives the same answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from e2vpt.config import Settings
from e2vpt.core.backbone import Backbone
from e2vpt.core.model import PromptedViT
from e2vpt.errors import BackendUnavailable


class FeatureBackend(Protocol):
    """images [B, C, H, W], visual [B, L, P, D], kv [B, L, 2, H, T, Dh], visual_valid [B, P],
    kv_valid [B, T] (None: nothing padded) -> pooled features [B, D] (on the backend's device)."""

    name: str

    def features(
        self, images: Tensor, visual: Tensor, kv: Tensor, visual_valid: Tensor | None, kv_valid: Tensor | None
    ) -> Tensor: ...


# torch.compile modes the torch backend accepts (settings torch_compile / torch_compile_mode).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class TorchBackend:
    """PyTorch on the backbone's device: eager, or through `torch.compile` when `compile_mode` is given
    ("reduce-overhead" replays CUDA graphs). A compiled forward compiles on its first call and again for
    new input shapes (batch size, padded P and T), so the first batches of a new shape are slow."""

    name = "torch"

    def __init__(self, backbone: Backbone, *, compile_mode: str | None = None) -> None:
        self.model = PromptedViT(backbone).eval()
        self.compile_mode = compile_mode
        self._forward: Callable[..., Tensor] = self.model.forward_features
        if compile_mode is not None:
            if compile_mode not in COMPILE_MODES:
                raise BackendUnavailable(
                    f"unknown torch_compile_mode {compile_mode!r}; expected one of {COMPILE_MODES}"
                )
            self._forward = torch.compile(self.model.forward_features, mode=compile_mode)

    @torch.inference_mode()
    def features(
        self, images: Tensor, visual: Tensor, kv: Tensor, visual_valid: Tensor | None, kv_valid: Tensor | None
    ) -> Tensor:
        out = self._forward(images, visual, kv, visual_valid, kv_valid)
        # CUDA-graph replays reuse their output buffers: the caller gets its own copy
        return out.clone() if self.compile_mode == "reduce-overhead" else out


BACKENDS = ("torch", "onnxruntime")


def make_backend(kind: str, backbone: Backbone, settings: Settings) -> FeatureBackend:
    """The backend the engine computes features with: "torch" or "onnxruntime" (imported lazily; see
    `e2vpt.onnx.backend.create_backend`)."""
    if kind == "torch":
        return TorchBackend(
            backbone, compile_mode=settings.torch_compile_mode if settings.torch_compile else None
        )
    if kind == "onnxruntime":
        from e2vpt.onnx.backend import create_backend

        return create_backend(backbone, settings)
    raise BackendUnavailable(f"unknown backend {kind!r}; expected one of {BACKENDS}")
