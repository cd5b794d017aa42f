"""Benchmark of batch assembly (a script, not a test): the prompts and heads of one mixed batch, built per
call from the cached sets (`TaskBatch.from_prompt_sets`, what the engine did) against index gathers from
the device-resident `PromptTable` (what it does now). No forward: only what feeds it.

    python benchmarks/bench_assembly.py                          # CPU, ViT-B shapes -> results/assembly_cpu.json
    python benchmarks/bench_assembly.py --device cuda --dtype float16   # -> results/assembly_cuda.json
    python benchmarks/bench_assembly.py --quick                  # B in {1, 64}, fewer repeats

Cases per batch size B (P = 10, T = 5, C = 2..100 classes; U distinct tasks among the B images):
    prompts   from_prompt_sets(U cached sets) + gather(task_index)    vs   PromptTable.gather(B slots)
    heads     per-image padded heads ([B, C_max, D] gathered, einsum: the engine's former TaskBatch.logits)
              vs the table's packed heads (TableBatch.logits)
    large     the table's prompts + heads for a batch holding one 100,000-class task among the others
              (the former path would need a [B, 100,000, D] tensor; not run)
Every case ends with a device synchronisation; medians of interleaved repeats (`bench_model.measure`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import measure, synced  # noqa: E402

from e2vpt.core.backbone import BackboneInfo, load_backbone  # noqa: E402
from e2vpt.core.model import TaskBatch  # noqa: E402
from e2vpt.core.promptset import PromptSet  # noqa: E402
from e2vpt.serving.table import PromptTable  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_sets(info: BackboneInfo, n: int, seed: int, large: int = 0) -> list[PromptSet]:
    """n distinct tasks, P = 10, T = 5, 2..100 classes; the first has `large` classes when given."""
    g = torch.Generator().manual_seed(seed)
    sets = []
    for i in range(n):
        classes = large if (large and i == 0) else 2 + (i * 7) % 99
        ps = PromptSet.create(f"t{seed}-{i}", info, [f"c{j}" for j in range(classes)], generator=g)
        sets.append(ps)
    return sets


def padded_heads(sets: list[PromptSet], task_index: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """The former per-image heads: weights padded to [U, C_max, D], gathered per image, einsum."""
    C = max(s.num_classes for s in sets)
    D = feats.shape[1]
    weight = torch.zeros(len(sets), C, D, device=feats.device, dtype=feats.dtype)
    bias = torch.zeros(len(sets), C, device=feats.device, dtype=feats.dtype)
    for u, s in enumerate(sets):
        weight[u, : s.num_classes] = s.head_weight
        bias[u, : s.num_classes] = s.head_bias
    return torch.einsum("bd,bcd->bc", feats, weight[task_index]) + bias[task_index]


def bench(
    info: BackboneInfo,
    B: int,
    U: int,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    large: int,
) -> list[dict[str, Any]]:
    sets = make_sets(info, U, seed=B * 1000 + U)
    cached = [s.to(device=device, dtype=dtype) for s in sets]  # what the former cache held per task
    table = PromptTable(info, device=device, dtype=dtype, max_bytes=8 << 30)
    slots = [table.insert(s) for s in sets]
    task = [b % U for b in range(B)]
    task_index = torch.tensor(task, device=device)
    batch_slots = [slots[u] for u in task]
    feats = torch.randn(B, info.embed_dim, device=device, dtype=dtype)
    prebuilt = table.gather(batch_slots)
    cases = {
        "prompts: from_prompt_sets + gather": lambda: TaskBatch.from_prompt_sets(
            cached, device=device, dtype=dtype
        ).gather(task_index),
        "prompts: table gather": lambda: table.gather(batch_slots),
        "heads: padded per image": lambda: padded_heads(cached, task_index, feats),
        "heads: table packed": lambda: prebuilt.logits(feats),
    }
    if large:
        big = make_sets(info, 1, seed=7, large=large)[0]
        big_slot = table.insert(big)
        large_slots = [big_slot if b % max(U, 1) == 0 else s for b, s in enumerate(batch_slots)]
        cases[f"large: table gather + heads ({large:,} classes)"] = lambda: table.gather(large_slots).logits(
            feats
        )
    timed = measure({k: synced(fn, device) for k, fn in cases.items()}, warmup, repeats)
    return [{"B": B, "U": U, "case": k, **v} for k, v in timed.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--model", default="vit_base_patch16_224", help="timm name: only its shapes are used")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64, 256])
    ap.add_argument("--large", type=int, default=100_000, help="classes of the large task (0: skip)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.warmup, args.repeats = [1, 64], 1, 5
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    info = load_backbone(args.model).info
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for B in args.batch_sizes:
            for U in sorted({B, max(1, B // 8)}):  # every image its own task; 8 images a task
                rows += bench(info, B, U, device, dtype, args.warmup, args.repeats, args.large)
    by = {(r["B"], r["U"], r["case"]): r for r in rows}
    for r in rows:
        if r["case"].startswith("prompts: table"):
            old = by[(r["B"], r["U"], "prompts: from_prompt_sets + gather")]
            r["speedup"] = old["median_s"] / r["median_s"]
        if r["case"].startswith("heads: table"):
            old = by[(r["B"], r["U"], "heads: padded per image")]
            r["speedup"] = old["median_s"] / r["median_s"]
    head = f"{'B':>4}{'U':>5}  {'case':<46}{'median ms':>11}{'min ms':>9}{'speedup':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        sp = f"{r['speedup']:.1f}x" if "speedup" in r else ""
        print(
            f"{r['B']:>4}{r['U']:>5}  {r['case']:<46}{r['median_s'] * 1e3:>11.3f}{r['min_s'] * 1e3:>9.3f}{sp:>9}"
        )
    out = args.out or Path(__file__).parent / "results" / f"assembly_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_at_end": os.getloadavg()[0],  # a shared CPU makes every number here slower
        "model_shapes": args.model,
        "dtype": args.dtype,
        "P": 10,
        "T": 5,
        "command": " ".join(["python benchmarks/bench_assembly.py", *(argv or sys.argv[1:])]),
    }
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
