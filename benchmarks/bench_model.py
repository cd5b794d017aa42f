"""Benchmark of the model core (a script, not a test): bare backbone vs one prompted task vs a batch of
B images from B distinct tasks vs the naive alternative (group by task, one forward per group), and a
half-pruned (compacted) prompt set. Random-init timm ViTs at 224x224.

    python benchmarks/bench_model.py                # full run on the CPU -> benchmarks/results/model_cpu.json
    python benchmarks/bench_model.py --quick        # vit_tiny only, B in {1, 8}, fewer repeats
    python benchmarks/bench_model.py --device cuda  # -> benchmarks/results/model_cuda.json

Modes per (model, B, prompt config):
    bare      timm's own forward (the backbone with its own head), no prompts
    one_task  PromptedViT.forward_multi, every image of the batch in one task
    mixed     PromptedViT.forward_multi, B images of B distinct tasks (each its own prompts and head)
    naive     the same B images, grouped by task, one forward per group (here B forwards of one image;
              timed for the 10/5 config only: its cost does not depend on the prompt sizes' mix)
    mixed_hetero  B distinct tasks alternating a 10/5 set and a half-pruned compacted set (P padded, masks)
`expected_ratio` is the token-count cost model (N + P) / N with N the backbone's tokens (prefix + patches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from e2vpt.core.backbone import Backbone, load_backbone
from e2vpt.core.model import PromptedViT, TaskBatch
from e2vpt.core.promptset import PromptSet

CONFIGS: dict[str, dict[str, Any]] = {
    "10/5": {"num_prompts": 10, "num_kv": 5, "prune_half": False},
    "5/5": {"num_prompts": 5, "num_kv": 5, "prune_half": False},
    "10/5 half-pruned": {"num_prompts": 10, "num_kv": 5, "prune_half": True},
}


# the naive alternative costs B forwards of one image whatever the prompt sizes: timed for one config
NAIVE_CONFIGS = ("10/5",)


def make_sets(
    bb: Backbone, n: int, num_prompts: int, num_kv: int, prune_half: bool, seed: int
) -> list[PromptSet]:
    """n distinct tasks (different values and class counts). A half-pruned set is compacted: P halves."""
    g = torch.Generator().manual_seed(seed)
    sets = []
    for i in range(n):
        labels = [f"c{j}" for j in range(2 + (i * 7) % 99)]
        ps = PromptSet.create(
            f"t{seed}-{i}", bb.info, labels, num_prompts=num_prompts, num_kv=num_kv, generator=g
        )
        if prune_half:
            keep = torch.zeros(num_prompts, dtype=torch.uint8)
            keep[torch.randperm(num_prompts, generator=g)[: num_prompts // 2]] = 1
            ps = replace(ps, token_mask=keep).compact()
        sets.append(ps)
    return sets


def measure(cases: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Time every case, interleaved (round-robin, rotating order) so that load from other processes hits
    all cases alike. Wall-clock and process CPU time; medians of `repeats`."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    names = list(cases)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            cases[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    return {
        n: {
            "median_s": statistics.median(wall[n]),
            "min_s": min(wall[n]),
            "max_s": max(wall[n]),
            "cpu_median_s": statistics.median(cpu[n]),
            "repeats": repeats,
        }
        for n in names
    }


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`fn` followed by a device synchronisation (so that CUDA timings are real)."""

    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def naive_forward(
    model: PromptedViT, images: torch.Tensor, singles: list[TaskBatch], zero1: torch.Tensor
) -> list[torch.Tensor]:
    """The naive alternative: group by task (here every image is its own group), one forward per group."""
    return [model.forward_multi(images[b : b + 1], tb, zero1) for b, tb in enumerate(singles)]


def build_cases(
    bb: Backbone, model: PromptedViT, B: int, device: torch.device
) -> tuple[dict[tuple[str, str], Callable[[], object]], dict[tuple[str, str], dict[str, Any]]]:
    """Every timed case of one (model, B) and what describes it."""
    info = bb.info
    n_tokens = info.num_prefix_tokens + info.num_patches
    images = torch.randn(B, info.in_chans, *info.img_size, device=device)
    distinct = torch.arange(B, device=device)
    zeros = torch.zeros(B, dtype=torch.long, device=device)
    zero1 = torch.zeros(1, dtype=torch.long, device=device)
    cases: dict[tuple[str, str], Callable[[], object]] = {("-", "bare"): partial(bb.model, images)}
    meta: dict[tuple[str, str], dict[str, Any]] = {("-", "bare"): {"expected_ratio": 1.0}}
    for cfg_name, cfg in CONFIGS.items():
        sets = make_sets(bb, B, seed=B, **cfg)
        P, T = sets[0].num_prompts, sets[0].num_kv
        one = TaskBatch.from_prompt_sets(sets[:1], device=device)
        t0 = time.perf_counter()
        mixed = TaskBatch.from_prompt_sets(sets, device=device)
        build_s = time.perf_counter() - t0
        singles = [TaskBatch.from_prompt_sets([s], device=device) for s in sets]
        base = {"P": P, "T": T, "expected_ratio": (n_tokens + P) / n_tokens}
        cases[(cfg_name, "one_task")] = partial(model.forward_multi, images, one, zeros)
        cases[(cfg_name, "mixed")] = partial(model.forward_multi, images, mixed, distinct)
        meta[(cfg_name, "one_task")] = base
        meta[(cfg_name, "mixed")] = {**base, "taskbatch_build_s": build_s}
        if cfg_name in NAIVE_CONFIGS:
            cases[(cfg_name, "naive")] = partial(naive_forward, model, images, singles, zero1)
            meta[(cfg_name, "naive")] = base
    # heterogeneous mix: unpruned 10/5 and half-pruned sets alternate (P padded to 10, attention masks)
    full = make_sets(bb, B, 10, 5, False, seed=100 + B)
    half = make_sets(bb, B, 10, 5, True, seed=200 + B)
    hetero = TaskBatch.from_prompt_sets([full[i] if i % 2 == 0 else half[i] for i in range(B)], device=device)
    key = ("10/5 + half-pruned", "mixed_hetero")
    cases[key] = partial(model.forward_multi, images, hetero, distinct)
    meta[key] = {"P": 10, "T": 5, "expected_ratio": (n_tokens + 10) / n_tokens}
    return cases, meta


def bench_model(
    name: str, batch_sizes: list[int], device: torch.device, warmup: int, repeats: int, bar: tqdm
) -> list[dict[str, Any]]:
    bb = load_backbone(name, device=device)
    model = PromptedViT(bb).eval()
    rows: list[dict[str, Any]] = []

    for B in batch_sizes:
        cases, meta = build_cases(bb, model, B, device)
        bare_fn = synced(cases[("-", "bare")], device)
        bare_fn()
        t0 = time.perf_counter()
        bare_fn()
        # cheap cases get more repeats (the CPU may be shared: more samples, steadier medians)
        reps = repeats * 3 if time.perf_counter() - t0 < 0.5 else repeats
        timed = measure({f"{c}|{m}": synced(fn, device) for (c, m), fn in cases.items()}, warmup, reps)
        bar.update(len(cases))
        bare = timed["-|bare"]
        for (cfg_name, mode), extra in meta.items():
            res = timed[f"{cfg_name}|{mode}"]
            row = {"model": name, "B": B, "config": cfg_name, "mode": mode, **res, **extra}
            row["throughput_img_s"] = B / res["median_s"]
            row["ratio_vs_bare"] = res["median_s"] / bare["median_s"]
            row["cpu_ratio_vs_bare"] = res["cpu_median_s"] / bare["cpu_median_s"]
            one_key = f"{cfg_name}|one_task"
            if one_key in timed:
                row["throughput_vs_one_task"] = timed[one_key]["median_s"] / res["median_s"]
                row["cpu_throughput_vs_one_task"] = timed[one_key]["cpu_median_s"] / res["cpu_median_s"]
            rows.append(row)
    return rows


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, evaluated on the measured rows (wall-clock medians, and CPU-time medians)."""
    out: dict[str, Any] = {}
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        bmax = max(r["B"] for r in rs)
        g: dict[str, Any] = {}
        mixed = [r for r in rs if r["B"] == bmax and r["mode"] == "mixed"]
        for r in mixed:
            g[f"mixed/one_task throughput B={bmax} {r['config']}"] = {
                "wall": round(r["throughput_vs_one_task"], 3),
                "cpu": round(r["cpu_throughput_vs_one_task"], 3),
            }
        g["goal mixed >= 0.95x one_task (wall)"] = all(r["throughput_vs_one_task"] >= 0.95 for r in mixed)
        g["goal mixed >= 0.95x one_task (cpu)"] = all(r["cpu_throughput_vs_one_task"] >= 0.95 for r in mixed)
        for r in rs:
            if r["mode"] == "one_task":
                g[f"prompted/bare B={r['B']} {r['config']}"] = {
                    "wall": round(r["ratio_vs_bare"], 3),
                    "cpu": round(r["cpu_ratio_vs_bare"], 3),
                    "expected": round(r["expected_ratio"], 3),
                }
        for B in sorted({r["B"] for r in rs}):
            one = {r["config"]: r for r in rs if r["B"] == B and r["mode"] == "one_task"}
            full, half = one["10/5"], one["10/5 half-pruned"]
            g[f"half-pruned speedup B={B}"] = {
                "wall": round(full["median_s"] / half["median_s"], 3),
                "cpu": round(full["cpu_median_s"] / half["cpu_median_s"], 3),
                "expected": round(full["expected_ratio"] / half["expected_ratio"], 3),
            }
        out[model] = g
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'model':<22}{'B':>4} {'config':<19}{'mode':<13}{'wall ms':>10}{'cpu ms':>10}{'img/s':>8}"
    head += f"{'x bare':>8}{'cpu x':>7}{'expect':>8}{'x one':>7}{'cpu x1':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        vs_one, cpu_one = r.get("throughput_vs_one_task"), r.get("cpu_throughput_vs_one_task")
        print(
            f"{r['model']:<22}{r['B']:>4} {r['config']:<19}{r['mode']:<13}{r['median_s'] * 1e3:>10.1f}"
            f"{r['cpu_median_s'] * 1e3:>10.1f}{r['throughput_img_s']:>8.1f}{r['ratio_vs_bare']:>8.3f}"
            f"{r['cpu_ratio_vs_bare']:>7.3f}{r['expected_ratio']:>8.3f}"
            f"{(f'{vs_one:.3f}' if vs_one is not None else '-'):>7}"
            f"{(f'{cpu_one:.3f}' if cpu_one is not None else '-'):>7}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="vit_tiny only, B in {1, 8}, 1 warm-up, 2 repeats")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (x3 for cases under 0.5 s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/model_<device>.json)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.warmup, args.repeats = ["vit_tiny_patch16_224"], [1, 8], 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    out = args.out or Path(__file__).parent / "results" / f"model_{device.type}.json"
    n_steps = len(args.models) * len(args.batch_sizes) * (2 + 2 * len(CONFIGS) + len(NAIVE_CONFIGS))
    rows: list[dict[str, Any]] = []
    with torch.inference_mode(), tqdm(total=n_steps, desc="bench_model", unit="case") as bar:
        for name in args.models:
            rows += bench_model(name, args.batch_sizes, device, args.warmup, args.repeats, bar)
    print_table(rows)
    summary = goals(rows)
    print(json.dumps(summary, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "note": "medians of interleaved repeats (wall and process CPU time); the CPU may be shared",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.write_text(json.dumps({"env": env, "goals": summary, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
