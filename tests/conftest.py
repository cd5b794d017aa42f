"""Shared fixtures: tiny backbones (fast, randomly initialised, deterministic) and real Redis servers."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from e2vpt.core.backbone import Backbone
from e2vpt.registry.store import PromptStore
from tests.helpers import RedisServer, tiny_backbone

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    return tiny_backbone()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def store(redis_url: str, namespace: str, backbone: Backbone) -> Iterator[PromptStore]:
    """An empty PromptStore of the tiny backbone in a fresh namespace (keeps 5 versions), dropped after."""
    s = PromptStore(redis_url, backbone.info, namespace=namespace, keep_versions=5)
    yield s
    s.drop_all()
    s.close()


@pytest.fixture
def redis_url() -> str:
    """The machine's shared Redis (REDIS_URL or localhost); tests isolate themselves by namespace."""
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def namespace() -> str:
    """A fresh key namespace per test, so tests sharing one Redis never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"
