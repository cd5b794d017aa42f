"""What the deployment files and the docs are checked with: the repository's folders, the
`python -m e2vpt.cli ...` lines of a script or README, and the real parser that must accept them."""

from __future__ import annotations

import re
from pathlib import Path

from e2vpt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def cli_commands(text: str) -> list[list[str]]:
    """Every `python -m e2vpt.cli ...` / `"$PYTHON" -m e2vpt.cli ...` invocation in a script, as argv:
    the plain words after the module, up to the first shell syntax (quote, `)`, `;`, `|`, `&`, `#`)."""
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for match in re.finditer(r"-m e2vpt\.cli((?:[ \t]+[A-Za-z0-9_./=:@+-]+)*)", line):
            out.append(match.group(1).split())
    return out


def assert_cli_parses(argv: list[str]) -> None:
    """The real CLI parser accepts argv (subcommands exist, options are known)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse error
        raise AssertionError(f"`e2vpt {' '.join(argv)}` is not a valid command") from exc
    assert getattr(args, "func", None), f"`e2vpt {' '.join(argv)}` names no runnable command"
