"""The registry API in a child process (`e2vpt registry serve`, real uvicorn), for tests and benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from e2vpt.dev.localredis import free_port


@contextmanager
def registry_server(checkpoint: Path, redis_url: str, log: Path, **env: str) -> Iterator[str]:
    """Serve the prompt sets of the backbone in `checkpoint`, stored in `redis_url`, on a free loopback
    port, with the `E2VPT_*` settings in `env` (the token, a namespace, ...); its output goes to `log`.
    Yields its URL once `/healthz` answers 200; stopped on exit. RuntimeError (with the log) if it does
    not come up within 90 s."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "E2VPT_REDIS_URL": redis_url,
           "E2VPT_BACKBONE_CHECKPOINT": str(checkpoint), **env}  # fmt: skip
    cmd = [sys.executable, "-m", "e2vpt.cli", "registry", "serve", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the registry did not come up:\n" + log.read_text(errors="replace"))
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()  # uvicorn waits for open connections before it exits
            proc.wait(10)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
