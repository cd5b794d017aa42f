"""Serving benchmark: the in-process engine and TorchServe over HTTP, one run, JSON out.

    .venv/bin/python benchmarks/bench_serving.py [--backbone tiny|vit_tiny] [--seconds 4] [--out ...]

Measures (numbers are for this machine only; the load generator shares the CPU with the server):
- engine alone: batch-1 latency, throughput at batch 8 for one task vs 100 distinct tasks, cold vs warm
  first-request cost (cold = the task's prompt set is fetched from Redis, validated and moved to the device);
- HTTP (TorchServe, token auth on): closed-loop load with asyncio + httpx at several concurrency levels for
  one task, 100 tasks uniform, and 100 tasks Zipf(1.1); throughput and p50/p95/p99; cold vs warm over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
from e2vpt.config import Settings  # noqa: E402
from e2vpt.core.backbone import load_backbone, save_checkpoint  # noqa: E402
from e2vpt.core.promptset import PromptSet  # noqa: E402
from e2vpt.dev.images import image_bytes  # noqa: E402
from e2vpt.dev.localredis import ensure_redis  # noqa: E402
from e2vpt.registry.store import PromptStore  # noqa: E402
from e2vpt.serving.engine import MultiTaskEngine, RequestItem, Result  # noqa: E402
from e2vpt.torchserve.archive import TorchServe, build_mar  # noqa: E402

BACKBONES = {
    "tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
    "vit_tiny": ("vit_tiny_patch16_224", {}),
}
NUM_TASKS = 100


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summary(latencies: list[float], wall: float, errors: int = 0) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / wall if wall > 0 else 0.0,
        "p50_ms": pct(latencies, 50) * 1e3,
        "p95_ms": pct(latencies, 95) * 1e3,
        "p99_ms": pct(latencies, 99) * 1e3,
    }


def task_sampler(mix: str, rng: np.random.Generator, tasks: list[str]):  # noqa: ANN201
    if mix == "one":
        return lambda: tasks[0]
    if mix == "uniform":
        return lambda: tasks[int(rng.integers(len(tasks)))]
    weights = 1.0 / np.arange(1, len(tasks) + 1) ** 1.1
    weights /= weights.sum()
    return lambda: tasks[int(rng.choice(len(tasks), p=weights))]


# ---------------------------------------------------------------------- engine alone
def bench_engine(
    engine: MultiTaskEngine, tasks: list[str], images: list[bytes], seconds: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    engine.predict([RequestItem(t, images[0]) for t in tasks])  # warm every task
    for batch in (1, 8):
        for mix in ("one", "uniform"):
            pick = task_sampler(mix, rng, tasks)
            lat: list[float] = []
            n_items = 0
            t_end = time.perf_counter() + seconds
            t0 = time.perf_counter()
            while time.perf_counter() < t_end:
                items = [RequestItem(pick(), images[int(rng.integers(len(images)))]) for _ in range(batch)]
                s = time.perf_counter()
                res = engine.predict(items)
                lat.append(time.perf_counter() - s)
                assert all(isinstance(r, Result) for r in res)
                n_items += batch
            wall = time.perf_counter() - t0
            key = f"batch{batch}_{'1task' if mix == 'one' else '100tasks'}"
            out[key] = {**summary(lat, wall), "items_per_s": n_items / wall}
    out["ratio_100tasks_vs_1task_batch8"] = (
        out["batch8_100tasks"]["items_per_s"] / out["batch8_1task"]["items_per_s"]
    )
    return out


def bench_cold_engine(
    engine: MultiTaskEngine, store: PromptStore, info: Any, image: bytes, n: int = 20
) -> dict:
    cold, warm = [], []
    for i in range(n):
        tid = f"cold-{uuid.uuid4().hex[:8]}-{i}"
        store.register(PromptSet.create(tid, info, [f"c{j}" for j in range(10)]))
        for bucket in (cold, warm):
            s = time.perf_counter()
            (res,) = engine.predict([RequestItem(tid, image)])
            bucket.append(time.perf_counter() - s)
            assert isinstance(res, Result)
    return {
        "cold_p50_ms": statistics.median(cold) * 1e3,
        "warm_p50_ms": statistics.median(warm) * 1e3,
        "cold_minus_warm_p50_ms": (statistics.median(cold) - statistics.median(warm)) * 1e3,
        "cold_load_p50_ms (cache stat)": statistics.median(engine.cache.stats.last_cold_load_seconds) * 1e3,
    }


# ---------------------------------------------------------------------- HTTP
async def http_load(
    url: str,
    headers: dict[str, str],
    pick,
    images: list[bytes],
    concurrency: int,
    seconds: float,  # noqa: ANN001
) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    t_end = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient, k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < t_end:
            s = time.perf_counter()
            r = await client.post(url, content=images[i % len(images)], headers={"X-Task-Id": pick()})
            if r.status_code == 200:
                lat.append(time.perf_counter() - s)
            else:
                errors += 1
            i += concurrency

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client, k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    return summary(lat, wall, errors)


def bench_http(ts: TorchServe, store: PromptStore, info: Any, tasks: list[str], images: list[bytes],
               seconds: float, concurrencies: list[int]) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"runs": {}}
    headers = {**ts.auth(), "Content-Type": "application/octet-stream"}
    rng = np.random.default_rng(1)

    async def warm_all() -> None:
        async with httpx.AsyncClient(headers=headers, timeout=60) as c:
            for _ in range(3):  # every worker sees every task
                await asyncio.gather(*(c.post(ts.predictions_url, content=images[0], headers={"X-Task-Id": t})
                                       for t in tasks))  # fmt: skip

    asyncio.run(warm_all())
    for conc in concurrencies:  # mixes interleaved per level: drifting machine load hits all of them alike
        for mix in ("one", "uniform", "zipf"):
            res = asyncio.run(http_load(ts.predictions_url, headers, task_sampler(mix, rng, tasks), images, conc,
                                        seconds))  # fmt: skip
            out["runs"][f"{mix}_c{conc}"] = res
            print(f"http {mix:8s} c={conc:3d}: {res['throughput_rps']:8.1f} rps  p50 {res['p50_ms']:.2f} ms  "
                  f"p99 {res['p99_ms']:.2f} ms  errors {res['errors']}", flush=True)  # fmt: skip
    top = max(concurrencies)
    out[f"ratio_100tasks_uniform_vs_1task_at_c{top}"] = (
        out["runs"][f"uniform_c{top}"]["throughput_rps"] / out["runs"][f"one_c{top}"]["throughput_rps"]
    )
    out[f"ratio_100tasks_zipf_vs_1task_at_c{top}"] = (
        out["runs"][f"zipf_c{top}"]["throughput_rps"] / out["runs"][f"one_c{top}"]["throughput_rps"]
    )
    # cold vs warm first request over HTTP (fresh tasks; the worker fetches from Redis on the first one)
    cold, warm = [], []
    with httpx.Client(headers=headers, timeout=60) as c:
        for i in range(20):
            tid = f"hcold-{uuid.uuid4().hex[:8]}-{i}"
            store.register(PromptSet.create(tid, info, [f"c{j}" for j in range(10)]))
            for bucket in (cold, warm):
                s = time.perf_counter()
                r = c.post(ts.predictions_url, content=images[0], headers={"X-Task-Id": tid})
                bucket.append(time.perf_counter() - s)
                assert r.status_code == 200, r.text
    out["cold_vs_warm"] = {
        "cold_p50_ms": statistics.median(cold) * 1e3,
        "warm_p50_ms": statistics.median(warm) * 1e3,
        "cold_minus_warm_p50_ms": (statistics.median(cold) - statistics.median(warm)) * 1e3,
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=sorted(BACKBONES), default="tiny")
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each load run")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batch-delay-ms", type=int, default=5)
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    name, kwargs = BACKBONES[args.backbone]
    tmp = Path(tempfile.mkdtemp(prefix="e2vpt-bench-serving-"))
    ckpt = save_checkpoint(load_backbone(name, **kwargs).model, name, kwargs, tmp / "backbone.safetensors")
    backbone = load_backbone(checkpoint=ckpt)
    redis_url, local = ensure_redis(args.redis_url)
    namespace = f"bench-serving-{uuid.uuid4().hex[:8]}"
    store = PromptStore(redis_url, backbone.info, namespace=namespace)
    result: dict[str, Any] = {
        "backbone": {"name": name, "kwargs": kwargs, "fingerprint": backbone.info.fingerprint},
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "note": "load generator, Redis and TorchServe share these CPUs with other jobs",
        },  # fmt: skip
        "num_tasks": NUM_TASKS,
    }
    ts: TorchServe | None = None
    try:
        g = torch.Generator().manual_seed(0)
        tasks = [f"task{i:03d}" for i in range(NUM_TASKS)]
        for t in tasks:
            store.register(PromptSet.create(t, backbone.info, [f"{t}-c{j}" for j in range(10)], generator=g))
        images = [image_bytes(i, (64, 48), "JPEG") for i in range(16)]

        engine = MultiTaskEngine(backbone, store, Settings(cache_version_check_ms=500))
        result["engine"] = bench_engine(engine, tasks, images, args.seconds)
        result["engine"]["cold_vs_warm"] = bench_cold_engine(engine, store, backbone.info, images[0])
        print(json.dumps(result["engine"], indent=1), flush=True)
        engine.close()

        mar = build_mar(tmp / "mar", checkpoint=ckpt)
        env = {"E2VPT_REDIS_URL": redis_url, "E2VPT_STORE_NAMESPACE": namespace}
        ts = TorchServe(mar, tmp / "ts", workers=args.workers, batch_size=args.batch_size,
                        max_batch_delay_ms=args.max_batch_delay_ms, env=env).start()  # fmt: skip
        conc = [int(c) for c in args.concurrency.split(",")]
        result["http"] = bench_http(ts, store, backbone.info, tasks, images, args.seconds, conc)
        result["http"]["config"] = {"workers": args.workers, "batch_size": args.batch_size,
                                    "max_batch_delay_ms": args.max_batch_delay_ms, "seconds": args.seconds}  # fmt: skip
        e1 = result["engine"]["batch1_1task"]["p50_ms"]
        h1 = result["http"]["runs"]["one_c1"]["p50_ms"]
        result["http_overhead_batch1"] = {"engine_p50_ms": e1, "http_p50_ms": h1, "overhead_ms": h1 - e1}
        result["machine"]["loadavg_end"] = os.getloadavg()
    finally:
        if ts is not None:
            ts.stop()
        store.drop_all()
        store.close()
        if local is not None:
            local.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "engine"}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
