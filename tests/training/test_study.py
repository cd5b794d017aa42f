"""The fidelity study's bookkeeping on a tiny backbone: every (task, method, seed) run recorded, mean and
spread over seeds, the segment-layout rows, and the files a reader looks at."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest

from tests.helpers import tiny_backbone
from training.study import StudyConfig, merge_studies, run_study, summarize

# one generated task, a few images, one epoch, small prompts: seconds on a tiny backbone
TINY_STUDY = StudyConfig(
    tasks=("orientation",),
    n_train=32,
    n_val=16,
    n_test=16,
    epochs=1,
    warmup_epochs=0,
    batch_size=16,
    optimizer="adamw",
    base_lr=0.1,
    num_prompts=4,
    num_kv=2,
    num_segments=4,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    cfg = replace(
        TINY_STUDY,
        tasks=("orientation", "position"),
        rewind_epochs=1,
        segment_layouts=("contiguous", "strided"),
        methods=(*StudyConfig.methods, "full"),
        seeds=(0, 1),
    )
    out = tmp_path_factory.mktemp("study")
    return cfg, out, run_study(cfg, out, tiny_backbone(global_pool="avg"))


def test_every_run_is_recorded(study) -> None:
    cfg, _, data = study
    got = {(r["task"], r["method"], r["seed"]) for r in data["rows"]}
    methods = ("linear", "vpt-deep", "e2vpt", "full", "e2vpt-pruned", "e2vpt-pruned-strided")
    assert got == {(t, m, s) for t in cfg.tasks for m in methods for s in cfg.seeds}
    pruned = [r for r in data["rows"] if r["method"].startswith("e2vpt-pruned")]
    assert all(r["tokens_kept"] == 2 for r in pruned)  # half of P = 4 pruned and compacted
    assert data["config"]["optimizer"] == "adamw"
    full = next(r for r in data["rows"] if r["method"] == "full")
    assert full["tuned_percent"] > 90 and full["ms_per_image"] is None  # the whole backbone is tuned


def test_mean_and_spread_over_seeds(study) -> None:
    _, _, data = study
    for method, s in data["summary"].items():
        seed_means = [
            statistics.mean(
                r["test_acc"] for r in data["rows"] if r["method"] == method and r["seed"] == seed
            )
            for seed in (0, 1)
        ]
        assert s["seeds"] == 2
        assert s["mean_test_acc"] == pytest.approx(statistics.mean(seed_means))
        assert s["sd_test_acc"] == pytest.approx(statistics.stdev(seed_means))
        assert s["per_task"]["orientation"]["n"] == s["per_task"]["position"]["n"] == 2


def test_overall_spread_is_over_seed_means() -> None:
    rows = [
        {"task": t, "method": "m", "seed": s, "test_acc": a, "val_acc": a, "tuned_percent": 1.0,
         "tokens_kept": 0, "ms_per_image": None}
        for t, s, a in [("a", 0, 10.0), ("b", 0, 30.0), ("a", 1, 20.0), ("b", 1, 60.0), ("a", 2, 5.0)]
    ]  # fmt: skip
    s = summarize(rows)["m"]
    assert s["seeds"] == 2  # seed 2 misses task b: not in the overall mean
    assert s["mean_test_acc"] == pytest.approx(statistics.mean([20.0, 40.0]))
    assert s["sd_test_acc"] == pytest.approx(statistics.stdev([20.0, 40.0]))
    assert s["per_task"]["a"] == pytest.approx({"mean": 35 / 3, "sd": statistics.stdev([10, 20, 5]), "n": 3})


def test_files_for_readers(study) -> None:
    _, out, data = study
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(data["rows"]))
    md = (out / "results.md").read_text()
    assert "e2vpt-pruned-strided" in md and "±" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_methods_are_checked_and_full_has_its_own_lr() -> None:
    cfg = replace(TINY_STUDY, base_lr=0.1, full_base_lr=0.002)
    assert cfg.train_config("full", 0).base_lr == 0.002 and cfg.train_config("e2vpt", 0).base_lr == 0.1
    with pytest.raises(ValueError, match="unknown methods"):
        replace(TINY_STUDY, methods=("linear", "lora"))
    with pytest.raises(ValueError, match="add e2vpt"):
        replace(TINY_STUDY, methods=("linear", "e2vpt-pruned"))


def test_diverged_runs_are_reported_not_averaged(tmp_path) -> None:
    """SGD at an absurd lr: every run is stopped by the trainer's divergence check; the study records
    each one (no pruning of a diverged e2vpt run), averages none, and says so in results.md."""
    cfg = replace(TINY_STUDY, epochs=2, optimizer="sgd", base_lr=1e6, seeds=(0,))
    data = run_study(cfg, tmp_path, tiny_backbone(global_pool="avg"))
    diverged = {(d["task"], d["method"], d["seed"]) for d in data["diverged"]}
    completed = {(r["task"], r["method"], r["seed"]) for r in data["rows"]}
    assert ("orientation", "e2vpt", 0) in diverged
    assert not diverged & completed
    assert ("orientation", "e2vpt-pruned", 0) not in completed  # nothing to prune
    assert "Diverged" in (tmp_path / "results.md").read_text()


def test_studies_of_single_seeds_merge_into_one(study, tmp_path) -> None:
    """One process per seed, then `merge_studies`: the same summary as one process over both seeds."""
    _, out, data = study
    parts = []
    for seed in (0, 1):
        part = tmp_path / f"s{seed}"
        part.mkdir()
        mine = {**data, "rows": [r for r in data["rows"] if r["seed"] == seed]}
        mine["config"] = {**data["config"], "seeds": [seed]}
        (part / "results.json").write_text(json.dumps(mine))
        parts.append(part)
    merged = merge_studies(parts, tmp_path / "merged")
    assert json.dumps(merged["summary"], sort_keys=True) == json.dumps(data["summary"], sort_keys=True)
    assert list(merged["config"]["seeds"]) == [0, 1]
    assert "the 2 processes that ran it, summed" in (tmp_path / "merged" / "results.md").read_text()
    # a study that stopped before its last task, joined with a run of that task alone
    first, rest = (tmp_path / "first", tmp_path / "rest")
    for part, keep in ((first, data["config"]["tasks"][:-1]), (rest, data["config"]["tasks"][-1:])):
        part.mkdir()
        mine = {**data, "rows": [r for r in data["rows"] if r["task"] in keep], "diverged": []}
        mine["config"] = {**data["config"], "tasks": keep}
        (part / "results.json").write_text(json.dumps(mine))
    joined = merge_studies([first, rest], tmp_path / "joined")
    assert json.dumps(joined["summary"], sort_keys=True) == json.dumps(data["summary"], sort_keys=True)
    with pytest.raises(ValueError, match="more than one study"):
        merge_studies([first, first], tmp_path / "twice")
    # full fine-tuning run on its own later, joined with a study saved before `methods` existed
    legacy, full = (tmp_path / "legacy", tmp_path / "full")
    for part, keep in ((legacy, StudyConfig.methods), (full, ("full",))):
        part.mkdir()
        rows = [r for r in data["rows"] if r["method"].startswith(keep)]
        config = {k: v for k, v in data["config"].items() if k != "methods"}
        config = {**config, "full_finetune": False} if part == legacy else {**config, "methods": list(keep)}
        (part / "results.json").write_text(json.dumps({**data, "rows": rows, "config": config}))
    joined = merge_studies([legacy, full], tmp_path / "joined-methods")
    assert json.dumps(joined["summary"], sort_keys=True) == json.dumps(data["summary"], sort_keys=True)
    assert list(joined["config"]["methods"]) == ["linear", "vpt-deep", "e2vpt", "full", "e2vpt-pruned"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({**data, "config": {**data["config"], "epochs": 9}}))
    with pytest.raises(ValueError, match="share the config"):
        merge_studies([parts[0], other], tmp_path / "bad")
