"""deploy/serve-entrypoint.sh, the serving container's entrypoint, run for real against TorchServe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import DEPLOY
from tests.helpers import tiny_backbone


def listen_addresses(port: int) -> set[str]:
    """The (hex) local addresses with a socket listening on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


def listening_on_all_interfaces(port: int) -> bool:
    """Whether a socket listens on 0.0.0.0:port / [::]:port (what a container's published port needs)."""
    return bool(listen_addresses(port) & {"00000000", "0" * 32})


@pytest.mark.integration
def test_serve_entrypoint_runs_torchserve_until_sigterm(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    """deploy/serve-entrypoint.sh (the container's entrypoint) builds the .mar, starts a real TorchServe
    that the container health check reports healthy, exposes every port the compose file publishes on
    all interfaces, and stops TorchServe on SIGTERM."""
    import signal
    import time

    import httpx

    from e2vpt.core.backbone import save_checkpoint
    from e2vpt.dev.localredis import free_ports

    bb = tiny_backbone()
    ckpt = save_checkpoint(bb.model, bb.info.name, bb.info.model_kwargs, tmp_path / "backbone.safetensors")
    ports = dict(zip(("inference", "management", "metrics", "worker"), free_ports(4), strict=True))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("E2VPT_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "E2VPT_REDIS_URL": redis_url,
        "E2VPT_STORE_NAMESPACE": namespace,
        "E2VPT_BACKBONE_CHECKPOINT": str(ckpt),
        "E2VPT_TS_WORKDIR": str(tmp_path / "ts"),
        "E2VPT_TS_MAR_DIR": str(tmp_path / "mar"),
        "E2VPT_TS_BIND": "0.0.0.0",
        "E2VPT_METRICS_BIND": "0.0.0.0",
        "E2VPT_TS_INFERENCE_PORT": str(ports["inference"]),
        "E2VPT_TS_MANAGEMENT_PORT": str(ports["management"]),
        "E2VPT_TS_METRICS_PORT": str(ports["metrics"]),
        "E2VPT_METRICS_PORT": str(ports["worker"]),
        "E2VPT_TS_WORKERS": "1",
    }
    log = open(tmp_path / "entrypoint.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(DEPLOY / "serve-entrypoint.sh")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            health = subprocess.run(
                [sys.executable, str(DEPLOY / "healthcheck.py"), "torchserve"],
                env=env,
                capture_output=True,
                text=True,
            )
            if health.returncode == 0:
                break
            time.sleep(2)
        output = (tmp_path / "entrypoint.log").read_text(errors="replace")
        assert proc.poll() is None, f"the entrypoint exited early:\n{output[-4000:]}"
        assert health is not None and health.returncode == 0, f"{health and health.stdout}\n{output[-4000:]}"
        # Every port the compose file publishes listens beyond loopback inside the container.
        for name, port in ports.items():
            deadline = time.monotonic() + 30
            while not listening_on_all_interfaces(port) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert listening_on_all_interfaces(port), (
                f"{name} port {port} listens on {listen_addresses(port)}"
            )
        worker = httpx.get(f"http://127.0.0.1:{ports['worker']}/metrics", timeout=10).text
        assert "e2vpt_cache_resident_tasks" in worker
        frontend = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10)
        assert frontend.status_code == 200
        ts_pid = json.loads((tmp_path / "ts" / "state.json").read_text())["pid"]
        # A token-less ping is refused: the health check had to use TorchServe's key.
        assert httpx.get(f"http://127.0.0.1:{ports['inference']}/ping", timeout=10).status_code in (
            400,
            401,
            403,
        )

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(ts_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("TorchServe still runs after the entrypoint's SIGTERM")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        state = tmp_path / "ts" / "state.json"
        if state.is_file():
            pid = json.loads(state.read_text()).get("pid")
            if pid:
                from e2vpt.torchserve.archive import stop_group

                stop_group(int(pid), timeout=10)
        log.close()
