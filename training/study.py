"""The fidelity study: linear, vpt-deep, e2vpt and pruned e2vpt on every mini-VTAB task, on the offline
upstream ViT, with the same budget (epochs, batch, lr schedule) and seeds. Writes a results table
(accuracy per task and mean, tuned-parameter %, tokens kept, inference time per image) as JSON and
Markdown, and a PNG plot."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from e2vpt.core.backbone import Backbone  # noqa: E402
from e2vpt.core.model import PromptedViT, TaskBatch  # noqa: E402
from e2vpt.core.promptset import PromptSet  # noqa: E402
from training.data import with_transforms  # noqa: E402
from training.pruning import PruneConfig, prune_and_rewind  # noqa: E402
from training.report import (
    save_figure,  # noqa: E402
    write_json,  # noqa: E402
)
from training.synthetic.minivtab import TASK_GROUPS, TASKS, max_test_images, mini_vtab  # noqa: E402
from training.synthetic.upstream import load_upstream  # noqa: E402
from training.trainer import TrainConfig, initial_prompt_set, train  # noqa: E402

log = logging.getLogger(__name__)
METHODS = ("linear", "vpt-deep", "e2vpt", "e2vpt-pruned")


@dataclass
class StudyConfig:
    tasks: tuple[str, ...] = TASKS
    n_train: int = 800
    n_val: int = 200
    n_test: int = 1000
    epochs: int = 10
    warmup_epochs: int = 2
    batch_size: int = 64
    base_lr: float = 0.5
    weight_decay: float = 1e-4
    num_prompts: int = 10
    num_kv: int = 5
    num_segments: int = 16
    prune_tokens: float = 0.5
    prune_segments: float = 0.25
    rewind: str = "rewind"
    seed: int = 0
    data_seed: int = 0

    @classmethod
    def quick(cls) -> StudyConfig:
        return cls(n_train=512, n_val=200, n_test=300, epochs=5, warmup_epochs=1, batch_size=32)


def time_per_image(model: PromptedViT, ps: PromptSet, x: torch.Tensor, repeats: int = 5) -> float:
    """Median milliseconds per image of a serving forward (TaskBatch + forward_multi) on a batch."""
    batch = TaskBatch.from_prompt_sets([ps])
    idx = torch.zeros(len(x), dtype=torch.long)
    times = []
    with torch.no_grad():
        model.forward_multi(x, batch, idx)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.forward_multi(x, batch, idx)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / len(x)


def run_study(cfg: StudyConfig, out_dir: str | Path, backbone: Backbone | None = None) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = backbone or load_upstream()
    model = PromptedViT(backbone)
    base = TrainConfig(
        epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        batch_size=cfg.batch_size,
        base_lr=cfg.base_lr,
        weight_decay=cfg.weight_decay,
        num_prompts=cfg.num_prompts,
        num_kv=cfg.num_kv,
        num_segments=cfg.num_segments,
        seed=cfg.seed,
        progress=False,
    )
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for task in cfg.tasks:
        splits = with_transforms(
            mini_vtab(
                task,
                seed=cfg.data_seed,
                n_test=max_test_images(task, cfg.n_test),
                n_train=cfg.n_train,
                n_val=cfg.n_val,
            ),
            backbone.info,
        )
        x_time = torch.stack([splits.val[i][0] for i in range(min(64, len(splits.val)))])
        trained: dict[str, Any] = {}
        for method in ("linear", "vpt-deep", "e2vpt"):
            mcfg = replace(base, method=method)
            mcfg.__post_init__()
            init = initial_prompt_set(f"mini-{task}", backbone, splits.labels, mcfg)
            res = train(backbone, splits, mcfg, init, desc=f"{task}/{method}")
            ps = res.prompts.to_prompt_set(init, pruned=False)
            trained[method] = (res, init)
            rows.append(_row(task, method, res.val_acc, res.test_acc, ps, res, model, x_time))
            log.info("%s %s: val %.2f test %.2f", task, method, res.val_acc, res.test_acc)
        res, init = trained["e2vpt"]
        pcfg = PruneConfig(token_ratio=cfg.prune_tokens, segment_ratio=cfg.prune_segments, rewind=cfg.rewind)
        pr = prune_and_rewind(backbone, splits, res, init, res.config, pcfg)
        rows.append(
            _row(
                task,
                "e2vpt-pruned",
                pr.retrain.val_acc,
                pr.retrain.test_acc,
                pr.prompt_set,
                res,
                model,
                x_time,
            )
        )
        log.info("%s e2vpt-pruned: val %.2f test %.2f", task, pr.retrain.val_acc, pr.retrain.test_acc)
        _write(
            rows, cfg, out, time.perf_counter() - t_start, backbone
        )  # partial results survive interruptions
    return _write(rows, cfg, out, time.perf_counter() - t_start, backbone)


def _row(task, method, val_acc, test_acc, ps: PromptSet, res, model, x_time) -> dict[str, Any]:
    return {
        "task": task,
        "group": TASK_GROUPS[task],
        "method": method,
        "val_acc": val_acc,
        "test_acc": test_acc,
        "tuned_params": ps.num_parameters,
        "tuned_percent": 100.0 * ps.num_parameters / res.backbone_params,
        "tokens_kept": ps.num_prompts,
        "kv_tokens": ps.num_kv,
        "ms_per_image": time_per_image(model, ps, x_time),
        "train_seconds": res.train_seconds,
    }


def _write(
    rows: list[dict[str, Any]], cfg: StudyConfig, out: Path, seconds: float, backbone: Backbone
) -> dict[str, Any]:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    summary = {}
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m]
        if mine:
            summary[m] = {
                "mean_test_acc": statistics.mean(r["test_acc"] for r in mine),
                "mean_val_acc": statistics.mean(r["val_acc"] for r in mine),
                "mean_tuned_percent": statistics.mean(r["tuned_percent"] for r in mine),
                "mean_tokens_kept": statistics.mean(r["tokens_kept"] for r in mine),
                "mean_ms_per_image": statistics.mean(r["ms_per_image"] for r in mine),
            }
    data = {
        "config": asdict(cfg),
        "backbone": backbone.info.name,
        "fingerprint": backbone.info.fingerprint,
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
        "tasks": tasks,
        "rows": rows,
        "summary": summary,
    }
    write_json(data, out / "results.json")
    (out / "results.md").write_text(_markdown(rows, summary, tasks, cfg, seconds))
    _plot(rows, summary, tasks, out / "results.png")
    return data


def _markdown(rows, summary, tasks, cfg: StudyConfig, seconds: float) -> str:
    acc = {(r["task"], r["method"]): r["test_acc"] for r in rows}
    lines = [
        f"# Fidelity study (mini-VTAB, {cfg.n_train} train / {cfg.n_val} val / {cfg.n_test} test, "
        f"{cfg.epochs} epochs, seed {cfg.seed}; {seconds / 60:.1f} min)",
        "",
        "Test accuracy (%) per task, then the means over tasks.",
        "",
        "| method | " + " | ".join(tasks) + " | mean | tuned params % | tokens kept | ms / image |",
        "|---|" + "---|" * (len(tasks) + 4),
    ]
    for m, s in summary.items():
        cells = [f"{acc.get((t, m), float('nan')):.1f}" for t in tasks]
        lines.append(
            f"| {m} | "
            + " | ".join(cells)
            + f" | **{s['mean_test_acc']:.2f}** | {s['mean_tuned_percent']:.3f} | "
            f"{s['mean_tokens_kept']:.1f} | {s['mean_ms_per_image']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows, summary, tasks, path: Path) -> None:
    methods = list(summary)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), width_ratios=[3, 1])
    width = 0.8 / max(len(methods), 1)
    acc = {(r["task"], r["method"]): r["test_acc"] for r in rows}
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(tasks) + 1)]
        ys = [acc.get((t, m), 0.0) for t in tasks] + [summary[m]["mean_test_acc"]]
        ax.bar(xs, ys, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks) + 1)], [*tasks, "mean"])
    ax.set(ylabel="test accuracy (%)", title="mini-VTAB test accuracy")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    for m in methods:
        ax2.scatter(summary[m]["mean_tuned_percent"], summary[m]["mean_test_acc"], label=m, s=50)
    ax2.set(xlabel="tuned params (% of backbone)", ylabel="mean test accuracy (%)", title="accuracy vs size")
    ax2.grid(alpha=0.3)
    save_figure(fig, path)
