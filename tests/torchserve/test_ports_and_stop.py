"""Issue 13: TorchServe's ports are reserved together (never one port twice) and stopping a process
group returns as soon as the group has exited (the launcher is reaped). No TorchServe needed."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from e2vpt.dev.localredis import free_ports
from e2vpt.torchserve.archive import TorchServe, stop_group


def test_free_ports_are_distinct() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(p > 0 for p in ports)


def test_torchserve_reserves_every_port_at_once(tmp_path: Path) -> None:
    ts = TorchServe(tmp_path / "e2vpt.mar", tmp_path / "ts")  # not started: only the reservation
    ports = [
        ts.inference_port, ts.management_port, ts.metrics_port, ts.worker_metrics_port,
        ts.initial_worker_port, ts.grpc_inference_port, ts.grpc_management_port,
    ]  # fmt: skip
    assert len(set(ports)) == 7
    text = ts.config_text()
    for port in ports[:3] + ports[4:]:
        assert str(port) in text
    explicit = TorchServe(
        tmp_path / "e2vpt.mar", tmp_path / "ts", inference_port=ports[0], metrics_port=ports[2]
    )
    assert (explicit.inference_port, explicit.metrics_port) == (ports[0], ports[2])


def test_stop_group_returns_once_the_group_exited_without_killing() -> None:
    """A launcher that is our child (as TorchServe's) exits on SIGTERM; unreaped it would still count as a
    member of its group and the old loop waited for the timeout, then SIGKILLed."""
    proc = subprocess.Popen(
        ["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True, stdout=subprocess.DEVNULL
    )
    killed = stop_group(proc.pid, timeout=120, leader=proc)
    assert killed is False and proc.returncode == -signal.SIGTERM
    try:
        os.killpg(proc.pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
