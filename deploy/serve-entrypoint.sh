#!/usr/bin/env bash
# Build the .mar (handler and config template from e2vpt/torchserve/) and run TorchServe with the repo's config, until it exits.
# The TorchServe container's entrypoint, running the same two commands as `make demo` and the README:
#   python -m e2vpt.cli serve build-mar   and   python -m e2vpt.cli serve start
# `serve start` returns once every worker is ready; this script then follows TorchServe's output and
# stays in the foreground (what a container needs), and on SIGTERM/SIGINT runs `serve stop`.
# Settings come from the environment (E2VPT_*, README "Configuration reference"); extra arguments go to
# `serve start` (for example --workers 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"

echo "[serve-entrypoint] building the model archive"
"$PYTHON" -m e2vpt.cli serve build-mar

# Installed before the start: a SIGTERM during start-up stops TorchServe once `serve start` returns.
pid="?"
tail_pid=""
stop() {
    echo "[serve-entrypoint] stopping TorchServe (pid $pid)"
    "$PYTHON" -m e2vpt.cli serve stop || true
    if [ -n "$tail_pid" ]; then kill "$tail_pid" 2>/dev/null || true; fi
    exit 0
}
trap stop TERM INT

echo "[serve-entrypoint] starting TorchServe"
# `serve start` prints its state as JSON (pid, workdir, URLs, inference token) on stdout.
state="$("$PYTHON" -m e2vpt.cli serve start "$@")"
field() { "$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$state" "$1"; }
pid="$(field pid)"
workdir="$(field workdir)"
echo "[serve-entrypoint] TorchServe ready (pid $pid, workdir $workdir): $(field predictions_url)"

tail -n +1 -F "$workdir/torchserve.out" &
tail_pid=$!
while kill -0 "$pid" 2>/dev/null; do
    sleep 5 &
    wait $! || true
done
kill "$tail_pid" 2>/dev/null || true
echo "[serve-entrypoint] TorchServe (pid $pid) exited" >&2
exit 1
