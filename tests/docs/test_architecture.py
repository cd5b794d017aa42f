"""Imports run one way (docs/architecture.md): config and errors at the bottom, then core, then registry
and onnx, then serving, then torchserve and rayserve (side by side); nothing in e2vpt imports training; no code imports tests/.
Every import counts, lazy ones inside functions too, so a circle cannot hide behind a local import."""

from __future__ import annotations

import ast
from pathlib import Path

from e2vpt.cli import COMMAND_MODULES
from tests.cli_helpers import ROOT

# What each part of e2vpt may import from e2vpt besides itself.
ALLOWED: dict[str, set[str]] = {
    "e2vpt.errors": set(),
    "e2vpt.config": set(),
    "e2vpt.core": {"e2vpt.config", "e2vpt.errors"},
    "e2vpt.registry": {"e2vpt.config", "e2vpt.errors", "e2vpt.core"},
    "e2vpt.onnx": {"e2vpt.config", "e2vpt.errors", "e2vpt.core"},
    "e2vpt.dev": {"e2vpt.config", "e2vpt.errors", "e2vpt.core"},
    "e2vpt.serving": {"e2vpt.config", "e2vpt.errors", "e2vpt.core", "e2vpt.registry", "e2vpt.onnx"},
    "e2vpt.torchserve": {
        "e2vpt.config",
        "e2vpt.errors",
        "e2vpt.core",
        "e2vpt.registry",
        "e2vpt.serving",
        "e2vpt.onnx",
        "e2vpt.dev",
    },
    # the Ray Serve front end: beside torchserve, on top of serving; nothing imports it but the CLI, lazily
    "e2vpt.rayserve": {
        "e2vpt.config",
        "e2vpt.errors",
        "e2vpt.core",
        "e2vpt.registry",
        "e2vpt.serving",
        "e2vpt.dev",
    },
}
TOP = {"e2vpt", "e2vpt.cli"}  # the package's face: may import any part


def part(module: str) -> str:
    """e2vpt.core.model -> e2vpt.core; e2vpt.config -> e2vpt.config; training.x -> training."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "e2vpt" else parts[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    name = ".".join(rel.parts)
    return name.removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every absolute module a file imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def project_edges(folder: str) -> list[tuple[str, str]]:
    """(importer, imported part) for every file under `folder` and every import of project code."""
    edges = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        importer = module_name(path)
        for imported in imports(path):
            if part(imported) in {"training", "tests", "benchmarks"} or imported.startswith("e2vpt"):
                edges.append((importer, part(imported)))
    return edges


def test_e2vpt_imports_run_one_way() -> None:
    wrong = []
    for importer, imported in project_edges("e2vpt"):
        own = part(importer)
        if own in TOP or imported == own:
            continue
        if imported not in ALLOWED.get(own, set()):
            wrong.append(f"{importer} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_nothing_in_e2vpt_imports_training_or_tests() -> None:
    bad = [(a, b) for a, b in project_edges("e2vpt") if b in {"training", "tests", "benchmarks"}]
    assert not bad
    # the CLI finds the trainer's commands through the entry-point group, not by name
    assert all(m.startswith("e2vpt.") for m in COMMAND_MODULES)


def test_code_outside_tests_imports_nothing_from_tests() -> None:
    for folder in ("e2vpt", "training", "benchmarks", "scripts", "docs", "deploy"):
        bad = [(a, b) for a, b in project_edges(folder) if b == "tests"]
        assert not bad, bad


def test_every_part_is_known_and_documented() -> None:
    parts = {
        part(module_name(p))
        for p in (ROOT / "e2vpt").rglob("*.py")
        if module_name(p) not in TOP and module_name(p) != "e2vpt.__init__"
    }
    assert parts == set(ALLOWED), parts ^ set(ALLOWED)
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for name in parts:
        assert f"`{name}`" in doc, f"docs/architecture.md does not describe {name}"


def test_nothing_imports_the_ray_front_end() -> None:
    """`ray` is an optional extra: only the CLI may reach e2vpt.rayserve, and only inside a function."""
    users = {a for a, b in project_edges("e2vpt") if b == "e2vpt.rayserve" and part(a) != "e2vpt.rayserve"}
    assert users <= {"e2vpt.cli"}, users
    for path in (ROOT / "e2vpt").rglob("*.py"):
        if part(module_name(path)) in {"e2vpt.rayserve"}:
            continue
        top_level = ast.parse(path.read_text()).body
        for node in top_level:
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not any(n == "ray" or n.startswith(("ray.", "e2vpt.rayserve")) for n in names), path


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from e2vpt.serving.engine import MultiTaskEngine\n")
    assert "e2vpt.serving.engine" in imports(sample)
    assert "e2vpt.serving" not in ALLOWED["e2vpt.core"]
