"""The tiny backbone of tests, benchmarks and probes: a 2-block ViT on 32x32 images with 8x8 patches
(16 patches, D=192, 3 heads; milliseconds per forward), randomly initialised."""

from __future__ import annotations

from pathlib import Path

from e2vpt.core.backbone import Backbone, load_backbone, save_checkpoint

TINY = {"img_size": 32, "patch_size": 8, "depth": 2}


def tiny_backbone(name: str = "vit_tiny_patch16_224", **kwargs: object) -> Backbone:
    return load_backbone(name, **{**TINY, **kwargs})


def tiny_checkpoint(path: Path) -> tuple[Path, Backbone]:
    """A random tiny backbone saved as a checkpoint at `path` (what a .mar or a deployment packs), and the
    backbone loaded back from it."""
    ckpt = save_checkpoint(tiny_backbone().model, "vit_tiny_patch16_224", TINY, path)
    return ckpt, load_backbone(checkpoint=ckpt)
