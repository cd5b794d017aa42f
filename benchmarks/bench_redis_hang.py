"""A hung Redis (SIGSTOP, not killed) against the in-process serving engine: prints a table, saves JSON.

    .venv/bin/python benchmarks/bench_redis_hang.py [--seconds 3] [--out benchmarks/results/redis_hang.json]

A private redis-server; the tiny backbone; 4 cached tasks. Phases: healthy, hung (the redis-server is
SIGSTOPped: connections hang, nothing is refused), recovered (SIGCONT). In each phase: back-to-back
batches of 8 items of the cached tasks (latency per batch), and cold loads of never-requested tasks (time
to the answer, 503 or 200). Settings are the serving defaults (cache_store_timeout_ms, backoff, version
check interval) unless given. Numbers are for this machine; the engine shares its CPU with other work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from e2vpt.config import Settings  # noqa: E402
from e2vpt.core.backbone import load_backbone  # noqa: E402
from e2vpt.core.promptset import PromptSet  # noqa: E402
from e2vpt.dev.images import image_bytes  # noqa: E402
from e2vpt.dev.localredis import LocalRedis  # noqa: E402
from e2vpt.dev.tiny import TINY  # noqa: E402
from e2vpt.registry.store import PromptStore  # noqa: E402
from e2vpt.serving.engine import MultiTaskEngine, RequestItem, Result  # noqa: E402

CACHED = [f"cached-{i}" for i in range(4)]


def batches(engine: MultiTaskEngine, seconds: float) -> dict[str, Any]:
    imgs = [image_bytes(i) for i in range(8)]
    items = [RequestItem(CACHED[i % len(CACHED)], im) for i, im in enumerate(imgs)]
    lat, failed = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        out = engine.predict(items)
        lat.append(time.perf_counter() - t0)
        failed += sum(not isinstance(r, Result) for r in out)
    a = np.asarray(lat) * 1e3
    return {
        "batches": len(lat),
        "failed_items": failed,
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
    }


def cold(engine: MultiTaskEngine, task_ids: list[str]) -> list[dict[str, Any]]:
    out = []
    for t in task_ids:
        t0 = time.perf_counter()
        (res,) = engine.predict([RequestItem(t, image_bytes(99))])
        out.append(
            {
                "task": t,
                "ms": (time.perf_counter() - t0) * 1e3,
                "status": 200 if isinstance(res, Result) else res.http_status,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each phase's batch loop")
    ap.add_argument("--cold", type=int, default=5, help="cold loads per phase")
    ap.add_argument("--store-timeout-ms", type=int, default=None, help="cache_store_timeout_ms")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "redis_hang.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    overrides = {} if args.store_timeout_ms is None else {"cache_store_timeout_ms": args.store_timeout_ms}
    settings = Settings(**overrides)
    redis = LocalRedis(workdir=Path(tempfile.mkdtemp(prefix="e2vpt-hang-"))).start()
    assert redis.proc is not None
    backbone = load_backbone("vit_tiny_patch16_224", **TINY)
    store = PromptStore(
        redis.url,
        backbone.info,
        namespace=f"bench-hang-{os.getpid()}",
        socket_timeout=settings.cache_store_timeout_ms / 1000,
    )
    phases = ("healthy", "hung", "recovered")
    cold_ids = {p: [f"cold-{p}-{i}" for i in range(args.cold)] for p in phases}
    g = torch.Generator().manual_seed(0)
    for t in CACHED + [t for ids in cold_ids.values() for t in ids]:
        store.register(PromptSet.create(t, backbone.info, ["a", "b", "c"], generator=g))
    engine = MultiTaskEngine(backbone, store, settings)
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {
            k: getattr(settings, k)
            for k in ("cache_store_timeout_ms", "cache_store_backoff_ms", "cache_version_check_ms")
        },
        "phases": {},
    }
    stopped = False
    try:
        for t in CACHED:
            engine.cache.get(t)
        batches(engine, 0.5)  # warm-up
        for phase in phases:
            if phase == "hung":
                os.kill(redis.proc.pid, signal.SIGSTOP)
                stopped = True
                # the worst case: a cold load right after the hang began, before anything noticed it
                result["first_cold_after_sigstop"] = cold(engine, [cold_ids["recovered"][0]])[0]
            if phase == "recovered":
                os.kill(redis.proc.pid, signal.SIGCONT)
                stopped = False
                t0 = time.perf_counter()
                while not isinstance(
                    engine.predict([RequestItem(cold_ids[phase][0], image_bytes(1))])[0], Result
                ):
                    time.sleep(0.01)
                result["recovery_ms"] = (time.perf_counter() - t0) * 1e3
            res = {
                "batches": batches(engine, args.seconds),
                "cold": cold(engine, cold_ids[phase][1:] if phase == "recovered" else cold_ids[phase]),
            }
            result["phases"][phase] = res
    finally:
        if stopped:
            os.kill(redis.proc.pid, signal.SIGCONT)
        engine.close()
        redis.stop()

    print(
        f"{'phase':<10} {'batches':>8} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}   cold loads (ms, status)"
    )
    for phase, res in result["phases"].items():
        b = res["batches"]
        colds = ", ".join(f"{c['ms']:.0f}/{c['status']}" for c in res["cold"])
        print(
            f"{phase:<10} {b['batches']:>8} {b['failed_items']:>7} {b['p50_ms']:>8.2f} {b['p99_ms']:>8.2f} "
            f"{b['max_ms']:>8.2f}   {colds}"
        )
    first = result["first_cold_after_sigstop"]
    print(f"first cold load right after SIGSTOP: {first['ms']:.0f} ms, status {first['status']}")
    print(f"first successful cold load {result['recovery_ms']:.0f} ms after SIGCONT")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
