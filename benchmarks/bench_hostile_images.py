"""Hostile images: what each costs a decoder unchecked, and what refusing it from its header costs, side by
side in one run.

    .venv/bin/python benchmarks/bench_hostile_images.py [--out benchmarks/results/hostile_images_cpu.json]

Rows (each file within the default `max_image_bytes` and `max_image_pixels`; builders in
`e2vpt.dev.images`):
- JPEG scan bomb: a progressive 40 MP JPEG with 2,000 extra scans of a few bytes (`jpeg_scan_bomb`),
  decoded by Pillow and by torchvision's decoder (what the CPU path would run), against `scan_image`
  refusing it (`max_jpeg_scans`);
- JPEG header flood: 4 MB of 0xFF fill bytes before the frame header (`jpeg_header_flood`), Pillow's open;
- PNG chunk flood: 200,000 empty ancillary chunks (`png_chunk_flood`), Pillow's open and load;
- GIF block flood: 200,000 comment extensions (`gif_block_flood`), Pillow's open and load.
"unchecked" is one call of the decoder on the file (seconds); "refused" the median of 5 `scan_image` calls
(the engine's header step), which must raise `ImageTooLarge`. Prints a table, writes JSON. Numbers are for
this machine only.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.io as tvio
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from e2vpt.core.images import ImageLimits, scan_image  # noqa: E402
from e2vpt.dev.images import gif_block_flood, jpeg_header_flood, jpeg_scan_bomb, png_chunk_flood  # noqa: E402
from e2vpt.errors import ImageTooLarge  # noqa: E402


def pillow(data: bytes) -> None:
    Image.open(io.BytesIO(data)).load()


def torchvision_jpeg(data: bytes) -> None:
    tvio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def refused_seconds(data: bytes) -> float:
    def refuse() -> None:
        try:
            scan_image(data, ImageLimits())
        except ImageTooLarge:
            return
        raise AssertionError("not refused")

    return statistics.median(seconds(refuse) for _ in range(5))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/hostile_images_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = {
        "JPEG scan bomb (40 MP, 2,000 scans)": (
            jpeg_scan_bomb((8000, 5000), 2000),
            {"pillow": pillow, "torchvision": torchvision_jpeg},
        ),
        "JPEG header flood (4 MB of fill bytes)": (jpeg_header_flood(4_000_000), {"pillow": pillow}),
        "PNG chunk flood (200,000 chunks)": (png_chunk_flood(200_000), {"pillow": pillow}),
        "GIF block flood (200,000 comments)": (gif_block_flood(200_000), {"pillow": pillow}),
    }
    rows = []
    for name, (data, decoders) in cases.items():
        refused = refused_seconds(data)
        for decoder, fn in decoders.items():
            t0 = time.perf_counter()
            try:
                fn(data)
                outcome = "decoded"
            except Exception as exc:  # a decoder may refuse it late: the time it spent is what counts
                outcome = type(exc).__name__
            unchecked = time.perf_counter() - t0
            row = {"case": name, "bytes": len(data), "decoder": decoder, "unchecked_s": unchecked,
                   "outcome": outcome, "refused_ms": refused * 1000}  # fmt: skip
            rows.append(row)
            print(f"{name:42} {len(data) / 1e6:6.2f} MB  {decoder:11} unchecked {unchecked:7.2f} s  "
                  f"refused in {refused * 1000:7.2f} ms", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": platform.node(), "torch_threads": 1, "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
