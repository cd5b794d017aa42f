"""The `e2vpt` command line. Each feature adds its subcommands from its own module (`register(sub)`).

The serving package's own commands are listed here; other installed packages (the trainer) add theirs
through the `e2vpt.commands` entry-point group, so `e2vpt` never imports them by name.

A command whose module is known (`COMMAND_HOMES`) loads only that module: `e2vpt tasks ...` imports no
torch and answers in well under a second. Help, an unknown command or a plugin's command loads them all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

# Modules that contribute subcommands: each defines `register(subparsers)` and sets `func` on its parsers.
COMMAND_MODULES: tuple[str, ...] = (
    "e2vpt.registry.cli",
    "e2vpt.torchserve.archive",
    "e2vpt.torchserve.predict",
    "e2vpt.onnx.export",
)
# The top-level commands each of those modules registers (checked by tests/registry/test_cli_light.py).
COMMAND_HOMES: dict[str, str] = {
    "tasks": "e2vpt.registry.cli",
    "registry": "e2vpt.registry.cli",
    "serve": "e2vpt.torchserve.archive",
    "predict": "e2vpt.torchserve.predict",
    "export-onnx": "e2vpt.onnx.export",
}
ENTRY_POINT_GROUP = "e2vpt.commands"


def _command_word(argv: list[str]) -> str | None:
    """The first word of argv that is not an option (the command), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given `argv` whose command has a known home, only that module is loaded."""
    parser = argparse.ArgumentParser(
        prog="e2vpt", description="E2VPT Serve: many vision tasks on one frozen ViT."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    home = COMMAND_HOMES.get(_command_word(argv) or "") if argv is not None else None
    if home is not None:
        importlib.import_module(home).register(sub)
        return parser
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for plugin in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        plugin.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # one line per HTTP call of the registry client is noise at the prompt
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
