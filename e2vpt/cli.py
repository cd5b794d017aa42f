"""The `e2vpt` command line. Each feature adds its subcommands from its own module (`register(sub)`).

The serving package's own commands are listed here; other installed packages (the trainer) add theirs
through the `e2vpt.commands` entry-point group, so `e2vpt` never imports them by name.
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
    "e2vpt.onnx.export",
)
ENTRY_POINT_GROUP = "e2vpt.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e2vpt", description="E2VPT Serve: many vision tasks on one frozen ViT."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for plugin in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        plugin.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
