"""Prompt sets and Redis views shared by the registry tests (store, API, live, fuzz)."""

from __future__ import annotations

import io
import pickle
from dataclasses import replace

import torch

from e2vpt.core.backbone import BackboneInfo
from e2vpt.core.promptset import PromptSet
from e2vpt.errors import (
    CorruptPromptSet,
    IncompatiblePromptSet,
    InvalidPromptSet,
    InvalidTaskId,
    UnsupportedFormatVersion,
)
from e2vpt.registry.store import PromptStore


def marked_set(info: BackboneInfo, task_id: str, marker: float, num_classes: int = 3) -> PromptSet:
    """A valid set whose every tensor value and whose metadata both encode `marker`."""
    ps = PromptSet.create(task_id, info, [f"c{i}" for i in range(num_classes)])
    ps = replace(
        ps,
        visual=torch.full_like(ps.visual, marker),
        kv=torch.full_like(ps.kv, marker),
        head_weight=torch.full_like(ps.head_weight, marker),
        head_bias=torch.full_like(ps.head_bias, marker),
        metrics={"marker": marker},
    )
    return ps


def marker_of(ps: PromptSet) -> float:
    """The marker if metadata and all tensors agree on one; raises AssertionError on a torn read."""
    m = ps.metrics["marker"]
    for name, t in ps.tensors().items():
        assert bool((t == m).all()), f"{name} does not carry marker {m}: torn read"
    return m


def snapshot(s: PromptStore) -> dict[bytes, bytes]:
    """Every key of the namespace with its DUMP: equal snapshots mean nothing was written."""
    return {k: s.client.dump(k) for k in s.all_keys()}


def bad_uploads(info: BackboneInfo) -> dict[str, tuple[bytes, type[Exception]]]:
    """Malformed or foreign uploads, each with the typed error the door must raise."""
    good = marked_set(info, "victim", 5.0)
    data = good.to_bytes()
    nan = replace(good, visual=good.visual.clone())
    nan.visual[0, 0, 0] = float("nan")
    inf = replace(good, kv=good.kv.clone())
    inf.kv[0, 0, 0, 0, 0] = float("inf")
    wrong_head = replace(good, head_bias=torch.zeros(good.num_classes + 1))
    wrong_d = replace(good, visual=torch.zeros(info.depth, 10, info.embed_dim // 2))
    wrong_depth = PromptSet.create("victim", replace(info, depth=info.depth + 1), ["a"])
    other_backbone = replace(good, fingerprint="vit_tiny_patch16_224@sha256:0000000000000000")
    labels = replace(good, labels=["only-one"])
    ints = replace(good, head_bias=torch.zeros(good.num_classes, dtype=torch.int64))
    buf = io.BytesIO()
    torch.save(good.tensors(), buf)
    bad_id = replace(good, task_id="../etc/passwd")
    future = replace(good, format_version=99)
    return {
        "empty": (b"", CorruptPromptSet),
        "truncated": (data[: len(data) // 2], CorruptPromptSet),
        "header only": (data[:200], CorruptPromptSet),
        "garbage": (b"\x00" * 64 + b"not safetensors", CorruptPromptSet),
        "torch.save pickle": (buf.getvalue(), CorruptPromptSet),
        "raw pickle": (pickle.dumps({"visual": [1, 2, 3]}), CorruptPromptSet),
        "nan": (nan.to_bytes(), InvalidPromptSet),
        "inf": (inf.to_bytes(), InvalidPromptSet),
        "head shape": (wrong_head.to_bytes(), InvalidPromptSet),
        "embed dim": (wrong_d.to_bytes(), InvalidPromptSet),
        "depth": (wrong_depth.to_bytes(), IncompatiblePromptSet),
        "wrong backbone": (other_backbone.to_bytes(), IncompatiblePromptSet),
        "label count": (labels.to_bytes(), InvalidPromptSet),
        "int dtype": (ints.to_bytes(), InvalidPromptSet),
        "bad task id": (bad_id.to_bytes(), InvalidTaskId),
        "format version": (future.to_bytes(), UnsupportedFormatVersion),
    }
