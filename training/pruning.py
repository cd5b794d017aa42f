"""E2VPT pruning and rewinding on top of a trained task.

1. Token importance: |dL/d rho| (or the official signed mean) accumulated over the training data with
   the trained prompts loaded and the token/segment gates held at 1 (`PromptedViT.forward_task` gates).
2. Token pruning: a fixed ratio, or the largest ratio of a small grid whose masked val accuracy stays
   within `tolerance` points of the unpruned model (no retraining inside the search).
3. Segment importance with the token mask applied, then segment pruning inside the kept tokens (same
   ratio-or-grid rule).
4. Rewinding with both masks fixed: `rewind` (default; prompts, KV prompts and head reset to their values
   at the start of training), `reinit` (a fresh random init), `finetune` (continue from trained values).
5. The result is compacted: pruned tokens leave the tensor, pruned segments are stored as zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from e2vpt.core.backbone import Backbone
from e2vpt.core.model import PromptedViT, TaskPrompts
from e2vpt.core.promptset import PromptSet
from e2vpt.core.pruning import kept_indices, segment_mask_from_scores, token_mask_from_scores
from training.data import DataSplits
from training.trainer import (
    TrainConfig,
    TrainResult,
    duration,
    evaluate,
    initial_prompt_set,
    loader,
    train,
)

log = logging.getLogger(__name__)

REWIND_MODES = ("rewind", "reinit", "finetune")
IMPORTANCE_MODES = ("abs", "signed")


@dataclass
class PruneConfig:
    """`token_ratio` / `segment_ratio`: a fraction to prune, or None to search the grid on val."""

    token_ratio: float | None = 0.5
    segment_ratio: float | None = 0.25
    token_grid: Sequence[float] = (0.25, 0.5, 0.75)
    segment_grid: Sequence[float] = (0.125, 0.25, 0.5)
    tolerance: float = 1.0
    importance: str = "abs"
    rewind: str = "rewind"
    rewind_epochs: int | None = None
    importance_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.rewind not in REWIND_MODES:
            raise ValueError(f"unknown rewind mode {self.rewind!r}; expected one of {REWIND_MODES}")
        if self.importance not in IMPORTANCE_MODES:
            raise ValueError(
                f"unknown importance mode {self.importance!r}; expected one of {IMPORTANCE_MODES}"
            )
        for r in (self.token_ratio, self.segment_ratio, *self.token_grid, *self.segment_grid):
            if r is not None and not 0.0 <= r < 1.0:
                raise ValueError(f"pruning ratios must be in [0, 1), got {r}")


_TOLERANCE_NOTE = {None: "", True: " (within tolerance)", False: " (beyond tolerance)"}


@dataclass
class PruneResult:
    """What pruning produced. `prompt_set` is the SAVED set (`saved`: "rewound", or "unpruned" when
    `auto` found no level within tolerance after rewinding) and `retrain` the run whose values it holds
    (the rewinding run, or the first training for "unpruned"); masks and ratios are the saved set's.
    `attempts`: every pruning level tried, with val before pruning, pruned (masked, no retraining) and
    after rewinding."""

    prompt_set: PromptSet
    token_mask: Tensor
    segment_mask: Tensor
    token_ratio: float
    segment_ratio: float
    token_importance: Tensor
    segment_importance: Tensor
    before: dict[str, float | None]
    after: dict[str, float | None]
    retrain: TrainResult
    search: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    saved: str = "rewound"
    attempts: list[dict[str, Any]] = field(default_factory=list)
    tolerance: float | None = None  # set with `auto` (the promise checked after rewinding)

    def summary(self) -> dict[str, Any]:
        last = self.attempts[-1] if self.attempts else {}
        return {
            "token_ratio": self.token_ratio,
            "segment_ratio": self.segment_ratio,
            "kept_tokens": kept_indices(self.token_mask),
            "segment_mask": self.segment_mask.int().tolist(),
            "rewind": self.prompt_set.config.rewind,
            "saved": self.saved,
            "val_acc": {  # of the saved level (for "unpruned": of the last level tried)
                "before_pruning": self.before["val_acc"],
                "pruned_masked": last.get("pruned_val_acc"),
                "after_rewinding": last.get("rewound_val_acc"),
                "saved_set": self.retrain.val_acc,
            },
            "tolerance": self.tolerance,
            "attempts": [{k: v for k, v in a.items() if k != "history"} for a in self.attempts],
            "before": self.before,
            "after": self.after,
            "search": self.search,
        }

    def lines(self) -> list[str]:
        """The outcome in a few lines: each level tried (val before -> pruned -> rewound) and the saved set."""
        out = [
            f"pruning tokens {a['token_ratio']:g} / segments {a['segment_ratio']:g}: val "
            f"{a['before_val_acc']:.2f} before pruning -> {a['pruned_val_acc']:.2f} pruned (masked) -> "
            f"{a['rewound_val_acc']:.2f} after {a['rewind']}" + _TOLERANCE_NOTE[a["within_tolerance"]]
            for a in self.attempts
        ]
        if self.saved == "unpruned":
            out.append(
                f"saved: the UNPRUNED set (val {self.retrain.val_acc:.2f}): no pruning level stayed within "
                f"{self.tolerance:g} points after rewinding"
            )
        else:
            out.append(
                f"saved: the pruned set after {self.prompt_set.config.rewind} (tokens {self.token_ratio:g}, "
                f"segments {self.segment_ratio:g}; val {self.retrain.val_acc:.2f})"
            )
        return out


def importance(
    model: PromptedViT,
    prompts: TaskPrompts,
    ds: Dataset,
    *,
    mode: str = "abs",
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """(token scores [P], segment scores [P, R]) over one pass of `ds`, gates at 1, no dropout.

    abs (paper, default): mean over batches of |dL/d gate|; signed (official code): the mean signed
    dL/d gate, whose most negative entries are pruned first. Either way: lower = pruned first."""
    model.eval()
    prompts.eval()
    P, R = prompts.segment_mask.shape
    device = prompts.visual.device
    tok_acc, seg_acc = torch.zeros(P), torch.zeros(P, R)
    n = 0
    for x, y in loader(ds, batch_size, shuffle=False):
        tg = torch.ones(P, device=device, requires_grad=True)
        sg = torch.ones(P, R, device=device, requires_grad=True)
        loss = F.cross_entropy(
            model.forward_task(x.to(device), prompts, token_gate=tg, segment_gate=sg), y.to(device)
        )
        gt, gs = torch.autograd.grad(loss, [tg, sg])
        if mode == "abs":
            tok_acc += gt.abs().cpu()
            seg_acc += gs.abs().cpu()
        else:
            tok_acc += gt.cpu()
            seg_acc += gs.cpu()
        n += 1
    tok, seg = tok_acc / max(n, 1), seg_acc / max(n, 1)
    return tok, seg


def _masked_val(model: PromptedViT, prompts: TaskPrompts, ds: Dataset, tok: Tensor, seg: Tensor) -> float:
    p = TaskPrompts(
        prompts.visual.detach(),
        prompts.kv.detach(),
        prompts.head.weight.detach(),
        prompts.head.bias.detach(),
        prompt_dropout=0.0,
        token_mask=tok,
        segment_mask=seg,
        segment_layout=prompts.segment_layout,
    ).to(prompts.visual.device)
    return evaluate(model, p, ds)[0]


def _pick(candidates: list[dict[str, float]], reference: float, tolerance: float) -> float:
    """Largest ratio whose val accuracy is within `tolerance` of `reference`; else the best one."""
    ok = [c for c in candidates if c["val_acc"] >= reference - tolerance]
    if ok:
        return max(c["ratio"] for c in ok)
    return max(candidates, key=lambda c: (c["val_acc"], -c["ratio"]))["ratio"]


def prune_and_rewind(
    backbone: Backbone,
    splits: DataSplits,
    trained: TrainResult,
    template: PromptSet,
    config: TrainConfig,
    prune: PruneConfig,
    *,
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> PruneResult:
    """Prune a trained e2vpt / vpt-deep task, retrain it with the masks fixed, and compact it.

    `template` is the set the run started from (its values are the `rewind` target).

    Fixed ratios: pruned, rewound and saved as asked. With `auto` (a ratio of None) the tolerance is a
    promise about the SAVED set: when the rewound set's val accuracy is below the unpruned one minus
    `tolerance`, the next smaller level of each `auto` grid is tried (down to 0), and when no level
    holds, the unpruned set is kept (and the result says so). Each level tried costs one rewinding."""
    model, prompts = trained.model, trained.prompts
    P, R = prompts.segment_mask.shape
    if P == 0:
        raise ValueError("nothing to prune: the task has no visual prompts")
    ones_s = torch.ones(P, R)
    search: dict[str, list[dict[str, float]]] = {}

    def val_with(tok: Tensor, seg: Tensor) -> float:
        return _masked_val(model, prompts, splits.val, tok, seg)

    def scores() -> tuple[Tensor, Tensor]:
        return importance(
            model, prompts, splits.train, mode=prune.importance, batch_size=prune.importance_batch_size
        )

    def segment_scores(tok_mask: Tensor) -> Tensor:
        with torch.no_grad():  # segment importance of the kept tokens only
            prompts.token_mask.copy_(tok_mask)
        try:
            return scores()[1]
        finally:
            with torch.no_grad():
                prompts.token_mask.fill_(1)

    ref = val_with(torch.ones(P), ones_s)
    tok_scores, _ = scores()
    token_ratio = _choose_ratio(
        prune.token_ratio,
        prune.token_grid,
        lambda r: val_with(token_mask_from_scores(tok_scores, r), ones_s),
        lambda: ref,
        prune.tolerance,
        search,
        "token",
    )
    tok_mask = token_mask_from_scores(tok_scores, token_ratio)
    seg_scores = segment_scores(tok_mask)
    segment_ratio = _choose_ratio(
        prune.segment_ratio,
        prune.segment_grid,
        lambda r: val_with(tok_mask, segment_mask_from_scores(seg_scores, tok_mask, r)),
        lambda: val_with(tok_mask, ones_s),
        prune.tolerance,
        search,
        "segment",
    )
    auto = prune.token_ratio is None or prune.segment_ratio is None
    rcfg = _retrain_config(config, prune)
    attempts: list[dict[str, Any]] = []
    kept: tuple[Tensor, Tensor, float, float, TrainResult] | None = None
    while True:
        seg_mask = segment_mask_from_scores(seg_scores, tok_mask, segment_ratio)
        pruned_val = val_with(tok_mask, seg_mask)
        log.info(
            "pruned %d/%d tokens and %.0f%% of kept segments: val %.2f -> %.2f before rewinding; %s %d epochs "
            "(about %s at the first training's pace)",
            int(P - tok_mask.sum()), P, 100 * segment_ratio, ref, pruned_val, prune.rewind, rcfg.epochs,
            duration(trained.train_seconds / max(len(trained.history), 1) * rcfg.epochs),
        )  # fmt: skip
        retrained = train(
            backbone,
            splits,
            rcfg,
            _rewind_start(backbone, trained, template, config, prune.rewind),
            token_mask=tok_mask,
            segment_mask=seg_mask,
            checkpoint=_attempt_checkpoint(checkpoint, len(attempts)),
            resume=resume,
            desc=f"{prune.rewind}",
        )
        holds = retrained.val_acc >= ref - prune.tolerance if auto else None
        attempts.append(
            {
                "token_ratio": token_ratio,
                "segment_ratio": segment_ratio,
                "rewind": prune.rewind,
                "before_val_acc": ref,
                "pruned_val_acc": pruned_val,
                "rewound_val_acc": retrained.val_acc,
                "rewound_test_acc": retrained.test_acc,
                "within_tolerance": holds,
                "history": retrained.history,
            }
        )
        if not auto or holds:
            kept = (tok_mask, seg_mask, token_ratio, segment_ratio, retrained)
            break
        smaller = (
            _next_smaller(token_ratio, prune.token_grid) if prune.token_ratio is None else token_ratio,
            _next_smaller(segment_ratio, prune.segment_grid)
            if prune.segment_ratio is None
            else segment_ratio,
        )
        log.warning(
            "after %s: val %.2f is more than %g points below the unpruned %.2f at tokens %g / segments %g; %s",
            prune.rewind, retrained.val_acc, prune.tolerance, ref, token_ratio, segment_ratio,
            "keeping the unpruned set" if smaller in ((token_ratio, segment_ratio), (0.0, 0.0))
            else f"trying tokens {smaller[0]:g} / segments {smaller[1]:g}",
        )  # fmt: skip
        if smaller in ((token_ratio, segment_ratio), (0.0, 0.0)):
            break
        if smaller[0] != token_ratio:
            tok_mask = token_mask_from_scores(tok_scores, smaller[0])
            seg_scores = segment_scores(tok_mask)
        token_ratio, segment_ratio = smaller
    for k in range(1, len(attempts)):  # the extra levels' checkpoints (the first one is the caller's)
        extra = _attempt_checkpoint(checkpoint, k)
        if extra is not None:
            extra.unlink(missing_ok=True)

    before = {
        "val_acc": trained.val_acc,
        "test_acc": trained.test_acc,
        "pruned_val_acc_no_retrain": pruned_val,
    }
    if kept is None:  # auto, and no level held after rewinding: the unpruned set, as trained
        ps = trained.prompts.to_prompt_set(template, pruned=False)
        ps.config = template.config.updated(token_ratio=0.0, segment_ratio=0.0, importance=prune.importance)
        tok_mask, seg_mask, token_ratio, segment_ratio, saved = torch.ones(P), ones_s, 0.0, 0.0, trained
        saved_name = "unpruned"
    else:
        tok_mask, seg_mask, token_ratio, segment_ratio, saved = kept
        masked = saved.prompts.to_prompt_set(template, pruned=True)
        masked.config = template.config.updated(
            token_ratio=token_ratio,
            segment_ratio=segment_ratio,
            importance=prune.importance,
            rewind=prune.rewind,
            token_mask=tok_mask.int().tolist(),
        )
        ps = masked.compact()
        saved_name = "rewound"
    after = {"val_acc": saved.val_acc, "test_acc": saved.test_acc}
    ps.metrics = {
        **ps.metrics,
        "before_pruning": before,
        "after_pruning": after,
        "pruning_saved": saved_name,
        "tuned_params_before": trained.tuned_params,
        "tuned_params_after": ps.num_parameters,
    }
    return PruneResult(
        prompt_set=ps,
        token_mask=tok_mask,
        segment_mask=seg_mask,
        token_ratio=token_ratio,
        segment_ratio=segment_ratio,
        token_importance=tok_scores,
        segment_importance=seg_scores,
        before=before,
        after=after,
        retrain=saved,
        search=search,
        saved=saved_name,
        attempts=attempts,
        tolerance=prune.tolerance if auto else None,
    )


def _next_smaller(ratio: float, grid: Sequence[float]) -> float:
    """The next level below `ratio` on an `auto` grid; 0 (no pruning) below its smallest."""
    return max((r for r in grid if r < ratio), default=0.0)


def _attempt_checkpoint(checkpoint: str | Path | None, attempt: int) -> Path | None:
    """The rewinding checkpoint of level `attempt` (the caller's path for the first), so `resume`
    continues each level from its own state."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    return path if attempt == 0 else path.with_name(f"{path.stem}.{attempt}{path.suffix}")


def _choose_ratio(
    fixed: float | None,
    grid: Sequence[float],
    val_at: Callable[[float], float],
    reference: Callable[[], float],
    tolerance: float,
    search: dict[str, list[dict[str, float]]],
    name: str,
) -> float:
    """The pruning ratio: `fixed`, or (None) the grid searched on val against `reference` (the rows are
    recorded in `search[name]`)."""
    if fixed is not None:
        return fixed
    ref = reference()
    rows = [{"ratio": r, "val_acc": val_at(r)} for r in grid]
    search[name] = rows
    return _pick(rows, ref, tolerance)


def _rewind_start(
    backbone: Backbone, trained: TrainResult, template: PromptSet, config: TrainConfig, rewind: str
) -> PromptSet:
    """Which values the retraining starts from: the initial ones (`rewind`), fresh ones (`reinit`) or the
    trained ones (`finetune`)."""
    if rewind == "rewind":
        return _with_state(template, trained.init_state)
    if rewind == "reinit":
        start = initial_prompt_set(template.task_id, backbone, template.labels, config, seed=config.seed + 1)
        return replace(
            template,
            visual=start.visual,
            kv=start.kv,
            head_weight=start.head_weight,
            head_bias=start.head_bias,
        )
    return trained.prompts.to_prompt_set(template, pruned=False)


def _retrain_config(config: TrainConfig, prune: PruneConfig) -> TrainConfig:
    rcfg = replace(config, epochs=prune.rewind_epochs or config.epochs)
    if prune.rewind_epochs:
        rcfg.warmup_epochs = min(config.warmup_epochs, prune.rewind_epochs)
    return rcfg


def _with_state(template: PromptSet, state: dict[str, Tensor]) -> PromptSet:
    """`template` with the recorded TaskPrompts state (the values at the start of training)."""
    return replace(
        template,
        visual=state["visual"].clone(),
        kv=state["kv"].clone(),
        head_weight=state["head.weight"].clone(),
        head_bias=state["head.bias"].clone(),
    )
