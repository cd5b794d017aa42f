"""The GPU benchmark (issue 11): the serving path from the backbone alone to HTTP, in one run, JSON out.

    python benchmarks/bench_gpu.py                      # CUDA when present: ViT-B/16 fp16 -> results/gpu_cuda.json
    python benchmarks/bench_gpu.py --quick              # smaller (on a CPU: vit_tiny, B 1 and 8)
    python benchmarks/bench_gpu.py --device cpu --quick --budget-s 300
    python benchmarks/bench_gpu.py --only ceiling --ceiling-configs 1x64x5,2x64x5 --http-seconds 10

Sections (each recorded in the JSON, or skipped with its reason):
- model: per batch size B, the bare backbone (timm's own forward_features + pooling), the prompted path
  with P = T = 0, one task, min(B, 64) distinct tasks mixed, a mixed batch with padding (P and T differ per
  task: masks), and one forward per task (B = 64). Ratios against bare. CUDA-event medians on a GPU.
- assembly: from the cached (device-resident) prompt sets of the batch's tasks to the forward's inputs.
- compile: the torch backend with torch.compile (settings torch_compile / torch_compile_mode) vs eager.
- engine: `MultiTaskEngine.predict` end to end from 640x480 JPEG bytes, real Redis `PromptStore` with 100
  registered tasks, each batch's items spread uniformly over them; at B = 64 also from JPEGs of 32 sizes
  around 640x480 (uploads come in all sizes: on a GPU each size is its own resize).
- stages: where one engine's time goes at B = 64 (torch.profiler over the engine's stage ranges: host ms
  per call, and device ms on CUDA).
- http: TorchServe (the product's .mar) with 100 tasks at concurrency 64, where Java and TorchServe exist.
- ceiling: TorchServe with a handler whose engine does no work (benchmarks/ts_null_handler.py, its own
  .mar, the same adapter parsing): the front end's own requests/s at concurrency 64.
- worker: the Python half of that ceiling without Java (runs wherever TorchServe's Python package is):
  one worker's message decoding, handler (null engine) and response encoding per batch, requests/s.

Each measured variant is one small function (`v_*`, `assemble`, `prompted_forward`), so that a new
attention path, prompt table or image pipeline is measured by pointing one function at it.
The load generator is a small keep-alive HTTP/1.1 client on asyncio (httpx costs more CPU per request than
the front end it measures); it shares the machine's cores with TorchServe, which the JSON records.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from e2vpt.config import Settings  # noqa: E402
from e2vpt.core.backbone import Backbone, load_backbone, save_checkpoint  # noqa: E402
from e2vpt.core.model import PromptedViT, TaskBatch  # noqa: E402
from e2vpt.core.promptset import PromptSet  # noqa: E402
from e2vpt.dev.images import photo_jpeg  # noqa: E402
from e2vpt.serving.backends import make_backend  # noqa: E402
from e2vpt.serving.cache import compacted  # noqa: E402
from e2vpt.serving.engine import DTYPES, RequestItem, Result, serving_dtype  # noqa: E402
from e2vpt.serving.table import PromptTable, TableBatch, TableSlot  # noqa: E402

NUM_TASKS = 100  # registered in Redis for the engine and HTTP sections
MIXED_TASKS = 64  # distinct tasks in a mixed batch
NULL_HANDLER = ROOT / "benchmarks" / "ts_null_handler.py"
SECTIONS = ("model", "assembly", "engine", "stages", "compile", "http", "ceiling", "worker")
_DEADLINE = [float("inf")]  # time.monotonic() after which optional sub-steps are skipped (--budget-s)


def out_of_time() -> bool:
    return time.monotonic() > _DEADLINE[0]


# ---------------------------------------------------------------------- profiles
@dataclass
class Profile:
    backbone: str
    model_batches: list[int]
    engine_batches: list[int]
    engine_micro_batches: list[int]  # engine_micro_batch variants measured beside 0 (one forward per batch)
    warmup: int
    repeats: int
    engine_seconds: float  # per engine batch size (at least `engine_min_calls` calls)
    engine_min_calls: int
    http_seconds: float
    ceiling_configs: list[tuple[int, int, int]]  # (workers, batch size, max batch delay ms)
    compile_modes: list[str]


def profile(device: str, quick: bool, gpu_ts: tuple[int, int, int], cpu_ts: tuple[int, int, int]) -> Profile:
    if device == "cuda":
        return Profile(
            backbone="vit_base_patch16_224",
            model_batches=[64] if quick else [1, 64, 256],
            engine_batches=[1, 64] if quick else [1, 8, 64, 256],
            engine_micro_batches=[32] if quick else [16, 32, 64],
            warmup=5,
            repeats=20 if quick else 40,
            engine_seconds=1.0 if quick else 2.0,
            engine_min_calls=3,
            http_seconds=5.0 if quick else 10.0,
            ceiling_configs=[gpu_ts] if quick else [gpu_ts, cpu_ts],
            compile_modes=["default"] if quick else ["default", "reduce-overhead"],
        )
    return Profile(
        backbone="vit_tiny_patch16_224",
        model_batches=[1, 8] if quick else [1, 8, 64],
        engine_batches=[1, 8] if quick else [1, 8, 64],
        engine_micro_batches=[4] if quick else [16, 32],
        warmup=2,
        repeats=5 if quick else 10,
        engine_seconds=1.0 if quick else 3.0,
        engine_min_calls=3,
        http_seconds=5.0 if quick else 10.0,
        ceiling_configs=[gpu_ts] if quick else [gpu_ts, cpu_ts],
        compile_modes=[],  # inductor on a CPU compiles for minutes: ask with --compile-modes
    )


# ---------------------------------------------------------------------- timing
def time_cases(
    cases: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Median (and p10/p90) ms per call of every case, interleaved round-robin so that drifting load hits
    all cases alike. CUDA: events around each call; CPU: perf_counter (the calls are synchronous)."""
    cuda = device.type == "cuda"
    with torch.inference_mode():
        for fn in cases.values():
            for _ in range(warmup):
                fn()
        if cuda:
            torch.cuda.synchronize(device)
        times: dict[str, list[float]] = {n: [] for n in cases}
        names = list(cases)
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                fn = cases[name]
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return {
        n: {
            "median_ms": statistics.median(v),
            "p10_ms": float(np.percentile(v, 10)),
            "p90_ms": float(np.percentile(v, 90)),
            "n": len(v),
        }
        for n, v in times.items()
    }


# ---------------------------------------------------------------------- inputs
def make_sets(bb: Backbone, n: int, kinds: Sequence[tuple[int, int, bool]], seed: int) -> list[PromptSet]:
    """n distinct tasks cycling through `kinds` (P, T, half-pruned); class counts 2..100."""
    g = torch.Generator().manual_seed(seed)
    sets = []
    for i in range(n):
        p, t, half = kinds[i % len(kinds)]
        labels = [f"c{j}" for j in range(2 + (i * 7) % 99)]
        ps = PromptSet.create(f"t{seed}-{i}", bb.info, labels, num_prompts=p, num_kv=t, generator=g)
        if half:
            keep = torch.zeros(p, dtype=torch.uint8)
            keep[torch.randperm(p, generator=g)[: p // 2]] = 1
            ps = replace(ps, token_mask=keep)
        sets.append(ps)
    return sets


UNIFORM = [(10, 5, False)]  # P = 10, T = 5 for every task
PADDED = [(10, 5, False), (10, 5, True), (10, 3, False)]  # P 10 / 5 (compacted), T 5 / 3: padding and masks


# ---------------------------------------------------------------------- measured variants
# Each returns what the serving path computes for one batch: prompts gathered from the device-resident
# `PromptTable` (as `MultiTaskEngine._forward` does), the prompted forward, the per-task heads.
@dataclass
class Cached:
    """Prompt sets resident in a `PromptTable` (compacted, on the device, in the serving dtype)."""

    table: PromptTable
    slots: list[TableSlot]
    sets: list[PromptSet]  # the same sets, for the pre-table assembly (`TaskBatch.from_prompt_sets`)

    def __getitem__(self, s: slice) -> Cached:
        return Cached(self.table, self.slots[s], self.sets[s])


def assemble(cached: Cached, task_of_image: Sequence[int], device: torch.device) -> TableBatch:
    """Batch assembly as the engine does it: index gathers from the table (no per-task copies)."""
    return cached.table.gather([cached.slots[i] for i in task_of_image])


def assemble_before(cached: Cached, task_of_image: Sequence[int], device: torch.device) -> object:
    """The assembly before the table (commit 7e3342e): a fresh padded `TaskBatch` of the batch's distinct
    sets on every call, then the per-image gather."""
    tasks = TaskBatch.from_prompt_sets(cached.sets, device=device, dtype=cached.table.dtype)
    return tasks.gather(torch.tensor(list(task_of_image), device=device))


def prompted_forward(model: PromptedViT, images: torch.Tensor, a: TableBatch) -> torch.Tensor:
    """The prompted forward of an assembled batch: features with per-image prompts, then per-task heads."""
    return a.logits(model.forward_features(images, *a.prompts))


def v_bare(model: PromptedViT, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    vit = model.vit
    return lambda: vit.forward_head(vit.forward_features(images), pre_logits=True)


def v_no_prompts(model: PromptedViT, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: model.forward_features(images)


def v_prompted(model: PromptedViT, images: torch.Tensor, a: TableBatch) -> Callable[[], torch.Tensor]:
    return lambda: prompted_forward(model, images, a)


def v_per_task(model: PromptedViT, images: torch.Tensor, per_image: list[TableBatch]) -> Callable[[], None]:
    """The alternative mixed batching replaces: one forward per image's task (here one image each)."""

    def run() -> None:
        for b, a in enumerate(per_image):
            prompted_forward(model, images[b : b + 1], a)

    return run


def v_backend(backend: Any, images: torch.Tensor, a: TableBatch | None) -> Callable[[], torch.Tensor]:
    """A `FeatureBackend` (e.g. the compiled torch backend) on the same inputs, heads included."""
    if a is None:
        return lambda: backend.features(images, None, None, None, None)
    return lambda: a.logits(backend.features(images, *a.prompts))


# ---------------------------------------------------------------------- sections
def cached_sets(bb: Backbone, sets: Sequence[PromptSet], device: torch.device, dtype: torch.dtype) -> Cached:
    on_device = [compacted(s).to(device=device, dtype=dtype) for s in sets]
    table = PromptTable(bb.info, device=device, dtype=dtype, max_bytes=2**31)
    return Cached(table, [table.insert(s) for s in on_device], on_device)


def section_model(bb: Backbone, prof: Profile, device: torch.device, dtype: torch.dtype) -> list[dict]:
    model = PromptedViT(bb).eval()
    uniform = cached_sets(bb, make_sets(bb, MIXED_TASKS, UNIFORM, seed=1), device, dtype)
    padded = cached_sets(bb, make_sets(bb, MIXED_TASKS, PADDED, seed=2), device, dtype)
    rows = []
    for B in prof.model_batches:
        g = torch.Generator().manual_seed(B)
        images = torch.randn(B, 3, *bb.info.img_size, generator=g).to(device=device, dtype=dtype)
        u = min(B, MIXED_TASKS)
        cases: dict[str, Callable[[], object]] = {
            "bare": v_bare(model, images),
            "no_prompts": v_no_prompts(model, images),
            "one_task": v_prompted(model, images, assemble(uniform[:1], [0] * B, device)),
            "mixed": v_prompted(model, images, assemble(uniform[:u], [b % u for b in range(B)], device)),
            "mixed_padded": v_prompted(
                model, images, assemble(padded[:u], [b % u for b in range(B)], device)
            ),
        }
        if B == 64:
            per_image = [assemble(uniform[b : b + 1], [0], device) for b in range(B)]
            cases["per_task_forwards"] = v_per_task(model, images, per_image)
        res = time_cases(cases, device, prof.warmup, prof.repeats)
        bare = res["bare"]["median_ms"]
        for name, r in res.items():
            rows.append(
                {
                    "B": B,
                    "case": name,
                    "tasks": {"one_task": 1, "mixed": u, "mixed_padded": u, "per_task_forwards": B}.get(
                        name, 0
                    ),
                    **r,
                    "images_per_s": B / r["median_ms"] * 1e3,
                    "vs_bare": r["median_ms"] / bare,
                }
            )
        print_rows(f"model B={B}", [r for r in rows if r["B"] == B])
    return rows


def section_assembly(bb: Backbone, prof: Profile, device: torch.device, dtype: torch.dtype) -> list[dict]:
    sets = cached_sets(bb, make_sets(bb, MIXED_TASKS, PADDED, seed=3), device, dtype)
    rows = []
    batches = sorted({*prof.model_batches, *prof.engine_batches})
    cases: dict[str, Callable[[], object]] = {}
    for B in batches:
        u = min(B, MIXED_TASKS)
        index = [b % u for b in range(B)]
        cases[f"B={B}"] = lambda s=sets[:u], i=index: assemble(s, i, device)
        cases[f"before B={B}"] = lambda s=sets[:u], i=index: assemble_before(s, i, device)
    res = time_cases(cases, device, prof.warmup, max(prof.repeats, 20))
    for B in batches:
        for how, key in (("table", f"B={B}"), ("before", f"before B={B}")):
            rows.append({"B": B, "tasks": min(B, MIXED_TASKS), "assembly": how, **res[key]})
    print_rows("assembly", rows)
    return rows


def compile_mode(bb: Backbone, mode: str, eager: Any, images: torch.Tensor, a: TableBatch, device: torch.device,
                 prof: Profile) -> list[dict]:  # fmt: skip
    """One torch.compile mode against eager: first-call (compile) seconds, agreement, and timings."""
    B = images.shape[0]
    rows = []
    torch._dynamo.reset()  # each mode compiles afresh (no cache entries of the previous mode)
    backend = make_backend(
        "torch", bb, Settings(device=str(device), torch_compile=True, torch_compile_mode=mode)
    )
    compile_s = {}
    for name, aa in (("bare", None), ("mixed", a)):
        t0 = time.perf_counter()
        with torch.inference_mode():
            v_backend(backend, images, aa)()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compile_s[name] = time.perf_counter() - t0
    with torch.inference_mode():  # compiled and eager agree (fp16: a few 1e-3 on logits)
        diff = (v_backend(backend, images, a)().float() - v_backend(eager, images, a)().float()).abs().max()
    cases = {
        "eager_bare": v_backend(eager, images, None),
        "eager_mixed": v_backend(eager, images, a),
        "compiled_bare": v_backend(backend, images, None),
        "compiled_mixed": v_backend(backend, images, a),
    }
    res = time_cases(cases, device, prof.warmup, prof.repeats)
    for name, r in res.items():
        rows.append(
            {
                "mode": mode,
                "B": B,
                "case": name,
                **r,
                "vs_eager_bare": r["median_ms"] / res["eager_bare"]["median_ms"],
                "first_call_s": compile_s.get(name.split("_", 1)[1]) if name.startswith("compiled") else None,
                "max_abs_logit_diff_vs_eager": float(diff) if name == "compiled_mixed" else None,
            }
        )
    return rows


def section_compile(bb: Backbone, prof: Profile, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Eager vs torch.compile'd torch backend (through the settings), bare and mixed, at B = 64."""
    B = 64 if device.type == "cuda" else max(prof.model_batches)
    sets = cached_sets(bb, make_sets(bb, MIXED_TASKS, UNIFORM, seed=4), device, dtype)
    images = torch.randn(B, 3, *bb.info.img_size).to(device=device, dtype=dtype)
    u = min(B, MIXED_TASKS)
    a = assemble(sets[:u], [b % u for b in range(B)], device)
    eager = make_backend("torch", bb, Settings(device=str(device)))
    rows = []
    for mode in prof.compile_modes:
        if out_of_time():
            rows.append({"mode": mode, "skipped": "time budget spent"})
            continue
        try:  # one mode failing to compile keeps the others
            rows.extend(compile_mode(bb, mode, eager, images, a, device, prof))
        except Exception as exc:
            traceback.print_exc()
            rows.append({"mode": mode, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print_rows(f"compile {mode}", [r for r in rows if r["mode"] == mode and "case" in r])
    return rows


def register_tasks(store: Any, bb: Backbone, n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    tasks = [f"task{i:03d}" for i in range(n)]
    for i, t in enumerate(tasks):
        labels = [f"{t}-c{j}" for j in range(2 + (i * 7) % 99)]
        store.register(PromptSet.create(t, bb.info, labels, num_prompts=10, num_kv=5, generator=g))
    return tasks


def random_items(rng: Any, tasks: list[str], jpegs: list[bytes], n: int) -> list[RequestItem]:
    """n engine items, each a task and an image drawn uniformly."""
    return [RequestItem(tasks[int(rng.integers(len(tasks)))], jpegs[int(rng.integers(len(jpegs)))])
            for _ in range(n)]  # fmt: skip


def warm_engine(engine: Any, tasks: list[str], jpegs: list[bytes]) -> None:
    """Every task resident (cold loads are not the engine sections' subject)."""
    for i in range(0, len(tasks), 64):
        engine.predict([RequestItem(t, jpegs[0]) for t in tasks[i : i + 64]])


def section_engine(bb: Backbone, store: Any, tasks: list[str], jpegs: list[bytes], prof: Profile,
                   settings: Settings, sized: list[bytes] | None = None) -> list[dict]:  # fmt: skip
    """The engine from JPEG bytes at each batch size, one forward beside the micro-batch variants; then at
    B = 64 (or the largest below) with `sized`, JPEGs of as many sizes as files (real uploads: every size
    its own resize on the GPU; `jpegs` share one size); then two engines."""
    from e2vpt.serving.engine import MultiTaskEngine

    engine = MultiTaskEngine(bb, store, settings)
    rng = np.random.default_rng(0)
    rows: list[dict] = []

    def measure(B: int, pool: list[bytes], micro_batches: list[int], label: dict[str, Any]) -> None:
        def batch(n: int = B) -> list[RequestItem]:
            return random_items(rng, tasks, pool, n)

        # micro-batch variants (settings.engine_micro_batch), calls interleaved so drifting load hits all alike
        variants = [0, *(m for m in micro_batches if 0 < m < B)]
        configs = {m: settings.model_copy(update={"engine_micro_batch": m}) for m in variants}
        lat: dict[int, list[float]] = {m: [] for m in variants}
        errors = dict.fromkeys(variants, 0)
        for m in variants:  # warm this batch size
            engine.settings = configs[m]
            engine.predict(batch())
        t_end = time.perf_counter() + prof.engine_seconds * len(variants)
        while min(len(v) for v in lat.values()) < prof.engine_min_calls or time.perf_counter() < t_end:
            for m in variants:
                items = batch()
                engine.settings = configs[m]
                t0 = time.perf_counter()
                res = engine.predict(items)
                lat[m].append(time.perf_counter() - t0)
                errors[m] += sum(not isinstance(r, Result) for r in res)
        engine.settings = settings
        for m in variants:
            med = statistics.median(lat[m])
            rows.append({"B": B, "micro_batch": m, **label, "calls": len(lat[m]), "median_ms": med * 1e3,
                         "p90_ms": float(np.percentile(lat[m], 90)) * 1e3, "items_per_s": B / med,
                         "errors": errors[m]})  # fmt: skip
        print_rows("engine", rows[-len(variants) :])

    try:
        warm_engine(engine, tasks, jpegs)
        for B in prof.engine_batches:
            measure(B, jpegs, prof.engine_micro_batches, {})
        if sized and not out_of_time():
            B = max((b for b in prof.engine_batches if b <= 64), default=min(prof.engine_batches))
            measure(B, sized, [], {"image_sizes": len(sized)})
        rows.append(engine_two_workers(engine, bb, store, settings, tasks, jpegs, prof, rng))
        print_rows("engine", rows[-1:])
    finally:
        engine.close()
    return rows


def section_stages(bb: Backbone, store: Any, tasks: list[str], jpegs: list[bytes], settings: Settings,
                   B: int = 64, calls: int = 10) -> list[dict]:  # fmt: skip
    """Where one engine's time goes at batch B: `calls` predict() calls under torch.profiler, per stage
    (`engine.STAGES`, the engine's record_function ranges): host ms per call (the time the calling thread
    spends in the stage, waits for the device included: `e2vpt.head` holds the wait for the forward's
    kernels) and, on CUDA, device ms per call (kernels launched inside the stage). The last row is the
    whole call and what lies outside every stage."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from e2vpt.serving.engine import STAGES, MultiTaskEngine

    engine = MultiTaskEngine(bb, store, settings)
    rng = np.random.default_rng(1)
    batches = [random_items(rng, tasks, jpegs, B) for _ in range(calls)]
    activities = [ProfilerActivity.CPU]
    cuda = engine.device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    try:
        warm_engine(engine, tasks, jpegs)
        engine.predict(batches[0])
        with torch_profile(activities=activities) as p:
            t0 = time.perf_counter()
            for items in batches:
                engine.predict(items)
            if cuda:
                torch.cuda.synchronize(engine.device)
            wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    finally:
        engine.close()
    # per stage name the largest totals over the profiler's entries of that name (a CUDA profile may list a
    # range twice: the host range, and its annotation on the device's timeline)
    host: dict[str, float] = {}
    dev: dict[str, float] = {}
    for e in p.key_averages():
        if e.key in STAGES:
            host[e.key] = max(host.get(e.key, 0.0), e.cpu_time_total)
            device_us = getattr(e, "device_time_total", None)
            device_us = getattr(e, "cuda_time_total", 0.0) if device_us is None else device_us
            dev[e.key] = max(dev.get(e.key, 0.0), device_us)
    rows = []
    for name in STAGES:
        ms = host.get(name, 0.0) / 1e3 / calls
        row = {"stage": name, "B": B, "host_ms": ms, "share": ms / wall_ms}
        if cuda:
            row["device_ms"] = dev.get(name, 0.0) / 1e3 / calls
        rows.append(row)
    inside = sum(r["host_ms"] for r in rows)
    rows.append({"stage": "predict (whole call)", "B": B, "host_ms": wall_ms, "share": 1.0,
                 "outside_stages_ms": wall_ms - inside, "calls": calls})  # fmt: skip
    print_rows(f"stages (one engine, B = {B}, per call)", rows)
    return rows


def engine_two_workers(engine: Any, bb: Backbone, store: Any, settings: Settings, tasks: list[str],
                       jpegs: list[bytes], prof: Profile, rng: Any, B: int = 64) -> dict:  # fmt: skip
    """Two engines on one GPU, each called back to back from its own thread (what two TorchServe workers
    do): one engine's decoding and host work overlap the other's forward. Items/s of both together."""
    import threading

    from e2vpt.registry.store import PromptStore
    from e2vpt.serving.engine import MultiTaskEngine

    # its own store (an engine closes its store), as a second worker process has
    second = MultiTaskEngine(bb, PromptStore(store.redis_url, bb.info, namespace=store.namespace), settings)
    engines = [engine, second]
    for i in range(0, len(tasks), 64):
        second.predict([RequestItem(t, jpegs[0]) for t in tasks[i : i + 64]])
    batches = [random_items(rng, tasks, jpegs, B) for _ in range(8)]
    done = [0, 0]
    errors = [0, 0]
    t_end = time.perf_counter() + prof.engine_seconds

    def work(k: int) -> None:
        j = 0
        while time.perf_counter() < t_end:
            res = engines[k].predict(batches[j % len(batches)])
            errors[k] += sum(not isinstance(r, Result) for r in res)
            done[k] += B
            j += 1

    try:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
    finally:
        second.close()
    return {"B": f"{B} x 2 engines", "calls": sum(done) // B, "median_ms": float("nan"), "p90_ms": float("nan"),
            "items_per_s": sum(done) / wall, "errors": sum(errors)}  # fmt: skip


# ---------------------------------------------------------------------- HTTP
async def _http_worker(host: str, port: int, requests: list[bytes], t_end: float, lat: list[float],
                       statuses: dict[int, int]) -> None:  # fmt: skip
    """One keep-alive connection sending requests back to back until t_end."""
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while time.perf_counter() < t_end:
            req = requests[i % len(requests)]
            i += 1
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
            }
            if "content-length" in headers:
                await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            lat.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


def http_requests(path: str, host: str, token: str, tasks: list[str], bodies: list[bytes], n: int,
                  seed: int) -> list[bytes]:  # fmt: skip
    """n raw HTTP/1.1 requests: image bytes as the body, the task in X-Task-Id, tasks uniform at random."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        body = bodies[int(rng.integers(len(bodies)))]
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                f"X-Task-Id: {tasks[int(rng.integers(len(tasks)))]}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        out.append(head.encode() + body)
    return out


def http_load(
    ts: Any, tasks: list[str], bodies: list[bytes], concurrency: int, seconds: float
) -> dict[str, Any]:
    from urllib.parse import urlsplit

    url = urlsplit(ts.predictions_url)
    token = ts.keys()["inference"]
    host, port = url.hostname or "127.0.0.1", int(url.port or 80)

    async def run(secs: float) -> tuple[list[float], dict[int, int], float]:
        lat: list[float] = []
        statuses: dict[int, int] = {}
        t0 = time.perf_counter()
        t_end = t0 + secs
        workers = [
            asyncio.ensure_future(
                _http_worker(
                    host,
                    port,
                    http_requests(url.path, f"{host}:{port}", token, tasks, bodies, 64, k),
                    t_end,
                    lat,
                    statuses,
                )  # fmt: skip
            )
            for k in range(concurrency)
        ]
        _, late = await asyncio.wait(workers, timeout=secs + 30.0)  # a request still open 30 s after the end
        for w in late:
            w.cancel()
        if late:
            statuses[-1] = len(late)  # -1: connections cut while waiting for an answer
        return lat, statuses, time.perf_counter() - t0

    asyncio.run(run(min(2.0, seconds)))  # warm-up: every worker and (mostly) every task
    lat, statuses, wall = asyncio.run(run(seconds))
    ok = statuses.get(200, 0)
    return {
        "concurrency": concurrency,
        "seconds": wall,
        "requests": len(lat),
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "requests_per_s": ok / wall,
        "p50_ms": float(np.percentile(lat, 50)) * 1e3 if lat else None,
        "p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat else None,
    }


def torchserve_missing() -> str | None:
    """Why TorchServe cannot run here, or None."""
    if shutil.which("java") is None:
        return "no java on PATH (TorchServe's front end is Java)"
    from e2vpt.torchserve.archive import _bin

    for name in ("torchserve", "torch-model-archiver"):
        try:
            _bin(name)
        except FileNotFoundError:
            return f"{name} is not installed"
    return None


def build_null_mar(export_dir: Path) -> Path:
    """The null handler in its own .mar (no weights: a placeholder serialized file)."""
    from e2vpt.torchserve.archive import _bin

    export_dir.mkdir(parents=True, exist_ok=True)
    placeholder = export_dir / "placeholder.bin"
    placeholder.write_bytes(b"\0")
    cmd = [_bin("torch-model-archiver"), "--model-name", "e2vpt-null", "--version", "1.0",
           "--serialized-file", str(placeholder), "--handler", str(NULL_HANDLER),
           "--export-path", str(export_dir), "--force"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return export_dir / "e2vpt-null.mar"


def ts_env(extra: dict[str, str]) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), path) if p), **extra}


def section_http(ckpt: Path, tmp: Path, redis_url: str, namespace: str, tasks: list[str], jpegs: list[bytes],
                 prof: Profile, settings: Settings, concurrency: int) -> dict[str, Any]:  # fmt: skip
    from e2vpt.torchserve.archive import TorchServe, build_mar

    mar = build_mar(tmp / "mar", checkpoint=ckpt, engine_config={
        "device": settings.device, "serving_dtype": settings.serving_dtype, "backend": "torch"})  # fmt: skip
    workers, batch, delay = settings.ts_batching
    env = ts_env({"E2VPT_REDIS_URL": redis_url, "E2VPT_STORE_NAMESPACE": namespace})
    ts = TorchServe(mar, tmp / "ts", settings=settings, workers=workers, batch_size=batch,
                    max_batch_delay_ms=delay, env=env)  # fmt: skip
    try:
        ts.start(timeout=max(settings.ts_startup_timeout_s, 300))  # workers load the backbone: slow when busy
        res = http_load(ts, tasks, jpegs, concurrency, prof.http_seconds)
    finally:
        ts.stop()
    out = {"workers": workers, "batch_size": batch, "max_batch_delay_ms": delay, "tasks": len(tasks), **res}
    print_rows("http (TorchServe, product .mar)", [out])
    return out


def section_ceiling(tmp: Path, tasks: list[str], jpegs: list[bytes], prof: Profile, settings: Settings,
                    concurrency: int) -> list[dict[str, Any]]:  # fmt: skip
    from e2vpt.torchserve.archive import TorchServe

    mar = build_null_mar(tmp / "null-mar")
    rows: list[dict[str, Any]] = []
    for k, (workers, batch, delay) in enumerate(prof.ceiling_configs):
        row: dict[str, Any] = {"workers": workers, "batch_size": batch, "max_batch_delay_ms": delay}
        if out_of_time():
            rows.append({**row, "skipped": "time budget spent"})
            continue
        ts = TorchServe(mar, tmp / f"ts-null-{k}", settings=settings, workers=workers, batch_size=batch,
                        max_batch_delay_ms=delay, env=ts_env({}))  # fmt: skip
        try:  # one config failing (e.g. workers too slow to start on a loaded machine) keeps the others
            ts.start(timeout=max(settings.ts_startup_timeout_s, 300))
            row.update(http_load(ts, tasks, jpegs, concurrency, prof.http_seconds))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            ts.stop()
        row["loadavg"] = os.getloadavg()
        rows.append(row)
        print_rows("ceiling (TorchServe, null engine)", rows[-1:])
    return rows


class _MessageReader:
    """A socket's recv() over one message in memory: the worker reads it as it reads TorchServe's socket."""

    def __init__(self, data: bytes) -> None:
        self.view, self.pos = memoryview(data), 0

    def recv(self, n: int) -> bytes:
        chunk = self.view[self.pos : self.pos + n].tobytes()
        self.pos += len(chunk)
        return chunk


def otf_predict_message(bodies: Sequence[bytes], tasks: Sequence[str], token: str = "") -> bytes:
    """One batch as TorchServe's Java front end writes it to a worker (the frame format that
    `ts.protocol.otf_message_handler.retrieve_msg` reads): per request an id, the HTTP headers and the raw
    body as parameter "body"."""
    import struct

    def field(b: bytes) -> bytes:
        return struct.pack("!i", len(b)) + b

    end = struct.pack("!i", -1)
    msg = bytearray(b"I")
    for body, task in zip(bodies, tasks, strict=True):
        msg += field(uuid.uuid4().hex.encode())
        headers = {"Host": "127.0.0.1:8080", "User-Agent": "bench_gpu", "Accept": "*/*",
                   "Content-Type": "image/jpeg", "Content-Length": str(len(body)), "X-Task-Id": task}  # fmt: skip
        if token:
            headers["Authorization"] = f"Bearer {token}"
        for k, v in headers.items():
            msg += field(k.encode()) + field(v.encode())
        msg += end
        msg += field(b"body") + field(b"image/jpeg") + field(body) + end
    msg += end
    return bytes(msg)


def section_worker(tasks: list[str], jpegs: list[bytes], prof: Profile, batches: Sequence[int] = (1, 8, 64)
                   ) -> list[dict[str, Any]]:  # fmt: skip
    """The Python half of TorchServe's ceiling, without Java: one worker process's own work per batch,
    in this process, from the bytes the front end sends (`otf_predict_message`) to the bytes it answers:
    TorchServe's message decoding (`retrieve_msg`), its `Service.predict` around the handler (the null
    handler: the adapter's parsing and responses, an engine that does no work) and its response encoding.
    Socket copies and the Java front end are not in it. requests/s of one worker, and us per request by part."""
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.protocol.otf_message_handler import retrieve_msg
    from ts.service import Service

    sys.path.insert(0, str(NULL_HANDLER.parent))
    from ts_null_handler import NullHandler

    cache = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    cache.initialize_cache()
    handler = NullHandler()
    handler_s = [0.0]

    def entry(data: list[dict[str, Any]], context: Any) -> list[Any]:
        t0 = time.perf_counter()
        try:
            return handler.handle(data, context)
        finally:
            handler_s[0] += time.perf_counter() - t0

    service = Service("null", str(NULL_HANDLER.parent), None, entry, None, max(batches), metrics_cache=cache)
    service.set_cl_socket(None)
    rng = np.random.default_rng(2)
    rows: list[dict[str, Any]] = []
    for B in batches:
        picks = random_items(rng, tasks, jpegs, B)
        msg = otf_predict_message([p.image for p in picks], [p.task_id for p in picks], token="t" * 32)
        calls, retrieve_s, predict_s = 0, 0.0, 0.0
        handler_s[0] = 0.0
        t_end = time.perf_counter() + prof.engine_seconds
        while calls < 5 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            cmd, batch = retrieve_msg(_MessageReader(msg))
            t1 = time.perf_counter()
            resp = service.predict(batch)
            t2 = time.perf_counter()
            retrieve_s, predict_s, calls = retrieve_s + t1 - t0, predict_s + t2 - t1, calls + 1
            if cmd != b"I" or len(batch) != B or not resp:
                raise RuntimeError(f"the worker did not answer the batch of {B}")
        per = 1e6 / (calls * B)
        rows.append({"B": B, "calls": calls, "requests_per_s": calls * B / (retrieve_s + predict_s),
                     "us_per_request": (retrieve_s + predict_s) * per, "decode_us": retrieve_s * per,
                     "handler_us": handler_s[0] * per, "service_and_encode_us": (predict_s - handler_s[0]) * per})  # fmt: skip
        print_rows("worker (TorchServe's Python side, null engine, one process)", rows[-1:])
    return rows


# ---------------------------------------------------------------------- output
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = [c for c in rows[0] if c not in ("p10_ms", "n")]
    print(f"\n## {title}\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |", flush=True)


def environment(device: torch.device, dtype: torch.dtype, backbone: str) -> dict[str, Any]:
    import timm

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "backbone": backbone,
        "torch_threads": torch.get_num_threads(),
        "unix_time": time.time(),
    }
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline numbers, one row each (printed last; the goals of issue 11 beside them)."""
    rows: list[dict[str, Any]] = []
    model = result.get("model")
    if isinstance(model, list):
        for r in model:
            if r["case"] in ("bare", "one_task", "mixed", "mixed_padded", "per_task_forwards"):
                rows.append({"what": f"model {r['case']}", "B": r["B"], "ms": r["median_ms"],
                             "per_s": r["images_per_s"], "x_bare": r["vs_bare"], "goal": "<= 1.10x bare"
                             if r["case"] in ("one_task", "mixed") else ""})  # fmt: skip
    if isinstance(result.get("assembly"), list):
        for r in result["assembly"]:
            rows.append(
                {
                    "what": f"assembly ({r.get('assembly', 'table')})",
                    "B": r["B"],
                    "ms": r["median_ms"],
                    "goal": "<= 0.3 ms at B=64" if r.get("assembly", "table") == "table" else "before",
                }
            )
    if isinstance(result.get("compile"), list):
        for r in (r for r in result["compile"] if "case" in r):
            rows.append({"what": f"compile[{r['mode']}] {r['case']}", "B": r["B"], "ms": r["median_ms"],
                         "x_bare": r["vs_eager_bare"]})  # fmt: skip
    if isinstance(result.get("engine"), list):
        for r in result["engine"]:
            micro = f", micro-batch {r['micro_batch']}" if r.get("micro_batch") else ""
            sizes = f", {r['image_sizes']} sizes" if r.get("image_sizes") else ""
            rows.append({"what": f"engine (JPEG bytes{sizes}{micro})", "B": r["B"], "ms": r["median_ms"],
                         "per_s": r["items_per_s"], "goal": ">= 3000/s at B=64 (GPU)"})  # fmt: skip
    if isinstance(result.get("http"), dict) and "requests_per_s" in result["http"]:
        h = result["http"]
        rows.append({"what": f"http c={h['concurrency']} ({h['workers']}x{h['batch_size']}x{h['max_batch_delay_ms']})",
                     "per_s": h["requests_per_s"], "ms": h["p50_ms"], "goal": ">= 1500/s (GPU)"})  # fmt: skip
    if isinstance(result.get("ceiling"), list):
        for c in (c for c in result["ceiling"] if "requests_per_s" in c):
            rows.append({"what": f"ceiling c={c['concurrency']} ({c['workers']}x{c['batch_size']}x"
                         f"{c['max_batch_delay_ms']})", "per_s": c["requests_per_s"], "ms": c["p50_ms"]})  # fmt: skip
    if isinstance(result.get("stages"), list):
        for r in result["stages"]:
            rows.append({"what": f"stage {r['stage']}", "B": r["B"], "ms": r["host_ms"],
                         "goal": f"device {r['device_ms']:.3g} ms" if "device_ms" in r else ""})  # fmt: skip
    if isinstance(result.get("worker"), list):
        for r in result["worker"]:
            rows.append({"what": "worker (TorchServe Python side, null engine)", "B": r["B"],
                         "ms": r["us_per_request"] * r["B"] / 1e3, "per_s": r["requests_per_s"]})  # fmt: skip
    cols = ["what", "B", "ms", "per_s", "x_bare", "goal"]
    return [{c: r.get(c, "") for c in cols} for r in rows]


# ---------------------------------------------------------------------- main
def parse_ts(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        w, b, d = (int(x) for x in part.lower().split("x"))
        out.append((w, b, d))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cpu")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument(
        "--dtype", default="auto", help=f"auto (fp16 on CUDA, fp32 on CPU) or one of {sorted(DTYPES)}"
    )
    ap.add_argument("--backbone", default=None, help="timm name (default: vit_base_patch16_224 on CUDA)")
    ap.add_argument("--batches", default=None, help="model batch sizes, e.g. 1,64,256")
    ap.add_argument("--engine-batches", default=None, help="engine batch sizes, e.g. 1,8,64,256")
    ap.add_argument(
        "--micro-batches", default=None, help="engine_micro_batch variants, e.g. 16,32 ('' for none)"
    )
    ap.add_argument("--compile-modes", default=None, help="torch.compile modes to measure ('' for none)")
    ap.add_argument(
        "--ceiling-configs", default=None, help="WORKERSxBATCHxDELAYMS,... for the null front end"
    )
    ap.add_argument("--http-seconds", type=float, default=None)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--only", default=None, help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument(
        "--budget-s", type=float, default=0.0, help="skip later sections once this is spent (0: none)"
    )
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    ap.add_argument("--out", default=None, help="default: benchmarks/results/gpu_<device>.json")
    args = ap.parse_args(argv)

    # SIGTERM (`timeout`) unwinds like Ctrl-C: the TorchServe instances and the private Redis are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.monotonic()
    if args.budget_s:
        _DEADLINE[0] = t_start + args.budget_s
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    dev = "cpu" if dev == "auto" else dev
    device = torch.device(dev)
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    base = Settings(device=dev, serving_dtype=args.dtype, cache_version_check_ms=500)
    dtype = serving_dtype(base)
    cpu_ts = (Settings().ts_workers, Settings().ts_batch_size, Settings().ts_max_batch_delay_ms)
    gpu_ts = Settings(device="cuda").ts_batching
    prof = profile(device.type, args.quick, gpu_ts, cpu_ts)
    if args.backbone:
        prof.backbone = args.backbone
    if args.batches:
        prof.model_batches = [int(x) for x in args.batches.split(",")]
    if args.engine_batches:
        prof.engine_batches = [int(x) for x in args.engine_batches.split(",")]
    if args.micro_batches is not None:
        prof.engine_micro_batches = [int(x) for x in args.micro_batches.split(",") if x]
    if args.compile_modes is not None:
        prof.compile_modes = [m for m in args.compile_modes.split(",") if m]
    if args.ceiling_configs:
        prof.ceiling_configs = parse_ts(args.ceiling_configs)
    if args.http_seconds is not None:
        prof.http_seconds = args.http_seconds
    wanted = [s for s in (args.only.split(",") if args.only else SECTIONS) if s not in args.skip.split(",")]
    out_path = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu_{device.type}.json")

    result: dict[str, Any] = {
        "environment": environment(device, dtype, prof.backbone),
        "config": {
            "quick": args.quick,
            "num_tasks": NUM_TASKS,
            "mixed_tasks": MIXED_TASKS,
            "P": 10,
            "T": 5,
            "padded_kinds (P, T, half-pruned)": PADDED,
            "concurrency": args.concurrency,
            "profile": prof.__dict__,
            "budget_s": args.budget_s,
        },  # fmt: skip
        "skipped": {},
    }

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")

    def run(name: str, fn: Callable[[], Any], why_not: str | None = None) -> None:
        if name not in wanted:
            return
        spent = time.monotonic() - t_start
        if why_not is None and out_of_time():
            why_not = f"time budget spent ({spent:.0f} s of {args.budget_s:.0f} s)"
        if why_not is not None:
            result["skipped"][name] = why_not
            print(f"\n## {name}: skipped ({why_not})", flush=True)
        else:
            t0 = time.monotonic()
            try:
                result[name] = fn()
            except Exception as exc:  # one failing section must not lose the others
                traceback.print_exc()
                result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            result.setdefault("section_seconds", {})[name] = time.monotonic() - t0
        save()

    print(f"# bench_gpu: {prof.backbone} on {result['environment']['device_name']} ({dev}), "
          f"{result['environment']['dtype']}, torch {torch.__version__}", flush=True)  # fmt: skip
    bb = load_backbone(prof.backbone, device=device, dtype=dtype)
    run("model", lambda: section_model(bb, prof, device, dtype))
    run("assembly", lambda: section_assembly(bb, prof, device, dtype))

    tmp = Path(tempfile.mkdtemp(prefix="e2vpt-bench-gpu-"))
    needs_redis = {"engine", "stages", "http"} & set(wanted)
    store = local = None
    tasks = [f"task{i:03d}" for i in range(NUM_TASKS)]
    jpegs = [photo_jpeg(i) for i in range(32)]
    result["config"]["jpeg_bytes_mean"] = statistics.mean(len(j) for j in jpegs)
    redis_url = ""
    namespace = f"bench-gpu-{uuid.uuid4().hex[:8]}"
    try:
        if needs_redis:
            from e2vpt.dev.localredis import ensure_redis
            from e2vpt.registry.store import PromptStore

            redis_url, local = ensure_redis(args.redis_url)
            store = PromptStore(redis_url, bb.info, namespace=namespace)
            t0 = time.perf_counter()
            tasks = register_tasks(store, bb, NUM_TASKS)
            result["config"]["register_100_tasks_s"] = time.perf_counter() - t0
        # `sized`: as many sizes as files, around 640x480 (the size of `jpegs`), made only when the section runs
        run("engine", lambda: section_engine(bb, store, tasks, jpegs, prof, base,
                                             [photo_jpeg(100 + i, (640 - 8 * i, 480 - 6 * i)) for i in range(32)]))  # fmt: skip
        run("stages", lambda: section_stages(bb, store, tasks, jpegs, base))
        run("compile", lambda: section_compile(bb, prof, device, dtype),
            None if prof.compile_modes else "no compile modes for this device (--compile-modes)")  # fmt: skip
        missing = torchserve_missing()
        ckpt = tmp / "backbone.safetensors"
        if "http" in wanted and missing is None:
            save_checkpoint(load_backbone(prof.backbone).model, prof.backbone, {}, ckpt)
        run("http", lambda: section_http(ckpt, tmp, redis_url, namespace, tasks, jpegs, prof, base,
                                         args.concurrency), missing)  # fmt: skip
        run("ceiling", lambda: section_ceiling(tmp, tasks, jpegs, prof, base, args.concurrency), missing)
        no_ts = (
            None if importlib.util.find_spec("ts") else "TorchServe's Python package (ts) is not installed"
        )
        run("worker", lambda: section_worker(tasks, jpegs, prof), no_ts)
    finally:
        if store is not None:
            store.drop_all()
            store.close()
        if local is not None:
            local.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result["environment"]["loadavg_end"] = os.getloadavg()
    result["summary"] = summary_rows(result)
    save()
    print_rows(f"summary: {prof.backbone} {result['environment']['dtype']} on {result['environment']['device_name']}",
               result["summary"])  # fmt: skip
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"wrote {out_path}")
    return 1 if any(isinstance(result.get(s), dict) and "error" in result[s] for s in SECTIONS) else 0


if __name__ == "__main__":
    sys.exit(main())
