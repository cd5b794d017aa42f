"""Inference backends: what computes pooled features from images and per-image padded prompts.

The serving engine gathers each image's prompts from its `PromptTable`, asks a backend for features and
applies the per-task heads itself (`TableBatch.logits`), so every backend gives the same answers.
"""

from __future__ import annotations

import re
from pathlib import Path
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


def onnx_cache_path(backbone: Backbone, settings: Settings) -> Path:
    """Where `make_backend` keeps the graph it exports: one file per fingerprint and export options."""
    s = settings
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone.info.fingerprint)
    max_p, max_t = s.onnx_limits
    name = f"{key}-p{max_p}-t{max_t}-o{s.onnx_opset}-{s.onnx_exporter}"
    return Path(s.onnx_cache_dir).expanduser() / f"{name}{'-fp16' if s.onnx_fp16 else ''}.onnx"


def make_backend(kind: str, backbone: Backbone, settings: Settings) -> FeatureBackend:
    """The backend the engine computes features with: "torch" or "onnxruntime" (imported lazily; see
    `e2vpt.onnx.backend.create_backend`)."""
    if kind == "torch":
        return TorchBackend(backbone)
    if kind == "onnxruntime":
        from e2vpt.onnx.backend import create_backend

        return create_backend(backbone, settings)
    raise BackendUnavailable(f"unknown backend {kind!r}; expected one of {BACKENDS}")
