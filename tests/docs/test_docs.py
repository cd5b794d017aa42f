"""The README and docs agree with the code: the configuration table is generated from Settings, the
commands it shows parse, and the generator reads the right comments."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from e2vpt.config import env_names
from tests.cli_helpers import DEPLOY, ROOT, assert_cli_parses, cli_commands


def test_readme_config_table_is_generated_from_settings() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_config.py"), "--check"], capture_output=True
    )
    assert out.returncode == 0, out.stderr.decode()
    readme = (ROOT / "README.md").read_text()
    for env in env_names():
        assert f"`{env}`" in readme, env


def test_readme_keeps_its_first_lines() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[:5] == [
        "# E2VPT Serve",
        "",
        "```bash",
        "make demo   # set up, train three tasks, register them, serve them from one TorchServe, query it",
        "make test   # set up and run the test suite (real Redis, real TorchServe, tiny backbones)",
    ]


def readme_cli_commands() -> list[list[str]]:
    """`python -m e2vpt.cli ...` lines of the README's bash blocks (continuations joined, env prefix dropped)."""
    readme = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            commands += cli_commands(line)
    return commands


def test_readme_commands_are_real() -> None:
    commands = readme_cli_commands()
    assert {c[0] for c in commands} >= {"train", "tasks", "registry", "serve"}
    for argv in commands:
        assert_cli_parses(argv)
    # The container entrypoint runs what the README tells users to run.
    entry = cli_commands((DEPLOY / "serve-entrypoint.sh").read_text())
    assert all(c[:2] in [r[:2] for r in commands] for c in entry)


def test_gen_config_attributes_comments_to_the_right_field(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_config", ROOT / "docs" / "gen_config.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    source = tmp_path / "fake_settings.py"
    source.write_text(
        "from pydantic_settings import BaseSettings, SettingsConfigDict\n\n\n"
        "class FakeSettings(BaseSettings):\n"
        "    model_config = SettingsConfigDict(env_prefix='E2VPT_')\n\n"
        "    # --- first section ---\n"
        "    alpha: int = 1  # inline about alpha\n"
        "    beta: str = 'b'\n"
        "    # above gamma\n"
        "    gamma: float = 0.5\n"
    )
    spec = importlib.util.spec_from_file_location("fake_settings", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_settings"] = module
    spec.loader.exec_module(module)
    rows = {r["field"]: r for r in gen.field_docs(module.FakeSettings)}
    assert rows["alpha"]["description"] == "inline about alpha"
    assert rows["beta"]["description"] == ""
    assert rows["gamma"]["description"] == "above gamma"
    assert rows["gamma"]["env"] == "`E2VPT_GAMMA`" and rows["alpha"]["section"] == "first section"


# a repository file named in prose: a top-level folder of this project, then a path ending in a file type
REPO_PATH = re.compile(
    r"(?<![\w./])((?:tests|benchmarks|e2vpt|scripts|training|deploy|docs)/[\w./-]+"
    r"\.(?:py|sh|md|json|yml|yaml|properties|template|toml))\b"
)


def test_every_file_the_docs_name_exists() -> None:
    """A moved or renamed file leaves no stale path behind in the README or docs/ (the layout move left
    `tests/test_store.py` and five others)."""
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in sorted(set(REPO_PATH.findall(doc.read_text()))):
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing
