"""`python -m e2vpt.rayserve [--address ADDR]`: serve the engine on Ray Serve (settings from E2VPT_*)."""

from __future__ import annotations

import argparse
import contextlib
import logging

from e2vpt.config import get_settings
from e2vpt.rayserve.app import run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m e2vpt.rayserve", description=__doc__)
    parser.add_argument("--address", default=None, help="a Ray cluster to join (default: start a local one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: Ray shuts a local cluster down on exit
        run(get_settings(), address=args.address)


if __name__ == "__main__":
    main()
