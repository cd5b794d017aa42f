"""`e2vpt tasks ...` stays light (issue 14): it loads only the registry's command module, never torch or
timm, and prints compact tables (the registry's JSON with --json)."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

from e2vpt.cli import COMMAND_HOMES, COMMAND_MODULES
from e2vpt.registry.cli import (
    EXIT_NOINPUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    LIST_COLUMNS,
    format_summary,
    format_table,
)
from tests.cli_helpers import ROOT
from tests.helpers import free_port, make_set, tiny_backbone

PROBE = """
import sys
from e2vpt.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "timm", "fastapi", "e2vpt.core.promptset") if m in sys.modules)
print("RC", rc, "HEAVY", ",".join(heavy) or "-")
"""


def test_tasks_commands_import_no_torch(tmp_path: Path) -> None:
    """The real command, in a fresh interpreter, against an unreachable registry: exit 69, nothing heavy."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    url = f"http://127.0.0.1:{free_port()}"
    pets = make_set("pets", tiny_backbone())
    pets.save(tmp_path / "pets.safetensors")
    for argv in (
        ["tasks", "list", "--url", url],
        ["-v", "tasks", "versions", "pets", "--url", url],
        ["tasks", "register", str(tmp_path / "pets.safetensors"), "--url", url],  # reads the header only
    ):
        out = subprocess.run(
            [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert f"RC {EXIT_UNAVAILABLE} HEAVY -" in out.stdout, out.stdout + out.stderr
        assert "unreachable" in out.stderr and "Traceback" not in out.stderr


def test_command_homes_register_exactly_their_commands() -> None:
    """COMMAND_HOMES (the fast path) names every top-level command of the serving package's modules."""
    seen: dict[str, str] = {}
    for module in COMMAND_MODULES:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(module).register(sub)
        seen.update(dict.fromkeys(sub.choices, module))
    assert seen == COMMAND_HOMES


def test_tables_are_aligned_and_compact() -> None:
    rows = [
        {"task_id": "pets", "version": 12, "method": "e2vpt", "num_classes": 37, "num_prompts": 10,
         "num_kv": 5, "num_parameters": 40000, "dtype": "float16", "size": 90000,
         "registered_at": "2026-11-26T17:24:38.245+00:00", "metrics": {"val_acc": 0.9}},
        {"task_id": "a-much-longer-task-id", "version": 1, "method": "linear"},
    ]  # fmt: skip
    lines = format_table(rows, LIST_COLUMNS).splitlines()
    assert len(lines) == 3
    starts = [lines[0].index(h) for h in ("VERSION", "METHOD", "REGISTERED")]
    for line in lines[1:]:  # every column starts where its heading does
        assert all(line[s - 2 : s] == "  " and line[s] != " " for s in starts)
    assert "2026-11-26 17:24:38" in lines[1] and "val_acc" not in lines[1]
    assert lines[2].split()[3:] == ["-"] * 7  # missing fields print as "-"
    summary = {
        **rows[0],
        "sha256": "ab" * 32,
        "config": {"num_segments": 16, "recipe": "vtab", "kept": [0, 1]},
        "metrics": {"val_acc": 0.91234, "test_acc": 0.9, "curve": [0.1, 0.2]},
    }
    shown = dict(line.split(None, 1) for line in format_summary(summary).splitlines())
    assert shown["sha256"] == "ab" * 6 and shown["metrics.val_acc"] == "0.9123"
    assert shown["config.recipe"] == "vtab" and "config.kept" not in shown and "metrics.curve" not in shown


def test_registry_serve_refuses_an_unnamed_or_missing_backbone(tmp_path: Path) -> None:
    """One line and an exit code, before anything heavy is loaded: no silent random-init backbone
    (2, usage) and no traceback for a wrong path (66)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("E2VPT_")}
    env = {**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "e2vpt.cli", "registry", "serve", "--port", str(free_port())]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == EXIT_USAGE and len(out.stderr.strip().splitlines()) == 1
    assert "no backbone configured" in out.stderr and "--default-backbone" in out.stderr
    env["E2VPT_BACKBONE_CHECKPOINT"] = "runs/upstream/missing.safetensors"
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == EXIT_NOINPUT
    assert out.stderr.strip().splitlines() == [
        "error: backbone checkpoint not found: runs/upstream/missing.safetensors "
        f"(E2VPT_BACKBONE_CHECKPOINT, relative to {tmp_path})"
    ]
