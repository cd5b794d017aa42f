"""The JPEG 2000 case of issue 13: a ~540 KB file whose pixels fit the default limits but whose decode
costs over a gigabyte and over a second. Each way of handling it runs in its own process (peak RSS).

    .venv/bin/python benchmarks/bench_jpeg2000.py [--side 6300] [--out benchmarks/results/jpeg2000.json]

Rows: `full` decodes it as the old code did (all formats, full resolution); `default` is today's serving
default (JPEG 2000 not in `image_formats`: refused from the header); `reduced` is JPEG 2000 allowed,
decoded at reduced size (`image_reduce_pixels`, default 1,000,000). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import os, sys, threading, time
sys.path.insert(0, {root!r})
from e2vpt.core.images import ImageLimits, decode_image
from e2vpt.errors import E2VPTError
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
data = open({path!r}, "rb").read()
limits = {limits}
base, peak, done = rss(), [0], threading.Event()
def sample():  # the high-water mark of the resident set during the decode, every 2 ms
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
try:
    img = decode_image(data, limits=limits)
    outcome = f"decoded {{img.size[0]}}x{{img.size[1]}}"
except E2VPTError as exc:
    outcome = f"{{type(exc).__name__}}"
dt = time.perf_counter() - t0
done.set()
peak[0] = max(peak[0], rss())
print(f"{{dt}} {{(peak[0] - base) / 2**20}} {{outcome}}")
"""

ROWS = {
    "full": "ImageLimits(formats=None, reduce_pixels=2**62)",
    "default": "ImageLimits()",
    "reduced": "ImageLimits(formats=frozenset({'JPEG2000'}))",
}


def make_file(side: int, path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (side // 64, side // 64, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG2000", quality_mode="rates", quality_layers=[side * side * 3 / 540_000])
    path.write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=6300)
    ap.add_argument("--file", default="/tmp/e2vpt_bench.jp2")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "jpeg2000.json"))
    args = ap.parse_args()
    path = Path(args.file)
    if not path.is_file():
        make_file(args.side, path)
    size = path.stat().st_size
    rows = []
    for name, limits in ROWS.items():
        code = CHILD.format(root=str(ROOT), path=str(path), limits=limits)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        seconds, peak_mb, *outcome = res.stdout.split()
        rows.append(
            {
                "case": name,
                "limits": limits,
                "decode_seconds": float(seconds),
                "peak_rss_increase_mb": float(peak_mb),
                "outcome": " ".join(outcome),
                "process_seconds": time.perf_counter() - t0,
            }
        )
    print(f"JPEG 2000 {args.side}x{args.side}, {size / 1024:.0f} KB")
    print(f"{'case':<9} {'decode s':>9} {'peak RSS +MB':>13}  outcome")
    for r in rows:
        print(
            f"{r['case']:<9} {r['decode_seconds']:>9.3f} {r['peak_rss_increase_mb']:>13.0f}  {r['outcome']}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"side": args.side, "bytes": size, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
