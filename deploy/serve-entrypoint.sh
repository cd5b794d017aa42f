#!/usr/bin/env bash
# Build the .mar from handlers/ + model_store/ and run TorchServe in the foreground with the repo's config.
# The TorchServe container's entrypoint, and the same two commands `make demo` runs. Settings come from
# the environment (E2VPT_*, see README "Configuration reference"); extra arguments go to `serve start`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
echo "[serve-entrypoint] building the model archive"
"$PYTHON" -m e2vpt.cli serve build-mar
echo "[serve-entrypoint] starting TorchServe"
exec "$PYTHON" -m e2vpt.cli serve start --foreground "$@"
