"""Peak host memory of one engine batch of large images, by `engine_micro_batch_pixels`, side by side.

    .venv/bin/python benchmarks/bench_memory.py [--batch 32] [--budgets 0,33554432,134217728]
        [--kinds png-40mp,jpeg-40mp,jpeg-12mp] [--out benchmarks/results/memory_cpu.json]

Each (image kind, budget) runs in a Python process of its own, its peak resident memory (VmHWM) reset
just before the call: an engine on the CPU (vit_tiny at 32 px: the forward is not what is measured; the default
image threads), a real Redis (`ensure_redis`) holding one task, one warm-up call with a small image, then one
`predict` of --batch copies of the image. Reported per row: the peak resident memory during the call above
the resident memory before it (MB), the call's seconds, and how many answers succeeded (all must).
Budget 0 holds the whole batch's pixels at once (the engine before the budget). Kinds: a 40 MP PNG (the
default `max_image_pixels`; a smooth gradient, 0.1 MB encoded), a 40 MP JPEG and a 12 MP JPEG (phone
photos: `photo_jpeg`). Prints a table, writes JSON. Numbers are for this machine only.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from e2vpt.config import Settings  # noqa: E402
from e2vpt.core.backbone import load_backbone  # noqa: E402
from e2vpt.core.promptset import PromptSet  # noqa: E402
from e2vpt.dev.images import image_bytes, photo_jpeg  # noqa: E402
from e2vpt.dev.localredis import ensure_redis  # noqa: E402
from e2vpt.registry.store import PromptStore  # noqa: E402

BACKBONE = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2})
TASK = "memory-bench"


def gradient_png(width: int, height: int) -> bytes:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = (np.arange(width) % 256)[None]
    arr[..., 1] = (np.arange(height) % 256)[:, None]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


KINDS = {
    "png-40mp": lambda: gradient_png(8000, 5000),
    "jpeg-40mp": lambda: photo_jpeg(0, (8000, 5000), quality=75),
    "jpeg-12mp": lambda: photo_jpeg(1, (4000, 3000), quality=85),
}


def memory_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (its peak since the last `reset_peak`) of this process, in MB. Not
    ru_maxrss: Linux carries a parent's peak into a child across exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def child(image: Path, budget: int, batch: int, redis_url: str, namespace: str) -> dict[str, object]:
    """One measured call in this process (see the module doc)."""
    from e2vpt.serving.engine import MultiTaskEngine, RequestItem, Result

    name, kwargs = BACKBONE
    bb = load_backbone(name, **kwargs)
    settings = Settings(redis_url=redis_url, cache_version_check_ms=-1, engine_micro_batch_pixels=budget)
    engine = MultiTaskEngine(bb, PromptStore(redis_url, bb.info, namespace=namespace), settings)
    try:
        engine.predict([RequestItem(TASK, image_bytes(0))])  # warm-up: task loaded, pools started
        data = image.read_bytes()
        items = [RequestItem(TASK, data) for _ in range(batch)]
        reset_peak()
        before = memory_mb("VmRSS")
        t0 = time.perf_counter()
        results = engine.predict(items)
        seconds = time.perf_counter() - t0
        peak = memory_mb("VmHWM")
    finally:
        engine.close()
    return {
        "peak_above_mb": round(peak - before, 1),
        "seconds": round(seconds, 2),
        "ok": sum(isinstance(r, Result) for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budgets", default=f"0,{2**25},{2**27}", help="engine_micro_batch_pixels values")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"from {','.join(KINDS)}")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/memory_cpu.json")
    ap.add_argument(
        "--child", nargs=5, metavar=("IMAGE", "BUDGET", "BATCH", "REDIS", "NS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.child:
        image, budget, batch, redis_url, namespace = args.child
        print(json.dumps(child(Path(image), int(budget), int(batch), redis_url, namespace)))
        return 0

    budgets = [int(b) for b in args.budgets.split(",")]
    kinds = args.kinds.split(",")
    redis_url, local = ensure_redis(args.redis_url)
    namespace = f"bench-memory-{uuid.uuid4().hex[:8]}"
    name, kwargs = BACKBONE
    info = load_backbone(name, **kwargs).info
    store = PromptStore(redis_url, info, namespace=namespace)
    rows: list[dict[str, object]] = []
    try:
        store.register(PromptSet.create(TASK, info, ["a", "b", "c"]))
        with tempfile.TemporaryDirectory() as tmp:
            for kind in kinds:
                image = Path(tmp) / kind
                image.write_bytes(KINDS[kind]())
                for budget in budgets:
                    cmd = [sys.executable, __file__, "--child", str(image), str(budget), str(args.batch),
                           redis_url, namespace]  # fmt: skip
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    row = {"kind": kind, "encoded_mb": round(image.stat().st_size / 2**20, 2),
                           "budget_pixels": budget, "batch": args.batch, **json.loads(out.splitlines()[-1])}  # fmt: skip
                    rows.append(row)
                    print(f"{kind:10} budget {budget:>11,}  B={args.batch}  peak +{row['peak_above_mb']:>7} MB"
                          f"  {row['seconds']:>6} s  ok {row['ok']}/{args.batch}", flush=True)  # fmt: skip
    finally:
        store.drop_all()
        store.close()
        if local is not None:
            local.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.node(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] == r["batch"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
