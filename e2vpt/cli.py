"""The `e2vpt` command line. Each feature adds its subcommands from its own module (`register(sub)`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands: each defines `register(subparsers)` and sets `func` on its parsers.
COMMAND_MODULES: tuple[str, ...] = (
    "e2vpt.registry_cli",
    "e2vpt.torchserve",
    "training.cli",
    "e2vpt.onnx_export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e2vpt", description="E2VPT Serve: many vision tasks on one frozen ViT."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
