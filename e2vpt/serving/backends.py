"""Inference backends: what computes pooled features from images and per-image padded prompts.

The serving engine gathers each image's prompts from its `PromptTable`, asks a backend for features and
applies the per-task heads itself (`TableBatch.logits`), so every backend gives the same answers.
"""

from __future__ import annotations

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


class TorchBackend:
    """Eager PyTorch on the backbone's device."""

    name = "torch"

    def __init__(self, backbone: Backbone) -> None:
        self.model = PromptedViT(backbone).eval()

    @torch.inference_mode()
    def features(
        self, images: Tensor, visual: Tensor, kv: Tensor, visual_valid: Tensor | None, kv_valid: Tensor | None
    ) -> Tensor:
        return self.model.forward_features(images, visual, kv, visual_valid, kv_valid)


BACKENDS = ("torch", "onnxruntime")


def make_backend(kind: str, backbone: Backbone, settings: Settings) -> FeatureBackend:
    """The backend the engine computes features with: "torch" or "onnxruntime" (imported lazily; see
    `e2vpt.onnx.backend.create_backend`)."""
    if kind == "torch":
        return TorchBackend(backbone)
    if kind == "onnxruntime":
        from e2vpt.onnx.backend import create_backend

        return create_backend(backbone, settings)
    raise BackendUnavailable(f"unknown backend {kind!r}; expected one of {BACKENDS}")
