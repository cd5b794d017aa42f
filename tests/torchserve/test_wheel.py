"""The installed package is self-contained: a wheel of the project, installed into a fresh virtual
environment outside the checkout, builds a .mar holding the handler (package data, not a checkout path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from e2vpt.core.backbone import save_checkpoint
from tests.cli_helpers import ROOT
from tests.helpers import tiny_backbone

pytestmark = pytest.mark.integration

SOURCES = ("pyproject.toml", "README.md", "e2vpt", "training")


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def build_wheel(dest: Path, work: Path) -> Path:
    """A wheel built by setuptools' PEP 517 backend from a copy of the sources (the checkout stays clean)."""
    src = work / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, src / name)
    dest.mkdir(parents=True, exist_ok=True)
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(dest)!r}))"
    name = _run([sys.executable, "-c", code], cwd=src).stdout.strip().splitlines()[-1]
    return dest / name


def test_wheel_installs_outside_the_checkout_and_builds_a_mar(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist", tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {"e2vpt/torchserve/e2vpt_handler.py", "e2vpt/torchserve/config.properties.template"} <= names

    # A fresh venv from the base interpreter, the wheel alone installed into it (no dependencies).
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(venv)])
    vpy = venv / "bin" / "python"
    _run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)])

    # Dependencies come from this environment's site-packages; .pth files on PYTHONPATH are not processed,
    # so the checkout's editable install cannot leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2VPT_") and k != "PYTHONPATH"}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = _run(
        [
            str(vpy),
            "-c",
            "import e2vpt, e2vpt.torchserve.archive as a; print(e2vpt.__file__); print(a.HANDLER)",
        ],
        cwd=cwd,
        env=env,
    ).stdout.split()
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where), where
    assert not any(Path(p).resolve().is_relative_to(ROOT) for p in where), where

    bb = tiny_backbone()
    ckpt = save_checkpoint(bb.model, bb.info.name, bb.info.model_kwargs, tmp_path / "backbone.safetensors")
    out = _run(
        [str(venv / "bin" / "e2vpt"), "serve", "build-mar", "--checkpoint", str(ckpt), "--export-dir", "mar"],
        cwd=cwd,
        env=env,
    )
    mar = cwd / "mar" / "e2vpt.mar"
    assert mar.is_file(), out.stdout + out.stderr
    with zipfile.ZipFile(mar) as zf:
        handler = next(n for n in zf.namelist() if n.endswith("e2vpt_handler.py"))
        assert b"class E2VPTHandler" in zf.read(handler)
        assert any(n.endswith(".json") for n in zf.namelist())
