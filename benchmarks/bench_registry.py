"""Registry benchmark: PromptStore registration / fetch latency and throughput for a ViT-B sized prompt
set, listing latency and Redis memory per task with 10,000 registered tasks.

    python benchmarks/bench_registry.py                     # private redis-server (clean memory numbers)
    python benchmarks/bench_registry.py --redis-url redis://127.0.0.1:6379/0   # an existing Redis

Everything goes into a throwaway namespace that is deleted at the end.
Results: benchmarks/results/registry.json.
The backbone is described by a BackboneInfo with ViT-B/16 shapes (no model is built).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from e2vpt.core.backbone import BackboneInfo
from e2vpt.core.promptset import PromptSet
from e2vpt.registry.store import PromptStore

RESULTS = Path(__file__).parent / "results" / "registry.json"

VIT_B = BackboneInfo(
    name="vit_base_patch16_224",
    fingerprint="vit_base_patch16_224@sha256:bench00000000000",
    depth=12,
    embed_dim=768,
    num_heads=12,
    head_dim=64,
    num_prefix_tokens=1,
    num_patches=196,
    patch_size=(16, 16),
    img_size=(224, 224),
    in_chans=3,
    global_pool="token",
    num_classes=0,
)


def vit_b_set(task_id: str, dtype: torch.dtype) -> PromptSet:
    g = torch.Generator().manual_seed(0)
    ps = PromptSet.create(
        task_id, VIT_B, [f"class-{i}" for i in range(100)], num_prompts=10, num_kv=5, generator=g
    )
    return ps.to(dtype=dtype)


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=100, method="inclusive") if len(s) >= 2 else [s[0]] * 99
    return {
        "n": len(s),
        "mean_ms": statistics.fmean(s) * 1e3,
        "p50_ms": q[49] * 1e3,
        "p95_ms": q[94] * 1e3,
        "p99_ms": q[98] * 1e3,
        "max_ms": s[-1] * 1e3,
        "per_second": len(s) / sum(s),
    }


def timed(fn: Callable[[], object], n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return stats(samples)


def used_memory(store: PromptStore) -> int:
    return int(store.client.info("memory")["used_memory"])


def bench_one_dtype(store: PromptStore, dtype: torch.dtype, n: int) -> dict[str, Any]:
    ps = vit_b_set("bench-latency", dtype)
    # two contents taking turns, so that every timed registration is a new version (the store keeps a
    # registration of the current file as a no-op: `register_unchanged`)
    sets = [ps, replace(ps, metrics={"turn": 1.0})]
    blobs = [s.to_bytes() for s in sets]
    data = blobs[0]
    out: dict[str, Any] = {"file_bytes": len(data), "parameters": ps.num_parameters}
    store.register(ps)  # warm up (script load, connection)
    turn = iter(range(10**9))
    out["register_object"] = timed(
        lambda: store.register(sets[next(turn) % 2]), n
    )  # validate + serialise + Lua
    out["register_bytes"] = timed(lambda: store.register_bytes(blobs[next(turn) % 2]), n)  # parse + validate
    store.register_bytes(data)
    out["register_unchanged"] = timed(
        lambda: store.register_bytes(data), n
    )  # the current file again: no write
    out["get_bytes_current"] = timed(lambda: store.get_bytes("bench-latency"), n)  # one Lua read
    out["get_validated_current"] = timed(lambda: store.get("bench-latency"), n)  # + parse + validate
    out["current_version"] = timed(lambda: store.current_version("bench-latency"), n)
    out["register_MB_per_s"] = out["register_bytes"]["per_second"] * len(data) / 1e6
    out["get_bytes_MB_per_s"] = out["get_bytes_current"]["per_second"] * len(data) / 1e6
    store.delete("bench-latency")
    return out


def fill(store: PromptStore, n: int, dtype: torch.dtype, prefix: str) -> dict[str, Any]:
    """Register n distinct tasks (ViT-B sets); memory delta per task from INFO memory."""
    base = vit_b_set("x", dtype)
    mem0 = used_memory(store)
    t0 = time.perf_counter()
    for i in range(n):
        store.register(replace(base, task_id=f"{prefix}-{i:05d}"))
    elapsed = time.perf_counter() - t0
    mem1 = used_memory(store)
    return {
        "tasks": n,
        "file_bytes": len(base.to_bytes()),
        "seconds": elapsed,
        "registrations_per_second": n / elapsed,
        "redis_used_memory_delta_bytes": mem1 - mem0,
        "redis_bytes_per_task": (mem1 - mem0) / n,
    }


def bench_listing(store: PromptStore, total: int) -> dict[str, Any]:
    out: dict[str, Any] = {"tasks": store.count()}
    out["first_page_100"] = timed(lambda: store.list_tasks(limit=100), 50)
    cursor: str | None = "0"
    for _ in range(total // 2 // 1000):  # the cursor in the middle of the listing
        _, cursor = store.list_tasks(cursor=cursor or 0, limit=1000)
    out["middle_page_100"] = timed(lambda: store.list_tasks(cursor=cursor or 0, limit=100), 50)
    out["page_1000"] = timed(lambda: store.list_tasks(limit=1000), 20)

    def walk(limit: int) -> int:
        count, cur = 0, 0
        while True:
            page, cur = store.list_tasks(cursor=cur, limit=limit)
            count += len(page)
            if cur is None:
                return count
        return count

    for limit in (100, 1000):
        t0 = time.perf_counter()
        seen = walk(limit)
        out[f"full_walk_limit_{limit}"] = {"tasks_seen": seen, "seconds": time.perf_counter() - t0}
    ids = [f"list-{i:05d}" for i in range(0, total, max(1, total // 1000))][:1000]
    out["current_versions_1000_ids"] = timed(lambda: store.current_versions(ids), 20)
    return out


class PrivateRedis:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", help="an existing Redis (default: start a private redis-server)")
    ap.add_argument("--n", type=int, default=200, help="calls per latency measurement")
    ap.add_argument("--tasks", type=int, default=10_000, help="registered tasks for listing / memory")
    ap.add_argument("--fp32-tasks", type=int, default=1_000, help="fp32 tasks for memory per fp32 task")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)

    private = None if args.redis_url else PrivateRedis()
    url = args.redis_url or private.url  # type: ignore[union-attr]
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    store = PromptStore(url, VIT_B, namespace=namespace, keep_versions=10)
    results: dict[str, Any] = {
        "benchmark": "registry",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "cpus": os.cpu_count(),
            "load_avg_1m_at_start": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "redis_version": store.client.info("server")["redis_version"],
            "redis": "private redis-server, no persistence" if private else url,
        },
        "prompt_set": {
            "backbone": "ViT-B/16 shapes",
            "L": 12,
            "D": 768,
            "H": 12,
            "P": 10,
            "T": 5,
            "classes": 100,
        },
    }
    try:
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            print(f"latency {name} ...", flush=True)
            results[f"latency_{name}"] = bench_one_dtype(store, dtype, args.n)
        print(f"memory: {args.fp32_tasks} fp32 tasks ...", flush=True)
        results["memory_fp32"] = fill(store, args.fp32_tasks, torch.float32, "mem32")
        store.drop_all()
        print(f"filling {args.tasks} fp16 tasks ...", flush=True)
        results["memory_fp16"] = fill(store, args.tasks, torch.float16, "list")
        print("listing ...", flush=True)
        results["listing"] = bench_listing(store, args.tasks)
        results["host"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    finally:
        deleted = store.drop_all()
        results["cleanup"] = {"keys_deleted": deleted, "keys_left": len(store.all_keys())}
        store.close()
        if private:
            private.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
