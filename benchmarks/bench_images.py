"""Image pipeline benchmark: 640x480 JPEG bytes -> normalised [B, 3, 224, 224] input, images/s.

    .venv/bin/python benchmarks/bench_images.py [--device cpu|cuda] [--threads 8] [--batches 1 8 64 256]
        [--seconds 2] [--out benchmarks/results/images_cpu.json]

Rows (the vtab recipe at 224 px, the transform's output on the engine's device):
- pil-serial: the old path, Pillow decode + the PIL transform, one image at a time in one thread;
- pil-threads: the same in a pool of --threads threads;
- pipeline: `ImagePipeline` as the engine runs it: on a CPU, torchvision's JPEG decoder and the tensor
  transform per image in the pool; on CUDA, nvjpeg on the whole batch and the batched GPU resize.
Each cell is the median images/s over repeated calls for about --seconds (at least 2 calls).
- overlap (B = 64, or the largest batch below): the pipeline's decode in one thread beside a compute load
  of about the same length in another (matmuls on the device: the forward's stand-in), against each alone.
  2.0 = they overlap fully (what `engine_micro_batch` relies on), 1.0 = not at all.
- headers: reading one JPEG's header (size, mode, EXIF orientation, limits), the serial step before every
  batch's decode: Pillow (`open_image` + `exif_orientation`, the former path) against `read_header`'s
  scan, per image, for the files above and for the same files with an Exif block (orientation, dpi).
- reopen: what decoding an image Pillow reads (PNG, WebP, GIF, BMP) repeats of its scan: the engine scans
  every header first and keeps no Pillow image (it would hold the pixels for the whole batch), so
  `decode_scanned` opens the bytes again (`open_image`); per image, against that image's decode.
Prints a table, writes JSON. Numbers are for this machine only (and its load).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from e2vpt.core.backbone import load_backbone  # noqa: E402
from e2vpt.core.images import (  # noqa: E402
    ImageLimits,
    decode_image,
    decode_scanned,
    exif_orientation,
    open_image,
    read_header,
    scan_image,
)
from e2vpt.dev.images import photo_jpeg, pil_reference_transform, with_exif  # noqa: E402
from e2vpt.serving.pipeline import ImagePipeline  # noqa: E402


def timed(fn: Callable[[], Any], seconds: float, device: torch.device) -> float:
    """Median seconds per call."""
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < seconds and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def overlap(pipe: ImagePipeline, batch: list[bytes], device: torch.device, seconds: float) -> dict[str, Any]:
    """Decode beside a device compute load of about the same length, in two threads, against each alone."""
    n = 2048 if device.type == "cuda" else 384
    x = torch.randn(n, n, device=device)

    def compute(reps: int) -> None:
        for _ in range(reps):
            x @ x
        if device.type == "cuda":
            torch.cuda.synchronize()

    decode_s = timed(lambda: pipe.decode(batch), seconds, device)
    reps = max(1, round(decode_s / timed(lambda: compute(1), seconds, device)))
    compute_s = timed(lambda: compute(reps), seconds, device)

    def both() -> None:
        th = threading.Thread(target=compute, args=(reps,))
        th.start()
        pipe.decode(batch)
        th.join()

    both_s = timed(both, seconds, device)
    return {"method": "overlap", "batch": len(batch), "decode_ms": decode_s * 1e3, "compute_ms": compute_s * 1e3,
            "both_ms": both_s * 1e3, "overlap": (decode_s + compute_s) / both_s}  # fmt: skip


def headers(files: list[bytes], limits: ImageLimits, seconds: float) -> list[dict[str, Any]]:
    """Microseconds per header: Pillow's reading against the scan, plain files and files with Exif."""

    def pillow(data: bytes) -> int:
        return exif_orientation(open_image(data, limits))

    def scan(data: bytes) -> int:
        header, img = read_header(data, limits)
        assert header is not None and img is None  # answered by the scan, not by Pillow
        return header.orientation

    rows = []
    for kind, batch in (("plain", files), ("exif", [with_exif(d) for d in files])):
        assert [pillow(d) for d in batch] == [scan(d) for d in batch]
        us = {n: timed(lambda f=f, batch=batch: [f(d) for d in batch], seconds, torch.device("cpu")) / len(batch) * 1e6
              for n, f in (("pillow", pillow), ("scan", scan))}  # fmt: skip
        rows.append({"method": "headers", "files": kind, "batch": len(batch), "pillow_us": us["pillow"],
                     "scan_us": us["scan"], "speedup": us["pillow"] / us["scan"]})  # fmt: skip
    return rows


def reopen(photo: bytes, limits: ImageLimits, seconds: float) -> list[dict[str, Any]]:
    """Microseconds of the second `open_image` against milliseconds of `decode_scanned`, per format."""
    img = Image.open(io.BytesIO(photo))
    rows = []
    for fmt in ("PNG", "WEBP", "GIF", "BMP"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        data = buf.getvalue()
        scanned = scan_image(data, limits)
        cpu = torch.device("cpu")

        def opens(data: bytes = data) -> None:  # one at a time: the engine holds no opened image
            for _ in range(100):
                open_image(data, limits)

        open_s = timed(opens, seconds, cpu) / 100
        decode_s = timed(lambda scanned=scanned: decode_scanned(scanned, limits), seconds, cpu)
        rows.append({"method": "reopen", "format": fmt, "bytes": len(data), "open_us": open_s * 1e6,
                     "decode_ms": decode_s * 1e3, "share": open_s / decode_s})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    info = load_backbone("vit_tiny_patch16_224").info  # 224 px, bicubic: the transform only needs its info
    files = [photo_jpeg(seed) for seed in range(max(args.batches))]
    limits = ImageLimits()
    legacy = pil_reference_transform(info, "vtab")
    pool = ThreadPoolExecutor(args.threads)
    pipe = ImagePipeline(info, limits, device, threads=args.threads)

    def pil_one(data: bytes) -> torch.Tensor:
        return legacy(decode_image(data, limits=limits))

    def pil_serial(batch: list[bytes]) -> torch.Tensor:
        return torch.stack([pil_one(d) for d in batch]).to(device)

    def pil_threads(batch: list[bytes]) -> torch.Tensor:
        return torch.stack(list(pool.map(pil_one, batch))).to(device)

    def pipeline(batch: list[bytes]) -> torch.Tensor:
        decoded = pipe.decode(batch)
        return torch.stack(pipe.transform(decoded, ["vtab"] * len(batch)))  # type: ignore[arg-type]

    methods = {"pil-serial": pil_serial, "pil-threads": pil_threads, "pipeline": pipeline}
    rows: list[dict[str, Any]] = []
    for b in args.batches:
        batch = files[:b]
        for name, fn in methods.items():
            sec = timed(lambda fn=fn, batch=batch: fn(batch), args.seconds, device)
            rows.append({"method": name, "batch": b, "ms_per_batch": sec * 1e3, "images_per_s": b / sec})
    both = overlap(pipe, files[: max(b for b in args.batches if b <= 64)], device, args.seconds)
    header_rows = headers(files[:64], limits, args.seconds)
    reopen_rows = reopen(files[0], limits, args.seconds)
    pipe.close()
    pool.shutdown()

    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    print(
        f"640x480 JPEGs ({statistics.mean(map(len, files)) / 1024:.0f} KB avg) -> [B, 3, 224, 224] on {device}"
        f" ({gpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads)"
    )
    print(f"{'method':<12} " + " ".join(f"{'B=' + str(b):>10}" for b in args.batches) + "   (images/s)")
    for name in methods:
        cells = [r["images_per_s"] for r in rows if r["method"] == name]
        print(f"{name:<12} " + " ".join(f"{c:>10.0f}" for c in cells))
    print(f"overlap at B={both['batch']}: decode {both['decode_ms']:.1f} ms, compute {both['compute_ms']:.1f} ms, "
          f"both in two threads {both['both_ms']:.1f} ms -> {both['overlap']:.2f}x (2.0: full overlap)")  # fmt: skip
    for h in header_rows:
        print(f"header of a JPEG ({h['files']}): Pillow {h['pillow_us']:.1f} us, scan {h['scan_us']:.1f} us "
              f"-> {h['speedup']:.1f}x")  # fmt: skip
    for r in reopen_rows:
        print(f"{r['format']} 640x480: second open {r['open_us']:.1f} us, decode {r['decode_ms']:.2f} ms "
              f"-> {100 * r['share']:.2f}% of it")  # fmt: skip
    rows += [both, *header_rows, *reopen_rows]
    result = {
        "device": str(device),
        "gpu": gpu,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "image": "640x480 photo-like JPEG, quality 90",
        "avg_bytes": statistics.mean(map(len, files)),
        "rows": rows,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"images_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
