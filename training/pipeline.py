"""One task end to end: (grid search) -> train -> (prune + rewind) -> prompt set + report + plots
(-> registry). What `e2vpt train` runs; also the demo's fast path (`quick_demo_task`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from e2vpt.config import DEFAULT_LIMITS, PromptLimits
from e2vpt.core.backbone import Backbone
from e2vpt.core.promptset import PromptSet
from e2vpt.registry.client import register_prompt_set
from training.data import DataSplits
from training.pruning import PruneConfig, PruneResult, prune_and_rewind
from training.report import plot_curves, plot_importance, write_json
from training.trainer import PRESETS, TrainConfig, TrainResult, grid_search, initial_prompt_set, train

log = logging.getLogger(__name__)


@dataclass
class TaskRun:
    """What `run_task` produced. `prompt_set` is None for `full` (not a prompt set)."""

    prompt_set: PromptSet | None
    report: dict[str, Any]
    train: TrainResult
    prune: PruneResult | None
    files: dict[str, Path]


def run_task(
    backbone: Backbone,
    splits: DataSplits,
    task_id: str,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    prune: PruneConfig | None = None,
    grid: tuple[list[float], list[float]] | None = None,
    resume: bool = False,
    register_url: str | None = None,
    register_token: str | None = None,
    extra: dict[str, Any] | None = None,
    limits: PromptLimits = DEFAULT_LIMITS,
) -> TaskRun:
    """Train (after an lr x wd grid search with `grid`), prune and rewind (with `prune`), write the
    prompt set, plots and report.json into `out_dir`, and register the set (with `register_url`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "task_id": task_id,
        "dataset": splits.name,
        "sizes": splits.sizes(),
        "labels": splits.labels,
        "backbone": backbone.info.name,
        "fingerprint": backbone.info.fingerprint,
        **(extra or {}),
    }
    if grid is not None:
        config, table = grid_search(backbone, splits, config, task_id, *grid)
        report["grid_search"] = {
            "table": table,
            "chosen": {"base_lr": config.base_lr, "weight_decay": config.weight_decay},
        }
    report["config"] = config.to_dict()
    init = initial_prompt_set(task_id, backbone, splits.labels, config)
    init.config = init.config.updated(recipe=splits.recipe)  # serving applies the same preprocessing
    result = train(
        backbone, splits, config, init, checkpoint=out / "checkpoint.pt", resume=resume, desc=config.method
    )
    report["train"] = {**result.summary(), "history": result.history}
    files: dict[str, Path] = {}
    histories = {"train": result.history}
    ps: PromptSet | None = None
    pr: PruneResult | None = None
    if config.method == "full":
        report["result"] = {
            "val_acc": result.val_acc,
            "test_acc": result.test_acc,
            "tuned_params": result.tuned_params,
            "tuned_percent": result.tuned_percent,
            "note": "full fine-tuning is the upper reference; it produces no prompt set",
        }
    else:
        if prune is not None:
            pr = _prune(backbone, splits, result, init, config, prune, out, resume, report, files)
        if pr is not None and prune is not None:
            histories[prune.rewind] = pr.retrain.history
        ps = _final_prompt_set(backbone, splits, config, result, init, pr, limits)
        files["prompt_set"] = ps.save(out / f"{task_id}.safetensors")
        report["prompt_set"] = ps.summary()
        final = pr.retrain if pr is not None else result
        report["result"] = {
            "val_acc": final.val_acc,
            "test_acc": final.test_acc,
            "tuned_params": ps.num_parameters,
            "tuned_percent": 100.0 * ps.num_parameters / result.backbone_params,
            "num_prompts": ps.num_prompts,
            "num_kv": ps.num_kv,
        }
    files["curves_png"] = plot_curves(histories, out / "curves.png")
    report["seconds"] = time.perf_counter() - t0
    if register_url and ps is not None:
        report["registered"] = register_prompt_set(register_url, ps, token=register_token)
        log.info("registered %s: %s", task_id, report["registered"])
    files["report"] = out / "report.json"
    report["files"] = {k: str(v) for k, v in files.items()}
    write_json(report, files["report"])
    for name in ("checkpoint.pt", "rewind_checkpoint.pt"):
        (out / name).unlink(missing_ok=True)  # the run finished: resuming is no longer needed
    return TaskRun(ps, report, result, pr, files)


def _prune(
    backbone: Backbone,
    splits: DataSplits,
    result: TrainResult,
    init: PromptSet,
    config: TrainConfig,
    prune: PruneConfig,
    out: Path,
    resume: bool,
    report: dict[str, Any],
    files: dict[str, Path],
) -> PruneResult | None:
    """Prune + rewind (not for `linear`: no visual prompts); its report section and importance plot."""
    if config.method == "linear":
        log.warning("linear has no visual prompts: pruning skipped")
        return None
    pr = prune_and_rewind(
        backbone,
        splits,
        result,
        init,
        config,
        prune,
        checkpoint=out / "rewind_checkpoint.pt",
        resume=resume,
    )
    report["prune"] = {**pr.summary(), "history": pr.retrain.history}
    files["importance_png"] = plot_importance(
        pr.token_importance, pr.segment_importance, pr.token_mask, pr.segment_mask, out / "importance.png"
    )
    return pr


def _final_prompt_set(
    backbone: Backbone,
    splits: DataSplits,
    config: TrainConfig,
    result: TrainResult,
    init: PromptSet,
    pr: PruneResult | None,
    limits: PromptLimits,
) -> PromptSet:
    """The set to save: the pruned one, else the trained one; its metrics and training config recorded,
    validated against the backbone."""
    ps = pr.prompt_set if pr is not None else result.prompts.to_prompt_set(init, pruned=False)
    final = pr.retrain if pr is not None else result
    trained_metrics = {
        "val_acc": result.val_acc,
        "test_acc": result.test_acc,
        "tuned_params": result.tuned_params,
    }
    ps.metrics = {
        **(ps.metrics if pr is not None else trained_metrics),
        "val_acc": final.val_acc,
        "test_acc": final.test_acc,
        "tuned_params": ps.num_parameters,
        "tuned_percent": 100.0 * ps.num_parameters / result.backbone_params,
        "dataset": splits.name,
    }
    ps.config = ps.config.updated(train=config.to_dict())
    return ps.validate(backbone.info, limits)


# A config that trains a mini-VTAB task on the upstream ViT in about a minute on one CPU core (with the
# pruning + rewinding of DEMO_PRUNE). It uses the `adamw` optimizer, a documented DEVIATION from the
# official SGD recipe (TrainConfig's default): with 6 epochs x 25 steps, SGD at any base_lr of the official
# grid stayed near chance or below linear (measured, docs/fidelity_notes.md).
DEMO_CONFIG = TrainConfig(
    method="e2vpt",
    num_prompts=4,
    num_kv=2,
    num_segments=16,
    epochs=6,
    warmup_epochs=1,
    batch_size=32,
    base_lr=0.25,
    weight_decay=0.01,
    optimizer="adamw",
    progress=False,
)


# The demo's pruning: 50% of the tokens, 25% of the segments, then rewinding (prompts and head back to
# their initial values) for as many epochs as the first training, so the pruned set can catch up.
DEMO_PRUNE = PruneConfig(token_ratio=0.5, segment_ratio=0.25, rewind_epochs=6)
# On the offline pretrained DINOv2 ViT-S/14 at 56 px (`make demo`'s backbone) an epoch of 800 images costs
# ~14 s on 2 cores (the upstream ViT's ~6 s), and the features are good from the start: 3 + 3 epochs
# (docs/fidelity_notes.md).
# Its lr is the `quick` preset's (DEMO_CONFIG's 0.25 blew up on some tasks of the real mini-VTAB).
REAL_DEMO: dict[str, Any] = {"epochs": 3, "base_lr": PRESETS["quick"]["base_lr"]}


def quick_demo_task(
    task: str = "digits",
    out_dir: str | Path = "runs/demo",
    *,
    task_id: str | None = None,
    backbone: Backbone | None = None,
    prune: bool = True,
    seed: int = 0,
    epochs: int | None = None,
    base_lr: float | None = None,
    register_url: str | None = None,
    register_token: str | None = None,
) -> TaskRun:
    """The demo's fast path: a mini-VTAB task trained with e2vpt (and pruned 50% tokens / 25% segments
    with a short rewind) on `backbone` (default: the cached upstream ViT, `ensure_upstream`), about a
    minute on a CPU. `epochs`: training and rewinding epochs, `base_lr` (defaults: DEMO_CONFIG's); the
    pretrained ViT-S/14 costs more per image, converges sooner and needs the smaller lr of the `quick`
    preset (REAL_DEMO)."""
    from training.data import with_transforms
    from training.synthetic.minivtab import mini_vtab
    from training.synthetic.upstream import ensure_upstream, load_upstream

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if backbone is None:
        backbone = load_upstream(ensure_upstream())
    splits = with_transforms(mini_vtab(task, seed=seed, n_test=500), backbone.info)
    cfg = replace(
        DEMO_CONFIG, seed=seed, epochs=epochs or DEMO_CONFIG.epochs, base_lr=base_lr or DEMO_CONFIG.base_lr
    )
    pcfg = replace(DEMO_PRUNE, rewind_epochs=epochs or DEMO_PRUNE.rewind_epochs) if prune else None
    return run_task(
        backbone,
        splits,
        task_id or f"mini-{task}",
        cfg,
        out_dir,
        prune=pcfg,
        register_url=register_url,
        register_token=register_token,
    )
