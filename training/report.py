"""Run outputs besides the prompt set: the JSON report and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")
    return path


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out, write (PNG, parent folders created) and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(histories: dict[str, list[dict[str, float]]], path: str | Path) -> Path:
    """Loss and accuracy per epoch (train and val) for each named phase (train, rewind, ...)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, hist in histories.items():
        if not hist:
            continue
        ep = [h["epoch"] for h in hist]
        ax_loss.plot(ep, [h["train_loss"] for h in hist], label=f"{name} train")
        ax_loss.plot(ep, [h["val_loss"] for h in hist], "--", label=f"{name} val")
        ax_acc.plot(ep, [h["train_acc"] for h in hist], label=f"{name} train")
        ax_acc.plot(ep, [h["val_acc"] for h in hist], "--", label=f"{name} val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_importance(
    token_scores: Tensor, segment_scores: Tensor, token_mask: Tensor, segment_mask: Tensor, path: str | Path
) -> Path:
    """Token importance (bars, pruned in grey) and segment importance [P, R] (heatmap, pruned hatched)."""
    P, R = segment_scores.shape
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.3 * P + 1)), width_ratios=[1, 2])
    colors = ["tab:blue" if m > 0 else "lightgrey" for m in token_mask.tolist()]
    ax_t.barh(range(P), token_scores.tolist(), color=colors)
    ax_t.invert_yaxis()
    ax_t.set(xlabel="token importance", ylabel="prompt token", title="tokens (grey = pruned)")
    im = ax_s.imshow(segment_scores.numpy(), aspect="auto", cmap="viridis")
    for p in range(P):
        for r in range(R):
            if segment_mask[p, r] <= 0:
                ax_s.add_patch(
                    plt.Rectangle((r - 0.5, p - 0.5), 1, 1, fill=False, hatch="xx", color="white", lw=0)
                )
    ax_s.set(xlabel="segment", ylabel="prompt token", title="segment importance (hatched = pruned)")
    fig.colorbar(im, ax=ax_s)
    return save_figure(fig, path)
