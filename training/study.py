"""The fidelity study: linear, vpt-deep, e2vpt and pruned e2vpt (optionally full fine-tuning) on mini-VTAB
tasks, with the same budget (epochs, batch, optimizer, lr schedule) for every method, over several training
seeds (the data splits stay fixed, as VTAB-1k's do). Writes every run (JSON), a Markdown table of mean and
spread (sample standard deviation over seeds) per task and overall, and a PNG plot: accuracy per task and
accuracy against tuned parameters.

The overall spread is taken over the seeds' task means (seed s's mean over tasks, then mean and sd of
those), so it says how much the headline number moves when the whole study is rerun with another seed.
`segment_layouts` adds pruned rows for other segment layouts (`e2vpt-pruned-strided`): the layout only
matters once segments are masked, so each one prunes and rewinds the same trained e2vpt run."""

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
from matplotlib.ticker import NullFormatter  # noqa: E402

from e2vpt.core.backbone import Backbone  # noqa: E402
from e2vpt.core.model import PromptedViT, TaskBatch  # noqa: E402
from e2vpt.core.promptset import PromptSet  # noqa: E402
from e2vpt.errors import TrainingDiverged  # noqa: E402
from training.data import with_transforms  # noqa: E402
from training.pruning import PruneConfig, prune_and_rewind  # noqa: E402
from training.report import save_figure, write_json  # noqa: E402
from training.synthetic.minivtab import REAL_SUITE, TASK_GROUPS, TASKS, max_test_images, mini_vtab  # noqa: E402
from training.synthetic.upstream import load_upstream  # noqa: E402
from training.trainer import PRESETS, TrainConfig, TrainResult, initial_prompt_set, train  # noqa: E402

log = logging.getLogger(__name__)
TRAINED = ("linear", "vpt-deep", "e2vpt", "full")  # methods trained from scratch
PRUNED = "e2vpt-pruned"  # pruned and rewound from the e2vpt run, once per segment layout
METHODS = (*TRAINED, PRUNED)


@dataclass(frozen=True)
class StudyConfig:
    tasks: tuple[str, ...] = TASKS
    n_train: int = 800
    n_val: int = 200
    n_test: int = 1000
    epochs: int = 10
    warmup_epochs: int = 2
    batch_size: int = 64
    optimizer: str = "sgd"
    base_lr: float = 0.5
    # full fine-tuning moves pretrained weights, not fresh prompts: its own (much smaller) lr
    full_base_lr: float = 0.001
    weight_decay: float = 1e-4
    num_prompts: int = 10
    num_kv: int = 5
    num_segments: int = 16
    prune_tokens: float = 0.5
    prune_segments: float = 0.25
    rewind: str = "rewind"
    rewind_epochs: int | None = None  # None: as many as training
    segment_layouts: tuple[str, ...] = ("contiguous",)
    methods: tuple[str, ...] = ("linear", "vpt-deep", "e2vpt", PRUNED)  # of METHODS ("full": slow)
    seeds: tuple[int, ...] = (0,)
    data_seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
        if PRUNED in self.methods and "e2vpt" not in self.methods:
            raise ValueError(f"{PRUNED} prunes the e2vpt run: add e2vpt to the methods")

    @classmethod
    def quick(cls) -> StudyConfig:
        """The generated mini-VTAB on the offline upstream ViT, a few minutes."""
        return cls(n_train=512, n_val=200, n_test=300, epochs=5, warmup_epochs=1, batch_size=32)

    @classmethod
    def real(cls) -> StudyConfig:
        """The real mini-VTAB on the pretrained DINOv2 ViT-S/14 at 56 px, 3 seeds: about 75 minutes on a
        2-core CPU with one process per seed (measured: 44 min for the three 800-image tasks photo-textures,
        fashion-rotation and fashion-position). AdamW (a documented deviation from the official SGD recipe,
        which diverges on these features at the official lr; docs/fidelity_notes.md), the same budget for
        every method: the `quick` training preset's optimizer, lr, decay and batch, with 4 epochs (25 steps
        each) and 4 rewinding epochs instead of its 8."""
        quick = PRESETS["quick"]
        return cls(
            tasks=REAL_SUITE,
            n_train=800,
            n_val=200,
            n_test=500,
            epochs=4,
            warmup_epochs=quick["warmup_epochs"],
            batch_size=quick["batch_size"],
            optimizer=quick["optimizer"],
            base_lr=quick["base_lr"],
            weight_decay=quick["weight_decay"],
            rewind_epochs=4,
            seeds=(0, 1, 2),
        )

    @classmethod
    def real_quick(cls) -> StudyConfig:
        """Three real tasks, one seed, fewer images: 6.6 minutes on a quiet 2-core CPU (OMP_NUM_THREADS=2)."""
        return replace(
            cls.real(),
            tasks=("fashion", "photo-textures", "fashion-rotation"),
            n_train=400,
            n_val=200,
            n_test=300,
            epochs=3,
            rewind_epochs=3,
            seeds=(0,),
        )

    def train_config(self, method: str, seed: int) -> TrainConfig:
        return TrainConfig(
            method=method,
            epochs=self.epochs,
            warmup_epochs=self.warmup_epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            base_lr=self.full_base_lr if method == "full" else self.base_lr,
            weight_decay=self.weight_decay,
            num_prompts=self.num_prompts,
            num_kv=self.num_kv,
            num_segments=self.num_segments,
            seed=seed,
            progress=False,
        )


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


def pruned_name(layout: str) -> str:
    return "e2vpt-pruned" if layout == "contiguous" else f"e2vpt-pruned-{layout}"


def run_study(cfg: StudyConfig, out_dir: str | Path, backbone: Backbone | None = None) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = backbone or load_upstream()
    model = PromptedViT(backbone)
    methods = [m for m in TRAINED if m in cfg.methods]
    meta = {
        "backbone": backbone.info.name,
        "fingerprint": backbone.info.fingerprint,
        "img_size": list(backbone.info.img_size),
        "torch_threads": torch.get_num_threads(),
    }
    rows: list[dict[str, Any]] = []
    diverged: list[dict[str, Any]] = []  # runs stopped by the trainer's divergence check
    t_start = time.perf_counter()
    runs = len(cfg.tasks) * len(cfg.seeds)
    splits_of: dict[str, Any] = {}
    # seed-major: a study cut short still has every task for the seeds it finished
    for seed in cfg.seeds:
        for task in cfg.tasks:
            if task not in splits_of:
                splits_of[task] = with_transforms(
                    mini_vtab(
                        task,
                        seed=cfg.data_seed,
                        n_test=max_test_images(task, cfg.n_test),
                        n_train=cfg.n_train,
                        n_val=cfg.n_val,
                    ),
                    backbone.info,
                )
            splits = splits_of[task]
            x_time = torch.stack([splits.val[i][0] for i in range(min(64, len(splits.val)))])
            done = len({(r["task"], r["seed"]) for r in rows})
            elapsed = time.perf_counter() - t_start
            eta = f", about {elapsed / done * (runs - done) / 60:.0f} min left" if done else ""
            log.info("study: %s seed %d (%d/%d task-seeds done%s)", task, seed, done, runs, eta)
            e2vpt: tuple[TrainResult, PromptSet] | None = None
            for method in methods:
                mcfg = cfg.train_config(method, seed)
                init = initial_prompt_set(f"mini-{task}", backbone, splits.labels, mcfg)
                try:
                    res = train(backbone, splits, mcfg, init, desc=f"{task}/{method}/seed{seed}")
                except TrainingDiverged as exc:  # reported with the results, never averaged in
                    log.warning("%s %s seed %d diverged: %s", task, method, seed, exc.message)
                    diverged.append({"task": task, "method": method, "seed": seed, "error": exc.message})
                    continue
                ps = res.prompts.to_prompt_set(init, pruned=False)
                rows.append(_row(task, method, seed, res.val_acc, res.test_acc, ps, res, model, x_time))
                log.info("%s %s seed %d: val %.2f test %.2f", task, method, seed, res.val_acc, res.test_acc)
                if method == "e2vpt":
                    e2vpt = (res, init)
            for layout in cfg.segment_layouts if e2vpt is not None and PRUNED in cfg.methods else ():
                name = pruned_name(layout)
                try:
                    pr = _prune(backbone, splits, *e2vpt, cfg, layout)
                except TrainingDiverged as exc:
                    log.warning("%s %s seed %d diverged: %s", task, name, seed, exc.message)
                    diverged.append({"task": task, "method": name, "seed": seed, "error": exc.message})
                    continue
                rows.append(
                    _row(task, name, seed, pr.retrain.val_acc, pr.retrain.test_acc, pr.prompt_set, e2vpt[0], model, x_time)
                )  # fmt: skip
                log.info(
                    "%s %s seed %d: val %.2f test %.2f",
                    task,
                    name,
                    seed,
                    pr.retrain.val_acc,
                    pr.retrain.test_acc,
                )
            _write(rows, diverged, cfg, out, time.perf_counter() - t_start, meta)  # partial results survive
    return _write(rows, diverged, cfg, out, time.perf_counter() - t_start, meta)


def merge_studies(parts: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """One study from several runs of the same training budget over different seeds, tasks or methods (e.g.
    one process per seed, so every core trains; the tasks a cut-short study did not reach; full fine-tuning
    run later): rows and diverged runs joined, seeds, tasks and methods joined, seconds summed (CPU-bound
    processes in parallel: the sum is the one-process cost, the wall time was shorter). A (task, method,
    seed) run found in two parts is refused."""
    import json

    datas = [json.loads((Path(p) / "results.json").read_text()) for p in parts]
    configs = [_config_json(d["config"]) for d in datas]
    first = datas[0]
    joined = ("seeds", "tasks", "methods")  # which runs exist; the rest says how every run trains
    for d, c in zip(datas[1:], configs[1:], strict=True):
        same = {k: v for k, v in c.items() if k not in joined} == {
            k: v for k, v in configs[0].items() if k not in joined
        }
        if not same or d["fingerprint"] != first["fingerprint"]:
            raise ValueError(
                "studies to merge must share the config (seeds, tasks and methods aside) and the backbone"
            )
    seen: set[tuple[str, str, int]] = set()
    for d in datas:
        for r in [*d["rows"], *d.get("diverged", [])]:
            key = (r["task"], r["method"], r["seed"])
            if key in seen:
                raise ValueError(f"run {key} is in more than one study to merge")
            seen.add(key)
    tasks = list(dict.fromkeys(t for c in configs for t in c["tasks"]))
    seeds = sorted({s for c in configs for s in c["seeds"]})
    methods = [m for m in METHODS if any(m in c["methods"] for c in configs)]
    config = {**configs[0], "seeds": seeds, "tasks": tasks, "methods": methods}
    cfg = StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    rows = sorted(
        (r for d in datas for r in d["rows"]), key=lambda r: (r["seed"], cfg.tasks.index(r["task"]))
    )
    diverged = [x for d in datas for x in d.get("diverged", [])]
    meta = {k: first[k] for k in ("backbone", "fingerprint", "img_size", "torch_threads")}
    meta["merged_from"] = [
        m for d, p in zip(datas, parts, strict=True) for m in d.get("merged_from", [str(p)])
    ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _write(rows, diverged, cfg, out, sum(d["seconds"] for d in datas), meta)


def _config_json(config: dict[str, Any]) -> dict[str, Any]:
    """A study's config as saved, in today's fields (results saved before `methods` and `full_base_lr`
    existed had `full_finetune`, and the default lr)."""
    config = {"full_base_lr": StudyConfig.full_base_lr, **config}
    if "methods" not in config:
        full = config.pop("full_finetune", False)
        config["methods"] = [*StudyConfig.methods, *(["full"] if full else [])]
    return config


def _prune(backbone: Backbone, splits, trained: TrainResult, init: PromptSet, cfg: StudyConfig, layout: str):
    """Prune and rewind `trained` with segments laid out as `layout` (training never masked a segment, so
    the trained values are the same for every layout)."""
    trained.prompts.segment_layout = layout
    template = replace(init, config=init.config.updated(segment_layout=layout))
    pcfg = PruneConfig(
        token_ratio=cfg.prune_tokens,
        segment_ratio=cfg.prune_segments,
        rewind=cfg.rewind,
        rewind_epochs=cfg.rewind_epochs,
    )
    try:
        return prune_and_rewind(backbone, splits, trained, template, trained.config, pcfg)
    finally:
        trained.prompts.segment_layout = init.config.segment_layout


def _row(task, method, seed, val_acc, test_acc, ps: PromptSet, res, model, x_time) -> dict[str, Any]:
    full = method == "full"  # the whole backbone is tuned: no prompt set to serve or count
    tuned = res.tuned_params if full else ps.num_parameters
    return {
        "task": task,
        "group": TASK_GROUPS[task],
        "method": method,
        "seed": seed,
        "val_acc": val_acc,
        "test_acc": test_acc,
        "tuned_params": tuned,
        "tuned_percent": 100.0 * tuned / res.backbone_params,
        "tokens_kept": ps.num_prompts,
        "kv_tokens": ps.num_kv,
        "ms_per_image": None if full else time_per_image(model, ps, x_time),
        "train_seconds": res.train_seconds,
    }  # fmt: skip


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean and sd over seeds per task, and of the seeds' task means (complete seeds only)."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)]
    out: dict[str, Any] = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        per_task = {}
        for t in tasks:
            accs = [r["test_acc"] for r in mine if r["task"] == t]
            if accs:
                mean, sd = _mean_sd(accs)
                per_task[t] = {"mean": mean, "sd": sd, "n": len(accs)}
        seeds = sorted({r["seed"] for r in mine})
        seed_means = []
        for s in seeds:
            accs = {r["task"]: r["test_acc"] for r in mine if r["seed"] == s}
            if set(accs) == set(per_task):
                seed_means.append(statistics.mean(accs.values()))
        mean, sd = _mean_sd(seed_means) if seed_means else (float("nan"), float("nan"))
        ms = [r["ms_per_image"] for r in mine if r["ms_per_image"] is not None]
        out[m] = {
            "mean_test_acc": mean,
            "sd_test_acc": sd,
            "seeds": len(seed_means),
            "per_task": per_task,
            "mean_val_acc": statistics.mean(r["val_acc"] for r in mine),
            "mean_tuned_percent": statistics.mean(r["tuned_percent"] for r in mine),
            "mean_tokens_kept": statistics.mean(r["tokens_kept"] for r in mine),
            "mean_ms_per_image": statistics.mean(ms) if ms else None,
        }
    return out


def _write(
    rows: list[dict[str, Any]],
    diverged: list[dict[str, Any]],
    cfg: StudyConfig,
    out: Path,
    seconds: float,
    meta: dict[str, Any],
) -> dict[str, Any]:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    summary = summarize(rows)
    data = {
        "config": asdict(cfg),
        **meta,
        "seconds": seconds,
        "tasks": tasks,
        "rows": rows,
        "diverged": diverged,
        "summary": summary,
    }
    write_json(data, out / "results.json")
    (out / "results.md").write_text(_markdown(summary, diverged, tasks, cfg, seconds, meta))
    _plot(summary, tasks, out / "results.png")
    return data


def _markdown(summary, diverged, tasks, cfg: StudyConfig, seconds: float, meta: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, cfg.seeds))
    lines = [
        f"# Fidelity study ({meta['backbone']} at {meta['img_size'][0]} px; {cfg.n_train} train / "
        f"{cfg.n_val} val / up to {cfg.n_test} test; {cfg.epochs} epochs {cfg.optimizer} base lr {cfg.base_lr}"
        + (f" (full fine-tuning {cfg.full_base_lr})" if "full" in cfg.methods else "")
        + f"; seeds {seeds}; {seconds / 60:.1f} min"
        + (
            f", the wall times of the {len(meta['merged_from'])} processes that ran it, summed)"
            if "merged_from" in meta
            else ")"
        ),
        "",
        "Test accuracy (%), mean ± sd over seeds per task; the mean column is the mean over seeds of each "
        "seed's mean over tasks, ± its sd.",
        "",
        "| method | " + " | ".join(tasks) + " | mean | tuned params % | tokens kept | ms / image |",
        "|---|" + "---|" * (len(tasks) + 4),
    ]
    for m, s in summary.items():
        cells = []
        for t in tasks:
            pt = s["per_task"].get(t)
            cells.append(f"{pt['mean']:.1f} ± {pt['sd']:.1f}" if pt else "-")
        ms = f"{s['mean_ms_per_image']:.3f}" if s["mean_ms_per_image"] is not None else "-"
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | **{s['mean_test_acc']:.2f} ± {s['sd_test_acc']:.2f}** | "
            f"{s['mean_tuned_percent']:.3f} | {s['mean_tokens_kept']:.1f} | {ms} |"
        )
    if diverged:
        lines += [
            "",
            f"Diverged (stopped by the trainer, not in the means; a seed missing a task is left out of "
            f"that method's overall mean): {len(diverged)} run(s)",
            "",
        ]
        lines += [f"- {d['task']} / {d['method']} / seed {d['seed']}: {d['error']}" for d in diverged]
    return "\n".join(lines) + "\n"


def _plot(summary, tasks, path: Path) -> None:
    methods = list(summary)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[3, 1.3])
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        s = summary[m]
        xs = [j + i * width for j in range(len(tasks) + 1)]
        ys = [s["per_task"].get(t, {}).get("mean", 0.0) for t in tasks] + [s["mean_test_acc"]]
        err = [s["per_task"].get(t, {}).get("sd", 0.0) for t in tasks] + [s["sd_test_acc"]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks) + 1)], [*tasks, "mean"], rotation=15)
    ax.set(ylabel="test accuracy (%)", title="test accuracy per task (mean ± sd over seeds)")
    if methods:  # every run diverged: nothing to label
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    for m in methods:
        s = summary[m]
        ax2.errorbar(
            s["mean_tuned_percent"], s["mean_test_acc"], yerr=s["sd_test_acc"], fmt="o", capsize=3, label=m
        )
    ax2.set_xscale("log")
    ax2.xaxis.set_minor_formatter(NullFormatter())  # decade labels only (minor ones overlap)
    ax2.set(
        xlabel="tuned parameters (% of the backbone, log)",
        ylabel="mean test accuracy (%)",
        title="accuracy vs parameters",
    )
    ax2.grid(alpha=0.3)
    if methods:
        ax2.legend(fontsize=7)
    save_figure(fig, path)
