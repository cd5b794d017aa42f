"""The offline upstream backbone of the fidelity study: a small timm ViT (vit_tiny_patch16_224 built with
32x32 input, 4x4 patches -> 64 tokens, 4 blocks, D=128, 4 heads, average pooling; ~0.8M parameters)
pretrained from scratch on a generated task, saved with `e2vpt.core.backbone.save_checkpoint` so
`load_backbone(checkpoint=path)` rebuilds it.

Upstream task (default `shape`): the shape (6 classes) of one main object in a random colour, at any
position, size and rotation, among 0-2 small distractors on a random background; fresh images every
epoch. The older `shape-colour` task (18 classes = shape x colour family) is kept as an option: a small
ViT learns its colour shortcut first and its features then barely help downstream (docs/fidelity_notes.md).

`ensure_upstream(path)` creates the checkpoint once (a few minutes on one CPU core) and reuses it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F

from e2vpt.config import get_settings
from e2vpt.core.backbone import Backbone, load_backbone, save_checkpoint
from training.synthetic.minivtab import (
    COLOR_FAMILIES,
    SHAPES,
    SIZE,
    background,
    finish,
    paint,
    random_color,
    shape_mask,
)

log = logging.getLogger(__name__)

UPSTREAM_NAME = "vit_tiny_patch16_224"
UPSTREAM_KWARGS: dict[str, Any] = {
    "img_size": SIZE,
    "patch_size": 4,
    "depth": 4,
    "embed_dim": 128,
    "num_heads": 4,
    "global_pool": "avg",
    "num_classes": len(SHAPES),
}
# The demo's budget (`make demo` creates it once on a fresh machine): ~30k images, ~3 minutes on one core.
DEMO_PRETRAIN: dict[str, Any] = {"images_per_epoch": 6000, "epochs": 5}


UPSTREAM_TASKS = ("shape", "shape-colour")


def num_upstream_classes(task: str) -> int:
    if task not in UPSTREAM_TASKS:
        raise ValueError(f"unknown upstream task {task!r}; expected one of {UPSTREAM_TASKS}")
    return len(SHAPES) * (len(COLOR_FAMILIES) if task == "shape-colour" else 1)


def upstream_sample(
    rng: np.random.Generator, task: str = "shape", max_distractors: int = 2
) -> tuple[np.ndarray, int]:
    """One upstream image and its label. `shape-colour`: 6 shapes x 3 colour families of the main object
    (colour is an easy shortcut a small ViT learns first); `shape`: the main object's shape only, its
    colour random (a nuisance), so the features must encode geometry."""
    canvas = background(rng)
    shape, family = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOR_FAMILIES)))
    for _ in range(int(rng.integers(max_distractors + 1))):
        cx, cy = rng.uniform(2, SIZE - 2, 2)
        d = SHAPES[rng.integers(len(SHAPES))]
        paint(canvas, shape_mask(d, cx, cy, rng.uniform(1.8, 3.0), rng.uniform(0, 6.3)), random_color(rng))
    cx, cy = rng.uniform(7, SIZE - 7, 2)
    m = shape_mask(SHAPES[shape], cx, cy, rng.uniform(4.5, 7.5), rng.uniform(0, 6.3))
    if task == "shape":
        paint(canvas, m, random_color(rng))
        return finish(canvas), shape
    paint(canvas, m, random_color(rng, family))
    return finish(canvas), shape * len(COLOR_FAMILIES) + family


def upstream_batch(
    n: int, seed: int, task: str = "shape", max_distractors: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """n images normalised with mean/std 0.5 (timm's default for this model) and labels."""
    rng = np.random.default_rng([seed, 12345])
    xs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    ys = np.empty(n, np.int64)
    for i in range(n):
        xs[i], ys[i] = upstream_sample(rng, task, max_distractors)
    x = torch.from_numpy(xs).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    return x, torch.from_numpy(ys)


def pretrain_upstream(
    path: str | Path,
    *,
    images_per_epoch: int = 12_000,
    epochs: int = 6,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    task: str = "shape",
    model_kwargs: dict[str, Any] | None = None,
    label_smoothing: float = 0.0,
    max_distractors: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain the upstream ViT (AdamW, warm-up + cosine, fresh generated images each epoch), save it,
    and return its metrics (also written next to it as `<path>.json`)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    kwargs = {**UPSTREAM_KWARGS, **(model_kwargs or {}), "num_classes": num_upstream_classes(task)}
    model = timm.create_model(UPSTREAM_NAME, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(images_per_epoch / batch_size)
    total, warm = steps_per_epoch * epochs, steps_per_epoch // 2
    val_x, val_y = upstream_batch(2000, seed + 10_000, task, max_distractors)
    t0, step, hist = time.perf_counter(), 0, []
    for epoch in range(epochs):
        x_all, y_all = upstream_batch(images_per_epoch, seed * 1000 + epoch, task, max_distractors)
        perm = torch.randperm(len(x_all))
        model.train()
        bar = tqdm(
            range(steps_per_epoch), desc=f"upstream {epoch + 1}/{epochs}", disable=not progress, leave=False
        )
        loss_sum = 0.0
        for i in bar:
            idx = perm[i * batch_size : (i + 1) * batch_size]
            cur = (
                lr * step / warm
                if step < warm
                else lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
            )
            for g in opt.param_groups:
                g["lr"] = cur
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += loss.item()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        with torch.no_grad():
            acc = sum(
                int((model(val_x[j : j + 500]).argmax(1) == val_y[j : j + 500]).sum())
                for j in range(0, 2000, 500)
            )
        hist.append({"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, "val_acc": acc / 20})
        log.info(
            "upstream epoch %d/%d: loss %.3f, val acc %.1f%%",
            epoch + 1,
            epochs,
            hist[-1]["train_loss"],
            acc / 20,
        )
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.safetensors")
    save_checkpoint(model, UPSTREAM_NAME, kwargs, tmp)
    tmp.replace(path)
    metrics = {
        "name": UPSTREAM_NAME,
        "model_kwargs": kwargs,
        "task": task,
        "lr": lr,
        "label_smoothing": label_smoothing,
        "max_distractors": max_distractors,
        "params": sum(p.numel() for p in model.parameters()),
        "images_seen": images_per_epoch * epochs,
        "seconds": time.perf_counter() - t0,
        "history": hist,
        "val_acc": hist[-1]["val_acc"],
    }
    path.with_suffix(".json").write_text(json.dumps(metrics, indent=2))
    return metrics


def ensure_upstream(path: str | Path | None = None, **pretrain_kwargs: Any) -> Path:
    """The cached upstream checkpoint (default `Settings.upstream_checkpoint`), pretrained on first use."""
    path = Path(path or get_settings().upstream_checkpoint)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("pretraining the upstream ViT into %s (once)", path)
        pretrain_upstream(path, **pretrain_kwargs)
    return path


def load_upstream(path: str | Path | None = None) -> Backbone:
    """The frozen upstream backbone (created first if missing)."""
    return load_backbone(checkpoint=ensure_upstream(path))
