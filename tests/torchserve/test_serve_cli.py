"""`e2vpt serve ...` as a newcomer meets it (issue 14): build-mar refuses to pack a backbone nobody chose,
a wrong path is one line (exit 66), relative paths are resolved before they reach a worker, the packed
backbone is the one served, and `serve start` stops at the worker's own error instead of its timeout."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from e2vpt.core.backbone import save_checkpoint
from e2vpt.errors import BadRequest
from e2vpt.registry.cli import EXIT_NOINPUT, EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from e2vpt.torchserve.adapter import FORM_BODY_ERROR, parse_batch
from e2vpt.torchserve.archive import absolute_path_env, packed_backbone_differs
from tests.cli_helpers import ROOT
from tests.helpers import free_port, tiny_backbone


def run_cli(*argv: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m e2vpt.cli ARGV` in `cwd` with no E2VPT_* variables but `env` (this tree's code)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("E2VPT_")}
    full_env = {**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "e2vpt.cli", *argv], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    a, b = tiny_backbone(), tiny_backbone(depth=1)
    return (
        save_checkpoint(a.model, a.info.name, a.info.model_kwargs, root / "a.safetensors"),
        save_checkpoint(b.model, b.info.name, b.info.model_kwargs, root / "b.safetensors"),
    )


def test_build_mar_without_a_backbone_refuses_in_one_line(tmp_path: Path) -> None:
    out = run_cli("serve", "build-mar", cwd=tmp_path)
    assert out.returncode == EXIT_USAGE, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no backbone configured")
    for name in (
        "E2VPT_BACKBONE_CHECKPOINT",
        "E2VPT_BACKBONE",
        "--checkpoint",
        "--backbone",
        "--default-backbone",
    ):
        assert name in lines[0]
    assert not (tmp_path / "model_store").exists()


def test_build_mar_with_a_missing_checkpoint_is_one_line_exit_66(tmp_path: Path) -> None:
    out = run_cli("serve", "build-mar", cwd=tmp_path, E2VPT_BACKBONE_CHECKPOINT="runs/nope.safetensors")
    assert out.returncode == EXIT_NOINPUT
    assert out.stderr.strip().splitlines() == [
        f"error: backbone checkpoint not found: runs/nope.safetensors (E2VPT_BACKBONE_CHECKPOINT, relative to {tmp_path})"
    ]


def test_build_mar_packs_the_configured_checkpoint_and_says_which(
    tmp_path: Path, checkpoints: tuple[Path, Path]
) -> None:
    a, b = checkpoints
    (tmp_path / "runs").mkdir()
    shutil.copyfile(a, tmp_path / "runs" / "bb.safetensors")
    out = run_cli("serve", "build-mar", cwd=tmp_path, E2VPT_BACKBONE_CHECKPOINT="runs/bb.safetensors")
    assert out.returncode == EXIT_OK, out.stderr
    mar = tmp_path / out.stdout.strip()
    assert mar == tmp_path / "model_store" / "build" / "e2vpt.mar" and mar.is_file()
    fingerprint = tiny_backbone().info.fingerprint
    assert f"packed backbone {fingerprint} from {tmp_path / 'runs' / 'bb.safetensors'}" in out.stderr
    assert not packed_backbone_differs(mar, a) and packed_backbone_differs(mar, b)
    # a file that is not a checkpoint of this project: refused with the reason, exit 1
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    out = run_cli("serve", "build-mar", "--checkpoint", "junk.safetensors", cwd=tmp_path)
    assert (
        out.returncode == EXIT_REFUSED and "junk.safetensors" in out.stderr and "Traceback" not in out.stderr
    )


def test_relative_paths_are_made_absolute_where_they_were_given(tmp_path: Path) -> None:
    env = {
        "E2VPT_BACKBONE_CHECKPOINT": "runs/upstream/b.safetensors",
        "E2VPT_REGISTRY_TOKEN_FILE": "/abs/token",
        "E2VPT_ONNX_CACHE_DIR": "~/onnx",
        "E2VPT_REDIS_URL": "redis://host:1/0",
        "E2VPT_TS_WORKDIR": "runs/torchserve",  # not read by a worker: left alone
        "PATH": "bin",
    }
    out = absolute_path_env(env, tmp_path)
    assert out["E2VPT_BACKBONE_CHECKPOINT"] == str(tmp_path / "runs" / "upstream" / "b.safetensors")
    assert out["E2VPT_REGISTRY_TOKEN_FILE"] == "/abs/token"
    assert out["E2VPT_ONNX_CACHE_DIR"] == str(Path("~/onnx").expanduser())
    assert {k: out[k] for k in ("E2VPT_REDIS_URL", "E2VPT_TS_WORKDIR", "PATH")} == {
        k: env[k] for k in ("E2VPT_REDIS_URL", "E2VPT_TS_WORKDIR", "PATH")
    }


class FormContext:
    """TorchServe's request headers for one form-encoded request (what curl sends without -H)."""

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return {"Content-Type": "application/x-www-form-urlencoded", "X-Task-Id": "pets"}


def test_a_form_encoded_image_gets_told_what_to_send() -> None:
    """TorchServe decodes such a body into form fields (the image is lost); the answer names the header."""
    [item] = parse_batch([{"\x89PNG\r\n\x1a\n\x00\x00": b"garbage"}], FormContext())
    assert isinstance(item, BadRequest) and item.message == FORM_BODY_ERROR
    assert "Content-Type: application/octet-stream" in FORM_BODY_ERROR


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("java"), reason="needs java (TorchServe)")
def test_serve_start_stops_at_a_busy_port_or_the_workers_error(
    tmp_path: Path, checkpoints: tuple[Path, Path]
) -> None:
    a, _ = checkpoints
    out = run_cli("serve", "build-mar", "--checkpoint", str(a), cwd=tmp_path)
    assert out.returncode == EXIT_OK, out.stderr
    ports = [free_port() for _ in range(4)]
    env = dict(
        zip(
            (
                "E2VPT_TS_INFERENCE_PORT",
                "E2VPT_TS_MANAGEMENT_PORT",
                "E2VPT_TS_METRICS_PORT",
                "E2VPT_METRICS_PORT",
            ),
            map(str, ports),
            strict=True,
        )
    )
    # a busy port: named at once, before TorchServe starts
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[0]))
        busy.listen()
        out = run_cli("serve", "start", cwd=tmp_path, **env)
    assert out.returncode == EXIT_REFUSED
    assert (
        f"error: port {ports[0]} for TorchServe's inference (E2VPT_TS_INFERENCE_PORT) is in use" in out.stderr
    )
    # a worker that cannot start: its own exception in one line, long before the (10 min) start-up timeout
    env |= {"E2VPT_BACKEND": "bogus", "E2VPT_TS_STARTUP_TIMEOUT_S": "600", "E2VPT_TS_WORKERS": "1"}
    out = run_cli("serve", "start", cwd=tmp_path, **env)
    assert out.returncode == EXIT_REFUSED, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: TorchServe's worker died while loading the model:"), out.stderr
    assert "BackendUnavailable: unknown backend 'bogus'" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("logs: ")
    assert out.stdout == "" and not (tmp_path / "runs" / "torchserve" / "state.json").exists()
    assert run_cli("serve", "stop", cwd=tmp_path).returncode == EXIT_REFUSED  # nothing left running
