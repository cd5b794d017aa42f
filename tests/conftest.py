"""Shared fixtures: tiny backbones (fast, randomly initialised, deterministic) and real Redis servers."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from e2vpt.core.backbone import Backbone, load_backbone
from e2vpt.dev.localredis import LocalRedis, free_port

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A 2-block ViT on 32x32 images with 8x8 patches: 16 patches, D=192, 3 heads. Milliseconds per forward.
TINY = {"img_size": 32, "patch_size": 8, "depth": 2}


def tiny_backbone(name: str = "vit_tiny_patch16_224", **kwargs: object) -> Backbone:
    return load_backbone(name, **{**TINY, **kwargs})


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    return tiny_backbone()


def RedisServer(workdir: Path, port: int | None = None, appendonly: bool = True) -> LocalRedis:  # noqa: N802
    """A private redis-server in `workdir` (persistence, restart and outage tests): `.start()`, `.stop()`,
    `.url`; stop + start keeps its port and data."""
    return LocalRedis(port=port or free_port(), workdir=workdir, appendonly=appendonly)


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


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `cond` until it holds or `timeout` seconds pass; the final answer of `cond`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()
