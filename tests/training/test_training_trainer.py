"""Trainer: every method learns (its loss falls), resume equals an uninterrupted run, the recipe's
schedule and parameter groups, and true tuned-parameter counts."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import ArrayDataset, DataSplits, with_transforms
from training.trainer import (
    PRESETS,
    TrainConfig,
    TrainingDiverged,
    at_chance,
    grid_search,
    initial_prompt_set,
    lr_at,
    param_groups,
    preset_config,
    train,
    tuned_param_count,
)


def colour_splits(backbone, n_train: int = 32, n_val: int = 16, seed: int = 0) -> DataSplits:
    """3 classes: which colour channel is bright, under noise (learnable from a random backbone)."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> ArrayDataset:
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 90, (n, 32, 32, 3))
        x[np.arange(n), :, :, y] += 140
        return ArrayDataset(x.astype(np.uint8), y)

    return with_transforms(
        DataSplits(make(n_train), make(n_val), make(n_val), ["r", "g", "b"], "colours"), backbone.info
    )


@pytest.fixture(scope="module")
def splits(backbone) -> DataSplits:
    return colour_splits(backbone)


BASE = TrainConfig(
    num_prompts=4,
    num_kv=2,
    num_segments=8,
    epochs=3,
    warmup_epochs=1,
    batch_size=8,
    base_lr=1.0,
    progress=False,
)


@pytest.mark.parametrize("method", ["linear", "vpt-deep", "e2vpt", "full"])
def test_each_method_trains_and_loss_falls(backbone, splits, method: str) -> None:
    cfg = replace(BASE, method=method, base_lr=0.2 if method == "full" else BASE.base_lr)
    cfg.__post_init__()
    init = initial_prompt_set("t", backbone, splits.labels, cfg)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    res = train(backbone, splits, cfg, init)
    losses = [h["train_loss"] for h in res.history]
    assert len(losses) == 3 and losses[-1] < losses[0] * 0.8, losses
    assert res.test_acc is not None and res.val_acc > 100 / 3
    P = {"linear": 0, "vpt-deep": 4, "e2vpt": 4, "full": 0}[method]
    T = {"linear": 0, "vpt-deep": 0, "e2vpt": 2, "full": 0}[method]
    assert res.prompts.visual.shape[1] == P and res.prompts.kv.shape[3] == T
    info = backbone.info
    head = 3 * info.embed_dim + 3
    expected = head + info.depth * P * info.embed_dim + info.depth * info.num_heads * T * info.head_dim
    if method == "full":
        expected += res.backbone_params
    assert res.tuned_params == expected
    for k, v in backbone.model.state_dict().items():  # the shared backbone is never modified
        assert torch.equal(v, before[k]), k


def test_resume_equals_uninterrupted_run(backbone, splits, tmp_path: Path) -> None:
    cfg = replace(BASE, method="e2vpt", seed=7, epochs=2)
    init = initial_prompt_set("t", backbone, splits.labels, cfg)
    full = train(backbone, splits, cfg, init, checkpoint=tmp_path / "a.pt")
    part = train(backbone, splits, cfg, init, checkpoint=tmp_path / "b.pt", stop_after=1)
    assert len(part.history) == 1
    resumed = train(backbone, splits, cfg, init, checkpoint=tmp_path / "b.pt", resume=True)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    for k, v in full.prompts.state_dict().items():
        assert torch.equal(v, resumed.prompts.state_dict()[k]), k
    other = train(backbone, splits, replace(cfg, seed=8), init)  # and the seed matters (the test can fail)
    assert not torch.equal(other.prompts.visual, full.prompts.visual)


def test_schedule_and_weight_decay_groups(backbone, splits) -> None:
    assert lr_at(0, 100, 10, 1.0) == 0.0
    assert lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)
    cfg = replace(BASE, batch_size=64, base_lr=0.5)
    assert cfg.lr == pytest.approx(0.125)
    from e2vpt.core.model import PromptedViT, TaskPrompts

    prompts = TaskPrompts.from_prompt_set(initial_prompt_set("t", backbone, splits.labels, cfg))
    groups = param_groups(prompts, PromptedViT(backbone), cfg)
    decay, no_decay = groups
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(prompts.visual), id(prompts.kv), id(prompts.head.weight)}
    assert [id(p) for p in no_decay["params"]] == [id(prompts.head.bias)]


def test_tuned_count_excludes_pruned_entries(backbone, splits) -> None:
    from e2vpt.core.model import TaskPrompts

    cfg = replace(BASE, num_prompts=4, num_kv=0, method="vpt-deep")
    prompts = TaskPrompts.from_prompt_set(initial_prompt_set("t", backbone, splits.labels, cfg))
    full = tuned_param_count(prompts)
    prompts.token_mask[1] = 0
    prompts.segment_mask[0, :4] = 0
    L, D = backbone.info.depth, backbone.info.embed_dim
    assert tuned_param_count(prompts) == full - L * D - L * 4 * (D // 8)


def test_grid_search_picks_best_val(backbone, splits) -> None:
    cfg = replace(BASE, method="linear", epochs=2)
    cfg.__post_init__()
    chosen, table = grid_search(backbone, splits, cfg, "t", lrs=[2.0, 1e-4], wds=[0.0])
    assert len(table) == 2
    best = max(table, key=lambda r: r["val_acc"])
    assert chosen.base_lr == best["base_lr"] and chosen.weight_decay == best["weight_decay"]


def test_adamw_option_trains_and_is_recorded(backbone, splits) -> None:
    """The explicit `optimizer="adamw"` deviation (the demo's recipe): it trains, and the run says so."""
    cfg = replace(BASE, method="e2vpt", optimizer="adamw", base_lr=0.25, weight_decay=0.01)
    res = train(backbone, splits, cfg, initial_prompt_set("t", backbone, splits.labels, cfg))
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0] * 0.8, losses
    assert res.config.to_dict()["optimizer"] == "adamw"
    assert TrainConfig().optimizer == "sgd"  # the official recipe stays the default
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")


def test_presets_paper_is_the_official_default_and_overrides_win() -> None:
    """`paper` is TrainConfig's defaults (the official recipe); `quick` is the AdamW recipe; explicit
    options override a preset field by field; an unknown name is refused."""
    assert preset_config("paper") == TrainConfig()
    quick = preset_config("quick")
    assert quick.optimizer == "adamw" and quick.base_lr == 0.1 and quick.batch_size == 32
    assert quick.warmup_epochs == 1 and 6 <= quick.epochs <= 10 and quick != TrainConfig()
    mixed = preset_config("quick", base_lr=0.1, epochs=2)
    assert (mixed.base_lr, mixed.epochs, mixed.optimizer) == (0.1, 2, "adamw")
    assert set(PRESETS) == {"paper", "quick"}
    with pytest.raises(ValueError, match="preset"):
        preset_config("fast")


def test_divergence_stops_with_a_typed_error_naming_the_lr(backbone, splits) -> None:
    """SGD at an absurd lr: the loss explodes; training stops early with TrainingDiverged naming the lr
    and what to try, instead of running all epochs and exiting 0."""
    cfg = replace(BASE, method="e2vpt", base_lr=1e5, epochs=6, warmup_epochs=0)
    init = initial_prompt_set("t", backbone, splits.labels, cfg)
    epochs_seen: list[int] = []
    with pytest.raises(TrainingDiverged, match=r"base_lr 100000.*--preset quick.*smaller --lr") as info:
        train(backbone, splits, cfg, init, on_epoch=lambda row: epochs_seen.append(int(row["epoch"])))
    assert len(epochs_seen) < cfg.epochs, "stopped before the end"
    assert info.value.code == "training_diverged"
    adamw = replace(cfg, optimizer="adamw")  # on AdamW the hint is the lr alone
    with pytest.raises(TrainingDiverged) as info:
        train(backbone, splits, adamw, init)
    assert "--preset" not in info.value.message and "smaller --lr" in info.value.message
    # in a grid search a diverging point is a bad point, not a failed search
    short = replace(cfg, epochs=2)
    chosen, table = grid_search(backbone, splits, short, "t", lrs=[1e5, 0.5], wds=[0.0])
    assert table[0]["diverged"] and table[0]["val_acc"] is None and chosen.base_lr == 0.5
    with pytest.raises(TrainingDiverged, match="every point"):
        grid_search(backbone, splits, short, "t", lrs=[1e5], wds=[0.0])


def test_divergence_rule_and_chance_level() -> None:
    from training.trainer import _check_divergence

    cfg = replace(BASE, progress=False)
    _check_divergence(1.0, {"epoch": 2, "train_loss": 3.2}, cfg, 3, "t")  # 3 x log(3) = 3.30: fine
    with pytest.raises(TrainingDiverged, match="epoch 2"):
        _check_divergence(1.0, {"epoch": 2, "train_loss": 3.4}, cfg, 3, "t")
    _check_divergence(5.0, {"epoch": 3, "train_loss": 14.0}, cfg, 3, "t")  # a high start: 3 x 5.0
    with pytest.raises(TrainingDiverged):
        _check_divergence(5.0, {"epoch": 3, "train_loss": 16.0}, cfg, 3, "t")
    with pytest.raises(TrainingDiverged, match="epoch 1"):  # no start recorded: log(C) is the reference
        _check_divergence(None, {"epoch": 1, "train_loss": 3.4}, cfg, 3, "t")
    assert at_chance(10.0, 10, 200) and at_chance(14.0, 10, 200) and not at_chance(20.0, 10, 200)
    assert not at_chance(90.0, 2, 200) and at_chance(50.0, 2, 200)
    assert not at_chance(100.0, 2, 2) and at_chance(75.0, 2, 2)  # a tiny val split: half-way at most


def test_a_run_at_chance_warns_and_epochs_report_time_left(backbone, splits, caplog) -> None:
    """lr 0 learns nothing: the result carries a warning saying so. Every epoch logs elapsed and
    estimated remaining time; the first one the estimated total."""
    cfg = replace(BASE, method="e2vpt", base_lr=0.0, epochs=2)
    init = initial_prompt_set("t", backbone, splits.labels, cfg)
    with caplog.at_level(logging.INFO, logger="training.trainer"):
        res = train(backbone, splits, cfg, init, desc="zero")
    assert any("at chance" in w for w in res.summary()["warnings"]), res.val_acc
    epoch_lines = [r.getMessage() for r in caplog.records if "zero epoch" in r.getMessage()]
    assert len(epoch_lines) == 2 and all("elapsed, ~" in m and "left" in m for m in epoch_lines)
    assert any(
        "per epoch -> about" in r.getMessage() and "for 2 epochs" in r.getMessage() for r in caplog.records
    )
