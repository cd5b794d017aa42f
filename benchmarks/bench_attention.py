"""Benchmark of the KV-prompt attention (a script, not a test): `PromptedViT.forward_features` with the KV
prompts in T slot rows extended once (today's path) against the former per-layer concatenation of the
prompts onto K and V (`e2vpt/dev/kv_concat.py`), and the bare backbone, in one interleaved run.
Random-init timm ViT (speed does not depend on the weights).

    python benchmarks/bench_attention.py                         # CPU, vit_tiny 224, B 8 -> results/attention_cpu.json
    python benchmarks/bench_attention.py --device cuda           # ViT-B/16 fp16, B 1/64/256 -> attention_cuda.json

Modes (forward_features only, pooled features, no head; one task's prompts for every image unless padded):
    bare          timm's own forward_features + pooling
    p0t0          the prompted forward with no prompts
    concat        the former path, P visual + T KV prompts (K and V concatenated in every block)
    slot          the slot path, P + T
    slot_p_only   the slot path, P visual prompts, no KV prompts
    slot_t_only   the slot path, T KV prompts, no visual prompts
    concat_t_only the former path, T KV prompts only
    concat_padded / slot_padded   a mixed batch: P and T padded per image, key-padding mask built
    *_compiled    (--compile) bare, concat and slot under torch.compile (the slot path's out-of-place form)
`token_ratio` is the token-count cost model: (N + P + T) / N for the slot path (queries and keys), with N the
backbone's tokens; `max_diff_vs_concat` is the largest |slot - concat| feature difference in the run's dtype.
Timing: CUDA events on a GPU, perf_counter on a CPU; medians of interleaved repeats (round robin).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from e2vpt.core.backbone import Backbone, load_backbone
from e2vpt.core.model import PromptedViT
from e2vpt.dev.kv_concat import concat_forward_features

ROOT = Path(__file__).resolve().parents[1]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def prompt_inputs(
    bb: Backbone,
    B: int,
    P: int,
    T: int,
    device: torch.device,
    dtype: torch.dtype,
    padded: bool,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Images and per-image prompts at the initialisation's scale; padded: each image keeps a random
    number of its P and T slots (at least one), the rest zero and marked invalid."""
    g = torch.Generator().manual_seed(seed)
    i = bb.info
    images = torch.randn(B, i.in_chans, *i.img_size, generator=g)
    visual = (torch.rand(B, i.depth, P, i.embed_dim, generator=g) * 2 - 1) * i.visual_init_bound
    kv = (torch.rand(B, i.depth, 2, i.num_heads, T, i.head_dim, generator=g) * 2 - 1) * 0.3
    vv = kvv = None
    if padded:
        vv = torch.arange(P)[None] < torch.randint(1, P + 1, (B, 1), generator=g) if P else None
        kvv = torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g) if T else None
        if vv is not None:
            visual = visual * vv[:, None, :, None]
        if kvv is not None:
            kv = kv * kvv[:, None, None, None, :, None]
    floats = [t.to(device=device, dtype=dtype) for t in (images, visual, kv)]
    masks = [None if t is None else t.to(device) for t in (vv, kvv)]
    return floats[0], floats[1], floats[2], masks[0], masks[1]


def measure(cases: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds per call of every case, interleaved (rotating order) so that load hits all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                cases[n]()
                end.record()
                end.synchronize()
                times[n].append(start.elapsed_time(end) / 1e3)
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                cases[n]()
                times[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
    out = {
        n: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "repeats": repeats}
        for n, v in times.items()
    }
    for n, v in cpu.items():  # on a shared CPU, process time is the steadier measure of work
        if v:
            out[n]["cpu_median_s"] = statistics.median(v)
    return out


def bench(
    bb: Backbone,
    B: int,
    P: int,
    T: int,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    compile_: bool = False,
) -> list[dict[str, Any]]:
    vit = bb.model
    model = PromptedViT(bb).eval()
    n_tokens = bb.info.num_prefix_tokens + bb.info.num_patches
    full = prompt_inputs(bb, B, P, T, device, dtype, padded=False)
    padded = prompt_inputs(bb, B, P, T, device, dtype, padded=True, seed=1)
    images = full[0]
    p_only = (images, full[1], None)
    t_only = (images, None, full[2])
    cases: dict[str, tuple[Callable[..., Tensor], tuple[Any, ...], int, int]] = {
        "bare": (lambda x: vit.forward_head(vit.forward_features(x), pre_logits=True), (images,), 0, 0),
        "p0t0": (model.forward_features, (images,), 0, 0),
        "concat": (partial(concat_forward_features, vit), full, P, T),
        "slot": (model.forward_features, full, P, T),
        "slot_p_only": (model.forward_features, p_only, P, 0),
        "slot_t_only": (model.forward_features, t_only, 0, T),
        "concat_t_only": (partial(concat_forward_features, vit), t_only, 0, T),
        "concat_padded": (partial(concat_forward_features, vit), padded, P, T),
        "slot_padded": (model.forward_features, padded, P, T),
    }
    if compile_:  # torch.compile traces the graph-capture (out-of-place) form of the slot path
        for name in ("bare", "concat", "slot"):
            fn, fargs, p, t = cases[name]
            cases[f"{name}_compiled"] = (torch.compile(fn), fargs, p, t)
    with torch.inference_mode():
        outs = {n: fn(*args) for n, (fn, args, _, _) in cases.items()}
        timed = measure(
            {n: partial(fn, *args) for n, (fn, args, _, _) in cases.items()}, device, warmup, repeats
        )
    diffs = {
        "slot": outs["slot"] - outs["concat"],
        "slot_t_only": outs["slot_t_only"] - outs["concat_t_only"],
        "slot_padded": outs["slot_padded"] - outs["concat_padded"],
        "p0t0": outs["p0t0"] - outs["bare"],
    }
    if compile_:
        diffs["slot_compiled"] = outs["slot_compiled"] - outs["concat"]
    bare = timed["bare"]["median_s"]
    rows = []
    for n, (_, _, p, t) in cases.items():
        res = timed[n]
        row: dict[str, Any] = {"B": B, "mode": n, "P": p, "T": t, **res}
        row["ms"] = res["median_s"] * 1e3
        row["ratio_vs_bare"] = res["median_s"] / bare
        row["min_ratio_vs_bare"] = res["min_s"] / timed["bare"]["min_s"]
        if "cpu_median_s" in res:
            row["cpu_ratio_vs_bare"] = res["cpu_median_s"] / timed["bare"]["cpu_median_s"]
        row["token_ratio"] = (n_tokens + p + t) / n_tokens
        row["img_s"] = B / res["median_s"]
        if n in diffs:
            row["max_diff_vs_" + ("bare" if n == "p0t0" else "concat")] = diffs[n].abs().max().item()
        rows.append(row)
    pairs = {"concat": "slot", "concat_t_only": "slot_t_only", "concat_padded": "slot_padded"}
    if compile_:
        pairs["concat_compiled"] = "slot_compiled"
    for name, slot in pairs.items():
        row = next(r for r in rows if r["mode"] == slot)
        row["speedup_vs_concat"] = timed[name]["median_s"] / timed[slot]["median_s"]
        if "cpu_median_s" in timed[slot]:
            row["cpu_speedup_vs_concat"] = timed[name]["cpu_median_s"] / timed[slot]["cpu_median_s"]
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table: wall-clock (and, on a CPU, process-time) ratios."""
    cols = [
        ("B", 4, lambda r: str(r["B"])),
        ("mode", -14, lambda r: r["mode"]),
        ("P", 3, lambda r: str(r["P"])),
        ("T", 3, lambda r: str(r["T"])),
        ("ms", 9, lambda r: _fmt(r["ms"], ".3f")),
        ("x bare", 7, lambda r: _fmt(r["ratio_vs_bare"], ".3f")),
        ("min x bare", 11, lambda r: _fmt(r["min_ratio_vs_bare"], ".3f")),
        ("tokens", 7, lambda r: _fmt(r["token_ratio"], ".3f")),
        ("vs concat", 10, lambda r: _fmt(r.get("speedup_vs_concat"), ".3f")),
        ("max diff", 9, lambda r: _fmt(r.get("max_diff_vs_concat", r.get("max_diff_vs_bare")), ".2g")),
        ("cpu x bare", 11, lambda r: _fmt(r.get("cpu_ratio_vs_bare"), ".3f")),
        ("cpu vs concat", 14, lambda r: _fmt(r.get("cpu_speedup_vs_concat"), ".3f")),
    ]

    def line(cells: list[str]) -> str:
        return " ".join(
            c.ljust(-w) if w < 0 else c.rjust(w) for c, (_, w, _) in zip(cells, cols, strict=True)
        )

    return "\n".join([line([c[0] for c in cols])] + [line([c[2](r) for c in cols]) for r in rows])


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--model", help="timm name (default: vit_tiny_patch16_224 on CPU, vit_base_patch16_224 on GPU)"
    )
    ap.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 8 on CPU, 1 64 256 on GPU)")
    ap.add_argument("--dtype", choices=DTYPES, help="default fp32 on CPU, fp16 on GPU")
    ap.add_argument("--prompts", type=int, default=10, help="P")
    ap.add_argument("--kv", type=int, default=5, help="T")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, help="default 15 on CPU, 50 on GPU")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd bare/concat/slot")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/attention_<device type>.json)")
    args = ap.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    name = args.model or ("vit_base_patch16_224" if gpu else "vit_tiny_patch16_224")
    batches = args.batch or ([1, 64, 256] if gpu else [8])
    dtype = DTYPES[args.dtype or ("fp16" if gpu else "fp32")]
    repeats = args.repeats or (50 if gpu else 15)
    if not gpu:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    bb = load_backbone(name, device=device)
    bb.model.to(dtype)
    rows: list[dict[str, Any]] = []
    for B in batches:
        rows += bench(bb, B, args.prompts, args.kv, device, dtype, args.warmup, repeats, args.compile)

    print(f"{name} {str(dtype).removeprefix('torch.')} on {describe_device(device)}")
    print(table(rows))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"attention_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
        "device": describe_device(device),
        "threads": None if gpu else torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "timing": "cuda events" if gpu else "perf_counter",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
