"""Shared fixtures: tiny backbones (fast, randomly initialised, deterministic) and real Redis servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from e2vpt.backbone import Backbone, load_backbone

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A 2-block ViT on 32x32 images with 8x8 patches: 16 patches, D=192, 3 heads. Milliseconds per forward.
TINY = {"img_size": 32, "patch_size": 8, "depth": 2}


def tiny_backbone(name: str = "vit_tiny_patch16_224", **kwargs: object) -> Backbone:
    return load_backbone(name, **{**TINY, **kwargs})


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    return tiny_backbone()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server in a temp dir (for persistence, restart and outage tests)."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = True) -> None:
        self.workdir, self.port, self.appendonly = workdir, port or free_port(), appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_url() -> str:
    """The machine's shared Redis (REDIS_URL or localhost); tests isolate themselves by namespace."""
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def namespace() -> str:
    """A fresh key namespace per test, so tests sharing one Redis never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"
