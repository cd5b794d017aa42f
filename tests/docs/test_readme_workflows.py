"""The README's Workflows, run as written (issue 14): every fenced bash block of the "Workflows" section,
taken from the README itself (so the two cannot drift), in order, in a fresh working directory, with a
real Redis, the real registry server and a real TorchServe.

A block that starts a server that keeps its terminal (`registry serve`) runs in the background as "the
first terminal"; the blocks between two such servers run together in one fresh shell ("a second
terminal"), which starts with none of the first terminal's exports: what a block needs there, the README
must say. Only what is slow or needs the network is substituted, and only here:

- the pretrained ViT is already converted (a tiny one at the path the README names, so `pretrained`
  reuses it);
- `path/to/pets` is a tiny generated image folder; training gets a tiny budget (flags appended to the
  README's own `train` line, so a changed train command is still the one that runs);
- a block needing downloads (`--pretrained`) is skipped;
- the fixed ports (8000, 8080-8082, 9400) become free ones (same text, other number; the settings get the
  same ports), Redis is a private one, TorchServe runs one worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from e2vpt.config import DEFAULT_PRETRAINED_DIR
from e2vpt.core.backbone import save_checkpoint
from e2vpt.core.pretrained import DEFAULT_IMG_SIZE, checkpoint_path
from e2vpt.dev.images import image_bytes
from e2vpt.dev.localredis import free_ports
from e2vpt.torchserve.archive import stop_group
from tests.cli_helpers import ROOT
from tests.helpers import RedisServer, tiny_backbone

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not shutil.which("java") or not shutil.which("redis-server") or not shutil.which("curl"),
        reason="needs java, redis-server and curl",
    ),
]

SERVER_COMMANDS = ("e2vpt.cli registry serve",)  # commands that keep their terminal
NEEDS_NETWORK = ("--pretrained",)
TRAIN_BUDGET = "--epochs 2 --warmup 0 --batch-size 8 --no-progress"
README_PORTS = {"registry": 8000, "inference": 8080, "management": 8081, "metrics": 8082, "engine": 9400}


def workflow_blocks(readme: str) -> list[str]:
    """The fenced bash blocks of the README's "Workflows" section, in order (continuations joined)."""
    section = readme.split("\n## Workflows\n", 1)[1].split("\n## ", 1)[0]
    return [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def with_ports(block: str, ports: dict[str, int]) -> str:
    for name, port in README_PORTS.items():
        block = re.sub(rf"(127\.0\.0\.1:|--port ){port}\b", rf"\g<1>{ports[name]}", block)
    return block


def with_budget(block: str) -> str:
    return "\n".join(
        f"{line} {TRAIN_BUDGET}" if re.match(r"\s*python -m e2vpt\.cli train\b", line) else line
        for line in block.splitlines()
    )


@dataclass
class Workdir:
    path: Path
    env: dict[str, str]
    ports: dict[str, int]
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Workdir]:
    redis = RedisServer(tmp_path / "redis").start()
    cwd = tmp_path / "clone"
    # what step 1 converts once (the pretrained ViT: a tiny stand-in at its cached path, which
    # `e2vpt pretrained` then reuses), and the user's image folder
    bb = tiny_backbone()
    cached = checkpoint_path(DEFAULT_IMG_SIZE, cwd / DEFAULT_PRETRAINED_DIR)
    cached.parent.mkdir(parents=True)
    save_checkpoint(bb.model, bb.info.name, bb.info.model_kwargs, cached)
    for label in range(3):
        folder = cwd / "path/to/pets" / f"breed{label}"
        folder.mkdir(parents=True)
        for i in range(8):
            (folder / f"{i}.png").write_bytes(image_bytes(seed=100 * label + i, size=(40, 40), fmt="PNG"))
    ports = dict(zip(README_PORTS, free_ports(len(README_PORTS)), strict=True))
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("E2VPT_", "REDIS_URL"))},
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "E2VPT_REDIS_URL": redis.url,
        "E2VPT_REGISTRY_URL": f"http://127.0.0.1:{ports['registry']}",
        "E2VPT_TS_INFERENCE_PORT": str(ports["inference"]),
        "E2VPT_TS_MANAGEMENT_PORT": str(ports["management"]),
        "E2VPT_TS_METRICS_PORT": str(ports["metrics"]),
        "E2VPT_TS_ENGINE_METRICS_PORT": str(ports["engine"]),
        "E2VPT_TS_WORKERS": "1",
    }
    wd = Workdir(cwd, env, ports)
    try:
        yield wd
    finally:
        state = cwd / "runs/torchserve/state.json"
        if state.is_file():  # a failed run leaves TorchServe up: stop it as `serve stop` would
            pid = json.loads(state.read_text()).get("pid")
            if pid:
                stop_group(int(pid))
        for proc in wd.servers:
            proc.send_signal(signal.SIGINT)  # Ctrl-C in its terminal
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis.stop()


def start_server(wd: Workdir, block: str, name: str) -> None:
    """Run a block that keeps its terminal in the background; wait until the registry answers."""
    log = (wd.path / f"{name}.log").open("wb")
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=wd.path, env=wd.env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    wd.servers.append(proc)
    url = f"http://127.0.0.1:{wd.ports['registry']}/healthz"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (wd.path / f"{name}.log").read_text()
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the registry did not come up:\n{(wd.path / f'{name}.log').read_text()}")


def run_terminal(wd: Workdir, blocks: list[tuple[int, str]]) -> str:
    """Blocks in one fresh shell (a terminal of their own), stopping at the first failing command."""
    script = "\n".join(f'echo "### README block {i} $(date +%s.%N)"\n{block}' for i, block in blocks)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=wd.path, env=wd.env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"a README command failed (exit {out.returncode}):\n{text[-6000:]}"
    return out.stdout


def test_readme_workflows_run_as_written(workdir: Workdir) -> None:
    blocks = workflow_blocks((ROOT / "README.md").read_text())
    assert any("serve start" in b for b in blocks) and any("tasks rollback" in b for b in blocks)
    pending: list[tuple[int, str]] = []
    outputs: list[str] = []
    for i, raw in enumerate(blocks):
        if any(flag in raw for flag in NEEDS_NETWORK):
            continue
        block = with_budget(with_ports(raw, workdir.ports))
        if any(cmd in block for cmd in SERVER_COMMANDS):
            if pending:
                outputs.append(run_terminal(workdir, pending))
                pending = []
            start_server(workdir, block, f"server{i}")
        else:
            pending.append((i, block))
    outputs.append(run_terminal(workdir, pending))
    out = "\n".join(outputs)

    assert "pets" in out and "version 1" in out  # trained and registered
    assert '"task_id": "pets"' in out and '"predictions"' in out, out  # TorchServe answered for pets
    assert "not registered" not in out and "Token Authorization failed" not in out
    assert "e2vpt_requests_total" in out  # the engine's metrics on the port the README names
    assert re.search(r"pets\s+version \d+\s+\(content of version 1\)", out)  # the rollback
    assert "stopped TorchServe" in out
