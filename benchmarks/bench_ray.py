"""Benchmark of the engine on Ray Serve (a script, not a test): throughput and p99 against the number of
engine replicas, prompt-cache hit rate with task affinity on and off, and time to recover after a replica
is killed. Real HTTP through Serve's proxy, a real Redis (a private one is started), a local Ray cluster.

    python benchmarks/bench_ray.py                  # quick (default): tiny backbone on CPU, 1-3 replicas
    python benchmarks/bench_ray.py --full           # more requests per point
    python benchmarks/bench_ray.py --gpus 4 --backbone vit_base_patch16_224   # 1..4 replicas, one GPU each

Cases:
    replicas    for n = 1..max: `requests` requests over `tasks` tasks (uniform), `concurrency` in flight;
                requests/s and latency p50/p99 (client side). Replicas are added in place (no restarts).
    affinity    1,000 tasks under a Zipf(1.1) load on the largest replica count, each replica's prompt cache
                bounded to `cache_tasks` sets; hit rate = hits / (hits + cold loads) summed over replicas,
                affinity on, then off (Ray's power-of-two router; a new application, as a router cannot
                be swapped on a live handle).
    recovery    under steady load on `max` replicas, one replica actor is killed: failed requests, time
                until Serve runs `max` replicas again, and until the latency p99 of a 1 s window is back
                under twice its pre-kill value.
Writes benchmarks/results/ray.json (--out). Without ray installed it says so and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

try:
    import ray
    from ray import serve
except ImportError:  # the `ray` extra is optional
    ray = None

from e2vpt.config import Settings
from e2vpt.core.backbone import Backbone, load_backbone, save_checkpoint
from e2vpt.core.promptset import PromptSet
from e2vpt.dev.images import image_bytes
from e2vpt.dev.localredis import LocalRedis, free_port
from e2vpt.dev.tiny import tiny_checkpoint
from e2vpt.registry.store import PromptStore
from e2vpt.serving.cache import compacted
from e2vpt.serving.table import PromptTable

ROOT = Path(__file__).resolve().parents[1]
APP = "e2vpt-bench"


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


def zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return [1 / (k**s) for k in range(1, n + 1)]


class Load:
    """An HTTP load generator: `concurrency` clients sending (task, image) requests."""

    def __init__(self, url: str, token: str, images: list[bytes]) -> None:
        self.url, self.images = url, images
        self.headers = {"Authorization": f"Bearer {token}"}

    async def run(self, tasks: list[str], concurrency: int) -> list[tuple[float, float, int]]:
        """(start, seconds, status) per request, every task in `tasks` sent once."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        for t in tasks:
            queue.put_nowait(t)
        out: list[tuple[float, float, int]] = []

        async def client(c: httpx.AsyncClient) -> None:
            while not queue.empty():
                t = queue.get_nowait()
                t0 = time.perf_counter()
                try:
                    r = await c.post(self.url, content=random.choice(self.images),
                                     headers={**self.headers, "X-Task-Id": t})  # fmt: skip
                    status = r.status_code
                except httpx.HTTPError:
                    status = 599
                out.append((t0, time.perf_counter() - t0, status))

        async with httpx.AsyncClient(timeout=120) as c:
            await asyncio.gather(*(client(c) for _ in range(concurrency)))
        return out


def summarize(rows: list[tuple[float, float, int]]) -> dict[str, Any]:
    lat = [s for _, s, st in rows if st == 200]
    wall = max(t + s for t, s, _ in rows) - min(t for t, _, _ in rows)
    return {
        "requests": len(rows),
        "failed": sum(st != 200 for _, _, st in rows),
        "rps": round(len(lat) / wall, 1),
        "p50_ms": round(1000 * percentile(lat, 50), 2),
        "p99_ms": round(1000 * percentile(lat, 99), 2),
    }


def engine_replicas() -> dict[str, Any]:
    prefix = f"SERVE_REPLICA::{APP}#E2VPTEngine#"
    return {
        e["name"][len(prefix) :]: ray.get_actor(e["name"], namespace=e["namespace"])
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["name"].startswith(prefix)
    }


def cache_totals() -> dict[str, int]:
    hits = cold = 0
    for actor in engine_replicas().values():
        try:
            s = ray.get(actor.record_routing_stats.remote(), timeout=30)
        except ray.exceptions.RayError:
            continue
        hits += s["hits"]
        cold += s["cold_loads"]
    return {"hits": hits, "cold_loads": cold}


def deploy(settings: Settings, replicas: int, name: str = APP) -> None:
    from e2vpt.rayserve.app import build_app

    s = settings.model_copy(update={"ray_min_replicas": replicas, "ray_max_replicas": replicas})
    serve.run(build_app(s), name=name, route_prefix="/")
    deadline = time.monotonic() + 300
    while len(engine_replicas()) < replicas and time.monotonic() < deadline:
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default here: small request counts")
    parser.add_argument("--full", action="store_true", help="more requests per point")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs: replicas 1..gpus, one GPU each (0: CPU)")
    parser.add_argument("--replicas", type=int, default=3, help="largest replica count on CPU")
    parser.add_argument("--backbone", default=None, help="a timm ViT name (default: the tests' tiny ViT)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cache-tasks", type=int, default=200, help="prompt sets each replica's cache holds")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray.json"))
    args = parser.parse_args(argv)
    if ray is None:
        print("bench_ray: ray is not installed (pip install '.[ray]'); skipped")
        return 0
    n_requests = 2000 if args.full else 400
    zipf_requests = 6000 if args.full else 2000
    max_replicas = args.gpus or args.replicas
    cpus = os.cpu_count() or 2
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    redis = LocalRedis(port=free_port(), workdir=tmp / "redis", appendonly=False).start()
    try:
        if args.backbone:
            bb = load_backbone(args.backbone, pretrained=False)
            ckpt = save_checkpoint(bb.model, args.backbone, {}, tmp / "backbone.safetensors")
        else:
            ckpt, _ = tiny_checkpoint(tmp / "backbone.safetensors")
        backbone: Backbone = load_backbone(checkpoint=ckpt)
        namespace = f"bench-{uuid.uuid4().hex[:6]}"
        store = PromptStore(redis.url, backbone.info, namespace=namespace)
        g = __import__("torch").Generator().manual_seed(0)
        tasks = [f"z{i}" for i in range(1000)]
        sets = [
            PromptSet.create(t, backbone.info, [f"{t}-c{j}" for j in range(10)], generator=g) for t in tasks
        ]
        for ps in sets:
            store.register(ps)
        set_bytes = PromptTable(backbone.info).nbytes_for(compacted(sets[0]))
        token = uuid.uuid4().hex
        port = free_port()
        settings = Settings(
            backbone_checkpoint=str(ckpt),
            redis_url=redis.url,
            store_namespace=namespace,
            device="cuda" if args.gpus else "cpu",
            inference_token=token,
            image_decode_threads=1,
            cache_max_bytes=args.cache_tasks * set_bytes,
            ray_replica_cpus=1 if args.gpus else max(0.1, round(cpus / max_replicas / 1.5, 2)),
            ray_http_port=port,
            ray_max_batch_size=64 if args.gpus else 32,
        )
        ray.init(num_cpus=cpus, num_gpus=args.gpus or None, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        size = backbone.info.img_size[0]
        images = [image_bytes(i, (size + i % 7, size + i % 5)) for i in range(32)]
        load = Load(f"http://127.0.0.1:{port}/predictions/e2vpt", token, images)
        rng = random.Random(0)
        result: dict[str, Any] = {
            "device": settings.device,
            "backbone": args.backbone or "tiny vit (2 blocks, 32 px)",
            "machine": {"cpus": cpus, "gpus": args.gpus, "platform": platform.platform()},
            "mode": "full" if args.full else "quick",
            "concurrency": args.concurrency,
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

        # ---- throughput and p99 against replicas (warm caches: 64 tasks) -----------------------------
        hot = tasks[:64]
        rows = []
        for n in range(1, max_replicas + 1):
            deploy(settings, n)
            asyncio.run(load.run(hot * 2, args.concurrency))  # warm every replica's cache and batching
            stats = summarize(
                asyncio.run(load.run([rng.choice(hot) for _ in range(n_requests)], args.concurrency))
            )
            rows.append({"replicas": n, **stats})
            print(f"[bench_ray] {n} replica(s): {stats}", flush=True)
        result["replicas"] = rows

        # ---- cache hit rate, affinity on / off, Zipf over 1,000 tasks --------------------------------
        weights = zipf_weights(len(tasks))
        stream = rng.choices(tasks, weights=weights, k=zipf_requests)
        hit_rates = {}
        for affinity in (True, False):
            if not affinity:
                serve.delete(APP)
                deploy(settings.model_copy(update={"ray_affinity": False}), max_replicas)
            before = cache_totals()
            stats = summarize(asyncio.run(load.run(stream, args.concurrency)))
            after = cache_totals()
            hits, cold = after["hits"] - before["hits"], after["cold_loads"] - before["cold_loads"]
            hit_rates["on" if affinity else "off"] = {
                "hit_rate": round(hits / max(1, hits + cold), 4), "hits": hits, "cold_loads": cold, **stats,
            }  # fmt: skip
            print(f"[bench_ray] affinity {affinity}: {hit_rates}", flush=True)
        result["affinity"] = {
            "tasks": len(tasks), "zipf_s": 1.1, "requests": zipf_requests, "replicas": max_replicas,
            "cache_tasks_per_replica": args.cache_tasks, **hit_rates,
        }  # fmt: skip
        serve.delete(APP)
        deploy(settings, max_replicas)

        # ---- recovery after a replica is killed -------------------------------------------------------
        result["recovery"] = recovery(load, hot, args.concurrency, max_replicas, rng)
        print(f"[bench_ray] recovery: {result['recovery']}", flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[bench_ray] wrote {out}")
    finally:
        if ray is not None and ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        redis.stop()
    return 0


def recovery(
    load: Load, hot: list[str], concurrency: int, replicas: int, rng: random.Random
) -> dict[str, Any]:
    """Steady load; kill one replica; failures, time to `replicas` replicas again, time to p99 back."""
    rows: list[tuple[float, float, int]] = []
    killed_at: list[float] = []
    back_at: list[float] = []

    async def steady(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            rows.extend(await load.run([rng.choice(hot) for _ in range(concurrency)], concurrency))

    async def killer() -> None:
        await asyncio.sleep(4.0)
        victim = next(iter(engine_replicas().values()))
        killed_at.append(time.perf_counter())
        ray.kill(victim, no_restart=True)
        while True:
            await asyncio.sleep(0.1)
            alive = 0
            for actor in engine_replicas().values():
                try:
                    await asyncio.wait_for(
                        asyncio.wrap_future(actor.record_routing_stats.remote().future()), 5
                    )
                    alive += 1
                except Exception:
                    continue
            if alive >= replicas:
                back_at.append(time.perf_counter())
                return

    async def both() -> None:
        await asyncio.gather(steady(40.0), killer())

    asyncio.run(both())
    kill = killed_at[0]
    before = [s for t, s, st in rows if t < kill and st == 200]
    baseline = percentile(before, 99)
    windows = {}
    for t, s, st in rows:
        if t >= kill and st == 200:
            windows.setdefault(int(t - kill), []).append(s)
    settled = next((w for w in sorted(windows) if percentile(windows[w], 99) <= 2 * baseline), None)
    after_kill = [r for r in rows if r[0] >= kill]
    return {
        "replicas": replicas,
        "requests_after_kill": len(after_kill),
        "failed_after_kill": sum(st != 200 for _, _, st in after_kill),
        "p99_before_ms": round(1000 * baseline, 2),
        "seconds_to_replica_replaced": round(back_at[0] - kill, 2) if back_at else None,
        "seconds_to_p99_back": settled,
    }


if __name__ == "__main__":
    sys.exit(main())
