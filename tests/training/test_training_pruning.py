"""Pruning: the requested tokens and segments go, the compacted set serves the masked model's logits
through TaskBatch / forward_multi, and the three rewinding modes start from the documented values."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_training_trainer import colour_splits

from e2vpt.core.model import PromptedViT, TaskBatch, TaskPrompts
from e2vpt.core.pruning import prune_count, segment_mask_from_scores, token_mask_from_scores
from training.pruning import PruneConfig, importance, prune_and_rewind
from training.trainer import TrainConfig, initial_prompt_set, train

CFG = TrainConfig(
    method="e2vpt", num_prompts=6, num_kv=2, num_segments=8, epochs=2, warmup_epochs=1, batch_size=16,
    base_lr=2.0, progress=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(backbone):
    splits = colour_splits(backbone, n_train=32, n_val=16)
    init = initial_prompt_set("colours", backbone, splits.labels, CFG)
    return splits, init, train(backbone, splits, CFG, init)


def test_mask_selection_math() -> None:
    scores = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert token_mask_from_scores(scores, 0.4).tolist() == [1, 0, 1, 0, 1]  # lowest two; ties to lower index
    assert token_mask_from_scores(scores, 0.99).sum() == 1  # at least one token is kept
    seg = torch.arange(20.0).reshape(5, 4).flip(1)
    m = segment_mask_from_scores(seg, torch.tensor([1, 0, 1, 0, 1]), 0.5)
    assert m[1].sum() == 0 and m[3].sum() == 0
    assert m[0].tolist() == [1, 1, 0, 0]
    assert prune_count(16, 0.25) == 4
    with pytest.raises(ValueError):
        prune_count(4, 1.5)


def test_importance_is_gate_gradient(backbone, trained) -> None:
    splits, _, res = trained
    tok, seg = importance(res.model, res.prompts, splits.train, mode="signed", batch_size=64)
    # one batch: the token gate's gradient is the sum of its segments' gradients
    assert torch.allclose(tok, seg.sum(1), rtol=1e-3, atol=1e-9)
    tok_abs, _ = importance(res.model, res.prompts, splits.train, mode="abs", batch_size=64)
    assert torch.allclose(tok_abs, tok.abs(), rtol=1e-5, atol=1e-12)
    assert tok_abs.abs().sum() > 0


@pytest.mark.parametrize("mode", ["rewind", "reinit", "finetune"])
def test_prune_compact_and_rewind(backbone, trained, mode: str) -> None:
    splits, init, res = trained
    pr = prune_and_rewind(
        backbone,
        splits,
        res,
        init,
        CFG,
        PruneConfig(token_ratio=0.5, segment_ratio=0.25, rewind=mode, rewind_epochs=1),
    )
    ps = pr.prompt_set
    assert ps.num_prompts == 3 and ps.token_mask is None  # 3 of 6 tokens removed from the tensor
    assert ps.config["kept_token_indices"] == torch.nonzero(pr.token_mask).flatten().tolist()
    assert ps.segment_mask.shape == (3, 8) and ps.segment_mask.sum(1).tolist() == [
        6,
        6,
        6,
    ]  # 2 of 8 pruned each
    ps.validate(backbone.info)
    assert ps.metrics["before_pruning"]["val_acc"] == res.val_acc
    assert ps.metrics["after_pruning"]["val_acc"] == pr.retrain.val_acc
    assert ps.num_parameters < res.tuned_params

    # the compacted set serves exactly the masked model's logits, alone and in a mixed batch
    model = PromptedViT(backbone)
    x = torch.stack([splits.val[i][0] for i in range(6)])
    masked = pr.retrain.prompts.eval()
    expected = model.forward_task(x, masked)
    other = initial_prompt_set(
        "other", backbone, ["a", "b", "c", "d", "e"], replace(CFG, num_prompts=2, num_kv=3)
    )
    batch = TaskBatch.from_prompt_sets([other, ps])
    idx = torch.tensor([1, 0, 1, 1, 0, 1])
    with torch.no_grad():
        got = model.forward_multi(x, batch, idx)
    for b in range(6):
        if idx[b] == 1:
            torch.testing.assert_close(got[b, :3], expected[b], atol=1e-4, rtol=0)

    # rewinding: where the retraining started
    start = pr.retrain.init_state
    if mode == "rewind":
        for key, ref in (("visual", init.visual), ("kv", init.kv), ("head.weight", init.head_weight)):
            assert torch.equal(start[key], ref), key
    elif mode == "reinit":
        assert not torch.equal(start["visual"], init.visual)
        assert start["visual"].abs().max() <= backbone.info.visual_init_bound
    else:
        assert torch.equal(start["visual"], res.prompts.visual.detach())
        assert torch.equal(start["kv"], res.prompts.kv.detach())
    assert start["token_mask"].tolist() == pr.token_mask.tolist()


def test_pruning_grid_search_on_val(backbone, trained) -> None:
    splits, init, res = trained
    pr = prune_and_rewind(
        backbone,
        splits,
        res,
        init,
        CFG,
        PruneConfig(token_ratio=None, segment_ratio=None, tolerance=100.0, rewind_epochs=1),
    )
    # with an unlimited tolerance the largest level of each grid is chosen
    assert pr.token_ratio == 0.75 and pr.segment_ratio == 0.5
    assert [r["ratio"] for r in pr.search["token"]] == [0.25, 0.5, 0.75]
    assert pr.prompt_set.num_prompts == 6 - prune_count(6, 0.75)
    assert pr.saved == "rewound" and len(pr.attempts) == 1 and pr.attempts[0]["within_tolerance"] is True


def test_prune_needs_visual_prompts(backbone, trained) -> None:
    splits, _, _ = trained
    cfg = replace(CFG, method="linear")
    cfg.__post_init__()
    init = initial_prompt_set("lin", backbone, splits.labels, cfg)
    res = train(backbone, splits, replace(cfg, epochs=1), init)
    with pytest.raises(ValueError, match="no visual prompts"):
        prune_and_rewind(backbone, splits, res, init, cfg, PruneConfig())
    assert isinstance(res.prompts, TaskPrompts)


def test_auto_keeps_its_tolerance_after_rewinding(backbone, trained) -> None:
    """A rewinding that cannot recover (lr 0: the rewound set is the initial one, at chance). With `auto`
    every smaller level is tried and finally the unpruned set is kept, saying so; with fixed ratios the
    rewound set is kept as asked (the fidelity study relies on it), and both report the three numbers."""
    splits, init, res = trained
    assert res.val_acc > 60, "precondition: the trained task is well above chance"
    stuck = replace(CFG, base_lr=0.0)
    auto = PruneConfig(token_ratio=None, segment_ratio=None, tolerance=1.0, rewind_epochs=1)
    pr = prune_and_rewind(backbone, splits, res, init, stuck, auto)
    assert pr.saved == "unpruned" and pr.retrain is res
    assert pr.token_ratio == 0.0 and pr.segment_ratio == 0.0 and pr.token_mask.all()
    assert torch.equal(pr.prompt_set.visual, res.prompts.visual.detach().cpu())
    assert pr.prompt_set.num_prompts == CFG.num_prompts and pr.prompt_set.token_mask is None
    levels = [(a["token_ratio"], a["segment_ratio"]) for a in pr.attempts]
    assert len(levels) >= 2 and levels == sorted(levels, reverse=True) and len(set(levels)) == len(levels)
    assert all(a["within_tolerance"] is False for a in pr.attempts)
    summary = pr.summary()
    assert summary["saved"] == "unpruned" and summary["val_acc"]["saved_set"] == res.val_acc
    assert set(summary["val_acc"]) == {"before_pruning", "pruned_masked", "after_rewinding", "saved_set"}
    assert "UNPRUNED" in pr.lines()[-1] and "before pruning" in pr.lines()[0]
    assert pr.prompt_set.metrics["pruning_saved"] == "unpruned"

    fixed = PruneConfig(token_ratio=0.5, segment_ratio=0.25, tolerance=1.0, rewind_epochs=1)
    pr = prune_and_rewind(backbone, splits, res, init, stuck, fixed)
    assert pr.saved == "rewound" and len(pr.attempts) == 1 and pr.attempts[0]["within_tolerance"] is None
    assert pr.prompt_set.num_prompts == 3 and pr.retrain.val_acc < res.val_acc - 1.0
    numbers = pr.summary()["val_acc"]
    assert numbers["before_pruning"] == res.val_acc and numbers["after_rewinding"] == pr.retrain.val_acc
    assert numbers["pruned_masked"] == pr.before["pruned_val_acc_no_retrain"]
