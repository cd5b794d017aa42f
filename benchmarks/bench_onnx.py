"""Eager PyTorch vs onnxruntime on the same prompted backbone, side by side in one run.

For each backbone (random init, 224x224), batch size and task mix, the two backends run interleaved
(torch, onnx, torch, onnx, ...) so that load from other processes hits both alike. Timed: features of a
padded mixed-task batch plus the per-task heads (`TaskBatch.logits`), i.e. what the engine runs per batch.
Task mixes: "10/5" (every image the same task, P=10, T=5) and "mixed" (round robin over the official
per-task sizes P/T 10/5, 5/5, 1/1, 32/5, 10/10: padded to 32/10 with masks).
On a CUDA machine the GPU part also runs torch on CUDA vs the CUDA (and TensorRT) providers; on CPU
it is recorded as skipped.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_onnx.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from e2vpt.core.backbone import Backbone, load_backbone
from e2vpt.core.model import TaskBatch
from e2vpt.core.promptset import PromptSet
from e2vpt.onnx.backend import OnnxBackend
from e2vpt.onnx.export import export_onnx
from e2vpt.serving.backends import FeatureBackend, TorchBackend

MIXES: dict[str, list[tuple[int, int]]] = {
    "10/5": [(10, 5)],
    "mixed": [(10, 5), (5, 5), (1, 1), (32, 5), (10, 10)],
}
NUM_CLASSES = (10, 37, 102, 2, 100)


def task_batch(backbone: Backbone, sizes: list[tuple[int, int]]) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    sets = [
        PromptSet.create(
            f"t{i}",
            backbone.info,
            [str(c) for c in range(NUM_CLASSES[i % 5])],
            num_prompts=p,
            num_kv=t,
            generator=g,
        )
        for i, (p, t) in enumerate(sizes)
    ]
    return TaskBatch.from_prompt_sets(sets, device=backbone.device)


def run_once(
    backend: FeatureBackend, tasks: TaskBatch, images: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    with torch.inference_mode():
        out = tasks.logits(backend.features(images, *tasks.gather(index)), index)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out


def compare(
    backends: dict[str, FeatureBackend],
    tasks: TaskBatch,
    images: torch.Tensor,
    index: torch.Tensor,
    *,
    warmup: int,
    iters: int,
    budget_s: float,
) -> dict[str, Any]:
    """Interleaved timing; stops after `iters` rounds or once `budget_s` is spent (at least 2 rounds)."""
    outs = {name: run_once(b, tasks, images, index) for name, b in backends.items()}
    for _ in range(warmup - 1):
        for b in backends.values():
            run_once(b, tasks, images, index)
    times: dict[str, list[float]] = {name: [] for name in backends}
    start = time.perf_counter()
    for r in range(iters):
        for name, b in backends.items():
            t0 = time.perf_counter()
            run_once(b, tasks, images, index)
            times[name].append(time.perf_counter() - t0)
        if r >= 1 and time.perf_counter() - start > budget_s:
            break
    ref = outs[next(iter(backends))].float().cpu()
    result: dict[str, Any] = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {
            "median_ms": round(med * 1e3, 2),
            "min_ms": round(min(ts) * 1e3, 2),
            "images_per_s": round(len(index) / med, 2),
            "runs": len(ts),
            "max_abs_diff_vs_first": float((outs[name].float().cpu() - ref).abs().max()),
        }
    base = result[next(iter(backends))]["median_ms"]
    for name in result:
        result[name]["speedup_vs_first"] = round(base / result[name]["median_ms"], 3)
    return result


def bench_device(
    device: str, models: list[str], batches: list[int], args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    rows = []
    for model_name in models:
        backbone = load_backbone(model_name, device=device)
        path = workdir / f"{model_name}.onnx"
        if not path.exists():
            t0 = time.perf_counter()
            export_onnx(backbone, path, max_prompts=32, max_kv=10, exporter=args.exporter, verify=False)
            print(
                f"exported {model_name} in {time.perf_counter() - t0:.1f}s ({path.stat().st_size / 1e6:.1f} MB)"
            )
        backends: dict[str, FeatureBackend] = {"torch": TorchBackend(backbone)}
        if device == "cpu":
            backends["onnxruntime-cpu"] = OnnxBackend(
                backbone, path, ["CPUExecutionProvider"], threads=args.threads
            )
        else:
            available = ort.get_available_providers()
            for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
                if provider in available:
                    key = "onnxruntime-" + provider.removesuffix("ExecutionProvider").lower()
                    backends[key] = OnnxBackend(backbone, path, [provider, "CPUExecutionProvider"])
        for mix_name, sizes in MIXES.items():
            tasks = task_batch(backbone, sizes)
            for batch in batches:
                g = torch.Generator().manual_seed(batch)
                images = torch.randn(batch, 3, *backbone.info.img_size, generator=g).to(device)
                index = (torch.arange(batch) % len(sizes)).to(device)
                res = compare(
                    backends,
                    tasks,
                    images,
                    index,
                    warmup=args.warmup,
                    iters=args.iters,
                    budget_s=args.budget_s,
                )
                row = {"device": device, "model": model_name, "mix": mix_name, "batch": batch, "results": res}
                rows.append(row)
                summary = ", ".join(
                    f"{k} {v['median_ms']} ms ({v['speedup_vs_first']}x)" for k, v in res.items()
                )
                print(f"{device} {model_name} {mix_name} b={batch}: {summary}", flush=True)
        del backends, backbone
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=20.0, help="time per configuration (>= 2 rounds)")
    parser.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    parser.add_argument("--out", default="benchmarks/results/onnx_cpu.json")
    parser.add_argument("--workdir", default=None, help="where exported graphs go (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-onnx-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.time()
    rows = bench_device("cpu", args.models, args.batches, args, workdir)
    gpu: dict[str, Any]
    if torch.cuda.is_available():
        gpu = {"rows": bench_device("cuda", args.models, args.batches, args, workdir / "cuda")}
        gpu["name"] = torch.cuda.get_device_name()
    else:
        gpu = {
            "skipped": "no CUDA device on this machine (onnxruntime providers: "
            f"{ort.get_available_providers()})"
        }
    report = {
        "benchmark": "eager PyTorch vs onnxruntime, prompted ViT features + per-task heads",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "note": "shared machine: other processes compete for the CPU; runs are interleaved per config",
        },
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "settings": {**vars(args), "mixes": MIXES, "image_size": 224, "weights": "random init (seed 0)"},
        "wall_s": round(time.time() - started, 1),
        "cpu": rows,
        "gpu": gpu,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
