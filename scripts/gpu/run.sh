#!/usr/bin/env bash
# The GPU run kit: everything the device machine should run, in ONE call (<= 9 minutes), from the repo root.
#
#   device run:  carry [".gpu_kit"]   command "bash scripts/gpu/run.sh"   timeout_s 600
#   here (plumbing test, CPU, quick bench):  OUT=/tmp/x bash scripts/gpu/run.sh
#
# Needs .gpu_kit/ from scripts/gpu/prepare.sh. Steps (each under `timeout`, the whole run under
# KIT_BUDGET_S seconds (510), only the steps named in KIT_STEPS when set; a failing step is recorded and
# the run goes on):
#   install   the carried wheels into $SITE (pip --no-index --no-deps --target); PYTHONPATH=$SITE:$PWD;
#             $SITE/bin (torchserve, torch-model-archiver) on PATH
#   unpack    redis.tar.xz and java.tar.xz into the run's temp dir; the carried Java runtime becomes JAVA_HOME
#             and the first java on PATH, and its model-server.jar goes back into the installed torchserve
#   redis     the carried redis-server (own loader, LD_LIBRARY_PATH) on a free port in a temp dir: REDIS_URL,
#             and on PATH for the tests that start their own
#   pytest_cuda   pytest -m cuda over all tests
#   bench_gpu     benchmarks/bench_gpu.py (full on CUDA, --quick on a CPU) -> gpu_<device>.json, all sections
#                 but TorchServe's
#   bench_http    bench_gpu.py --only http,ceiling: the product's .mar through TorchServe with 100 tasks at
#                 concurrency 64 on the device's engine, and the null engine's ceiling -> gpu_<device>_http.json
#   bench_*       bench_attention / bench_assembly / bench_images / bench_model with --device cuda (those present)
#   pytest_tests  tests/core and tests/serving (E2VPT_DEVICE=cuda when the tests read it)
# $OUT gets at most 8 files (the device tool's limit): summary.md, gpu_<device>.json, gpu_<device>_http.json,
# bench_gpu.log, bench_http.log, pytest_cuda.log, pytest_tests.log, kit.tar.gz (every log, other results,
# junit XML).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
KIT=${KIT:-$ROOT/.gpu_kit}
OUT=${OUT:-/tmp/e2vpt-gpu-out}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/e2vpt-site}
BUDGET=${KIT_BUDGET_S:-510}
START=$(date +%s)
WORK=$(mktemp -d /tmp/e2vpt-gpu-run.XXXXXX)
mkdir -p "$OUT" "$WORK/logs" "$WORK/results"
SUMMARY=$WORK/summary.md
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
echo "# GPU run kit: $(date -u +%FT%TZ), $(hostname)" > "$SUMMARY"
echo "| step | rc | seconds | note |" >> "$SUMMARY"
echo "|---|---|---|---|" >> "$SUMMARY"

left() { echo $((BUDGET - ($(date +%s) - START))); }
# KIT_STEPS=pytest_cuda,bench_gpu,...: run only these steps (default: all)
wanted() { [[ $1 == install || ",${KIT_STEPS:-all}," == *",all,"* || ",${KIT_STEPS:-}," == *",$1,"* ]]; }

# step NAME LIMIT_S CMD...: run CMD under `timeout` (at most LIMIT_S, at most what the budget leaves),
# its output to logs/NAME.log; record rc and seconds. 124 = timed out.
step() {
    local name=$1 limit=$2
    shift 2
    local budget t0 rc
    if ! wanted "$name"; then
        echo "| $name | - | 0 | not in KIT_STEPS |" >> "$SUMMARY"
        return 0
    fi
    budget=$(( $(left) - 15 ))
    if [ "$budget" -lt "$limit" ]; then limit=$budget; fi
    if [ "$limit" -lt 20 ]; then
        echo "| $name | - | 0 | skipped: budget spent |" >> "$SUMMARY"
        echo "[kit] $name: skipped (budget spent)"
        return 0
    fi
    echo "[kit] $name: up to ${limit}s: $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    echo "| $name | $rc | $(( $(date +%s) - t0 )) | $( [ $rc = 124 ] && echo "timed out at ${limit}s" ) |" >> "$SUMMARY"
    echo "[kit] $name: rc=$rc after $(( $(date +%s) - t0 ))s"
    tail -n 3 "$WORK/logs/$name.log" | sed 's/^/    /'
    return 0
}

# ---- environment
{
    echo "## environment"; uname -a; nproc; free -g 2>/dev/null | head -2
    nvidia-smi 2>&1 | head -15 || true
    "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
} > "$WORK/logs/environment.log" 2>&1

# ---- install the carried wheels
if [ "${KIT_INSTALL:-1}" = 1 ]; then
    step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$KIT"/whl/*.whl
    # the project's wheel is there for its entry points: the checkout's packages are the ones that run
    rm -rf "$SITE/e2vpt" "$SITE/training"
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$SITE/bin" ] && export PATH="$SITE/bin:$PATH"   # torchserve, torch-model-archiver

# ---- the carried native parts: redis-server, and a Java runtime with TorchServe's front end (when carried)
UNPACK=$WORK/kit
mkdir -p "$UNPACK"
for part in redis java; do
    if [ -f "$KIT/$part.tar.xz" ]; then
        t0=$(date +%s)
        # Python's tarfile: the device image may lack the xz tool, never Python's lzma
        if "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], filter="tar")' \
            "$KIT/$part.tar.xz" "$UNPACK" >> "$WORK/logs/environment.log" 2>&1; then
            echo "| unpack $part | 0 | $(( $(date +%s) - t0 )) | |" >> "$SUMMARY"
        else
            echo "| unpack $part | 1 | $(( $(date +%s) - t0 )) | $KIT/$part.tar.xz did not unpack |" >> "$SUMMARY"
        fi
    fi
done
if [ -x "$UNPACK/java/jre/bin/java" ] && "$UNPACK/java/jre/bin/java" -version > "$WORK/logs/java.log" 2>&1; then
    export JAVA_HOME=$UNPACK/java/jre PATH="$UNPACK/java/jre/bin:$PATH"   # TorchServe reads JAVA_HOME
    if [ "${KIT_INSTALL:-1}" = 1 ] && [ -d "$SITE/ts" ]; then   # the carried wheel has no frontend/ left
        mkdir -p "$SITE/ts/frontend" && cp "$UNPACK/java/model-server.jar" "$SITE/ts/frontend/"
    fi
    echo "| java | 0 | 0 | $(head -1 "$WORK/logs/java.log") at $JAVA_HOME |" >> "$SUMMARY"
elif [ -f "$KIT/java.tar.xz" ]; then
    echo "| java | 1 | 0 | the carried Java runtime does not run: see java.log |" >> "$SUMMARY"
fi
"$PY" -c 'import pydantic, pydantic_settings, redis, timm, e2vpt.serving.engine; print("imports ok: timm", timm.__version__)' \
    >> "$WORK/logs/environment.log" 2>&1 || echo "| imports | 1 | 0 | e2vpt.serving.engine does not import: see environment.log |" >> "$SUMMARY"

# ---- Redis: the carried redis-server (its own loader and libraries), else one on PATH
REDIS_BIN=""
if [ -x "$UNPACK/redis/bin/redis-server" ] && "$UNPACK/redis/bin/redis-server" --version > /dev/null 2>&1; then
    REDIS_BIN=$UNPACK/redis/bin/redis-server
    export PATH="$UNPACK/redis/bin:$PATH"   # tests that start their own redis-server find this one
elif command -v redis-server > /dev/null; then
    REDIS_BIN=$(command -v redis-server)
fi
REDIS_PID=""
if [ -n "$REDIS_BIN" ]; then
    PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    mkdir -p "$WORK/redis"
    "$REDIS_BIN" --port "$PORT" --bind 127.0.0.1 --dir "$WORK/redis" --save '' --appendonly no \
        > "$WORK/logs/redis.log" 2>&1 &
    REDIS_PID=$!
    export REDIS_URL="redis://127.0.0.1:$PORT/0"   # the tests' redis_url fixture, Settings.redis_url, bench_gpu
    if "$PY" - <<'PY' >> "$WORK/logs/redis.log" 2>&1
import os, time, redis
r = redis.Redis.from_url(os.environ["REDIS_URL"])
for _ in range(100):
    try:
        print("redis answers:", r.ping(), r.info("server")["redis_version"]); break
    except redis.RedisError:
        time.sleep(0.1)
else:
    raise SystemExit("redis-server did not answer")
PY
    then echo "| redis | 0 | 0 | $REDIS_BIN on port $PORT |" >> "$SUMMARY"
    else echo "| redis | 1 | 0 | $REDIS_BIN did not answer: see redis.log |" >> "$SUMMARY"
    fi
else
    echo "| redis | 1 | 0 | no redis-server (run scripts/gpu/prepare.sh) |" >> "$SUMMARY"
fi
trap '[ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null' EXIT

HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
DEV=$([ "$HAS_CUDA" = 1 ] && echo cuda || echo cpu)
QUICK=$([ "$HAS_CUDA" = 1 ] && echo "" || echo "--quick")
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors
        --ignore=tests/registry/test_registry_fuzz.py)   # schemathesis is not carried

# ---- the CUDA tests (skip cleanly without a GPU)
step pytest_cuda 200 "${PYTEST[@]}" -m cuda --junitxml="$WORK/results/junit_cuda.xml" tests

# ---- the GPU benchmark (its own budget, so that it ends inside the step and writes its JSON); TorchServe's
# sections in their own step, each with its own budget
step bench_gpu 240 "$PY" benchmarks/bench_gpu.py --device "$DEV" $QUICK --budget-s 180 --skip http,ceiling \
    --out "$WORK/results/gpu_$DEV.json" ${BENCH_GPU_ARGS:-$([ "$HAS_CUDA" = 1 ] || echo "--budget-s 120")}
step bench_http 150 "$PY" benchmarks/bench_gpu.py --device "$DEV" $QUICK --budget-s 110 --only http,ceiling \
    --out "$WORK/results/gpu_${DEV}_http.json" ${BENCH_HTTP_ARGS:-$([ "$HAS_CUDA" = 1 ] || echo "--http-seconds 3")}

# ---- the other benchmarks on the device (those present), each with the arguments it takes
bench() {  # bench NAME LIMIT_S ARGS...
    local name=$1 limit=$2
    shift 2
    if [ -f "benchmarks/$name.py" ]; then
        # JSON into the run's results, never over the checkout's committed benchmarks/results
        step "$name" "$limit" "$PY" "benchmarks/$name.py" --device "$DEV" --out "$WORK/results/${name#bench_}_$DEV.json" "$@"
    else
        echo "| $name | - | 0 | not present |" >> "$SUMMARY"
    fi
}
if [ "$HAS_CUDA" = 1 ]; then
    bench bench_attention 90 --batch 64 256
    bench bench_images 90
    bench bench_assembly 60 --dtype float16
    bench parity_images 120 --backbone tiny --n 300   # nvjpeg + tensor transform vs the PIL path
else
    bench bench_attention 60 --batch 2 --repeats 3
    bench bench_assembly 60 --quick
fi

# ---- core and serving tests on the device's torch (E2VPT_DEVICE=cuda when the tests read it)
TEST_ENV=()
if [ "$HAS_CUDA" = 1 ] && grep -rqs "E2VPT_DEVICE" tests/; then TEST_ENV=(env E2VPT_DEVICE=cuda); fi
step pytest_tests 120 "${TEST_ENV[@]}" "${PYTEST[@]}" --junitxml="$WORK/results/junit_tests.xml" tests/core tests/serving

# ---- collect into $OUT (at most 8 files)
{
    echo
    for f in "$WORK"/logs/pytest_*.log; do
        [ -f "$f" ] && echo "$(basename "$f"): $(grep -E '(passed|failed|error|skipped|no tests ran)' "$f" | tail -1)"
    done
    echo
    for f in bench_gpu bench_http; do
        echo "## $f summary"
        sed -n '/^## summary/,$p' "$WORK/logs/$f.log" 2>/dev/null
    done
} >> "$SUMMARY"
cp "$SUMMARY" "$OUT/summary.md"
cp "$WORK/results/gpu_$DEV.json" "$WORK/results/gpu_${DEV}_http.json" "$OUT/" 2>/dev/null || true
for f in bench_gpu bench_http pytest_cuda pytest_tests; do cp "$WORK/logs/$f.log" "$OUT/$f.log" 2>/dev/null || true; done
tar -czf "$OUT/kit.tar.gz" -C "$WORK" logs results summary.md
echo "[kit] total $(( $(date +%s) - START ))s; files in $OUT:"; ls -la "$OUT"
cat "$SUMMARY"
