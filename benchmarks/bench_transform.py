"""`Preprocess.batch` (the recipes' tensor transform) of this checkout against the same class at a git
revision, side by side in one run: outputs must be identical, then op counts and median ms per call.

    .venv/bin/python benchmarks/bench_transform.py --base 3f1c2ab [--device cpu|cuda] [--out results/transform_cpu.json]

Cases (uint8 pixels, the vtab and fgvc recipes): 64 images of 64 distinct sizes (real traffic: every upload
its own size; on a GPU each size is its own resize, so kernel launches per image count) at 32 px (tiny
backbone: op overhead) and 224 px (ViT-B input: compute); 64 images of 8 sizes; 64 same-size images in one
call (the CUDA engine's common case) and one image per call (the CPU engine's pool). "ops" counts the
top-level aten ops of one call (each a kernel launch or more on a GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from e2vpt.core.backbone import BackboneInfo, load_backbone  # noqa: E402
from e2vpt.core.images import Preprocess  # noqa: E402


def preprocess_at(rev: str) -> type:
    """`Preprocess` as e2vpt/core/images.py defines it at git revision `rev` (a module of its own)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:e2vpt/core/images.py"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "images_base.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("images_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["images_base"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Preprocess


def top_level_ops(fn: Callable[[], Any]) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return sum(
        1
        for e in p.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def median_ms(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Calls interleaved variant by variant (drifting load hits all alike); median ms of each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def cases(
    tiny: BackboneInfo, vit: BackboneInfo, device: torch.device
) -> list[tuple[str, BackboneInfo, list]]:
    g = torch.Generator().manual_seed(0)

    def pixels(sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to(device) for h, w in sizes]

    return [
        ("64 distinct sizes, 32 px", tiny, pixels([(40 + i, 50 + 2 * i) for i in range(64)])),
        ("64 images of 8 sizes, 32 px", tiny, pixels([(40 + i % 8, 50 + 2 * (i % 8)) for i in range(64)])),
        ("64 distinct sizes ~640x480, 224 px", vit, pixels([(480 - 2 * i, 640 - 2 * i) for i in range(64)])),
        ("64 images 640x480, 224 px", vit, pixels([(480, 640)] * 64)),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    base = preprocess_at(args.base)
    tiny = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).info
    vit = load_backbone("vit_tiny_patch16_224").info  # 224 px, mean/std/interpolation of timm's ViTs
    rows = []
    for name, info, imgs in cases(tiny, vit, device):
        for recipe in ("vtab", "fgvc"):
            old, new = base(info, recipe), Preprocess(info, recipe)
            calls = {"base": lambda p=old, xs=imgs: p.batch(xs), "now": lambda p=new, xs=imgs: p.batch(xs)}
            if name.startswith("64 images 640x480"):  # also as the CPU engine's pool runs it
                calls |= {"base, one per call": lambda p=old, xs=imgs: [p.batch([x]) for x in xs],
                          "now, one per call": lambda p=new, xs=imgs: [p.batch([x]) for x in xs]}  # fmt: skip
            if not torch.equal(old.batch(imgs), new.batch(imgs)):
                raise SystemExit(f"{name} {recipe}: outputs differ from {args.base}'s")
            ms = median_ms(calls, args.repeats, device)
            row = {"case": name, "recipe": recipe, "ops_base": top_level_ops(calls["base"]),
                   "ops_now": top_level_ops(calls["now"]), **{f"ms {k}": v for k, v in ms.items()}}  # fmt: skip
            rows.append(row)
            print(f"{name:36s} {recipe}: ops {row['ops_base']} -> {row['ops_now']}, "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)  # fmt: skip
    out = args.out or ROOT / "benchmarks" / "results" / f"transform_{device.type}.json"
    result = {"base": args.base, "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "outputs_identical": True, "rows": rows}  # fmt: skip
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
