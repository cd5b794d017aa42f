"""Plain helpers shared by the test files (fixtures live in conftest.py): tiny backbones, private Redis
servers, polling."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from e2vpt.core.backbone import Backbone
from e2vpt.core.promptset import PromptSet
from e2vpt.dev.localredis import LocalRedis, free_port
from e2vpt.dev.tiny import TINY, tiny_backbone, tiny_checkpoint  # noqa: F401 (re-exported to the tests)


def RedisServer(workdir: Path, port: int | None = None, appendonly: bool = True) -> LocalRedis:  # noqa: N802
    """A private redis-server in `workdir` (persistence, restart and outage tests): `.start()`, `.stop()`,
    `.url`; stop + start keeps its port and data."""
    return LocalRedis(port=port or free_port(), workdir=workdir, appendonly=appendonly)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `cond` until it holds or `timeout` seconds pass; the final answer of `cond`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def make_set(task_id: str, bb: Backbone, classes: int = 4, seed: int = 0, **kw: object) -> PromptSet:
    """A random (paper-initialised) prompt set of `bb` with labels `<task_id>-c<i>`."""
    g = torch.Generator().manual_seed(seed)
    return PromptSet.create(task_id, bb.info, [f"{task_id}-c{i}" for i in range(classes)], generator=g, **kw)
