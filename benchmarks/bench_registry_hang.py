"""A hung Redis (SIGSTOP, not killed) under the registry API: fail-fast off against on, in one run.

    .venv/bin/python benchmarks/bench_registry_hang.py [--flood 100] [--out benchmarks/results/registry_hang.json]

For each `registry_store_backoff_ms` (0: off, and the default 1000): a private redis-server and
`e2vpt registry serve` (real uvicorn, 40 worker threads, `store_socket_timeout` 5 s, the default) on the tiny
backbone. Then, with Redis SIGSTOPped (connections hang, nothing is refused): one read (it meets the
hang first), `--flood` concurrent reads with the liveness probe (`/healthz`) sent half a second into them,
and after SIGCONT the time until `/healthz` answers 200 again. Seconds are wall time of each HTTP call on
this machine; every status is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from e2vpt.dev.localredis import LocalRedis, free_port  # noqa: E402
from e2vpt.dev.registry import registry_server  # noqa: E402
from e2vpt.dev.tiny import tiny_checkpoint  # noqa: E402


def timed(url: str) -> tuple[int | str, float]:
    """(status or exception name, seconds) of one GET."""
    t0 = time.monotonic()
    try:
        status: int | str = httpx.get(url, timeout=120).status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    return status, time.monotonic() - t0


@contextmanager
def registry(workdir: Path, backoff_ms: int) -> Iterator[tuple[str, LocalRedis]]:
    redis = LocalRedis(port=free_port(), workdir=workdir / "redis", appendonly=False).start()
    ckpt, _ = tiny_checkpoint(workdir / "tiny.safetensors")
    env = {"E2VPT_REGISTRY_TOKEN": "bench", "E2VPT_REGISTRY_STORE_BACKOFF_MS": str(backoff_ms)}
    try:
        with registry_server(ckpt, redis.url, workdir / "registry.log", **env) as url:
            yield url, redis
    finally:
        redis.stop()


def hang(url: str, redis: LocalRedis, flood: int) -> dict[str, Any]:
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        first = timed(f"{url}/tasks/x")
        reads: list[tuple[int | str, float]] = []
        threads = [
            threading.Thread(target=lambda: reads.append(timed(f"{url}/tasks/x"))) for _ in range(flood)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(0.5)
        probe = timed(f"{url}/healthz")
        for t in threads:
            t.join()
        flood_s = time.monotonic() - t0
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    t1 = time.monotonic()
    while timed(f"{url}/healthz")[0] != 200:
        time.sleep(0.05)
    seconds = sorted(s for _, s in reads)
    return {
        "first_read": {"status": first[0], "s": first[1]},
        "healthz_under_flood": {"status": probe[0], "s": probe[1]},
        "flood": {
            "reads": flood,
            "statuses": sorted({str(st) for st, _ in reads}),
            "wall_s": flood_s,
            "median_s": seconds[len(seconds) // 2],
            "max_s": seconds[-1],
        },  # fmt: skip
        "recovered_after_s": time.monotonic() - t1,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flood", type=int, default=100)
    ap.add_argument("--backoffs", default="0,1000", help="registry_store_backoff_ms values, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "registry_hang.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backoff in (int(b) for b in args.backoffs.split(",")):
            work = Path(tmp) / f"b{backoff}"
            work.mkdir()
            with registry(work, backoff) as (url, redis):
                rows.append({"backoff_ms": backoff, **hang(url, redis, args.flood)})
    print(f"hung Redis under the registry API ({platform.processor() or platform.machine()}, {os.cpu_count()} cores;"
          f" socket timeout 5 s, {args.flood} concurrent reads)")  # fmt: skip
    print(
        f"{'backoff':>8} {'first read':>11} {'healthz':>9} {'reads med':>10} {'reads max':>10} {'flood':>7} {'recover':>8}"
    )
    for r in rows:
        print(f"{r['backoff_ms']:>6}ms {r['first_read']['s']:>10.2f}s {r['healthz_under_flood']['s']:>8.2f}s "
              f"{r['flood']['median_s']:>9.2f}s {r['flood']['max_s']:>9.2f}s {r['flood']['wall_s']:>6.1f}s "
              f"{r['recovered_after_s']:>7.2f}s  statuses {r['flood']['statuses']}")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"flood": args.flood, "cpu_count": os.cpu_count(), "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
