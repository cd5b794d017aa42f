#!/usr/bin/env bash
# Prepare the GPU run kit HERE (a machine with network access), for scripts/gpu/run.sh on the device machine.
#
#   bash scripts/gpu/prepare.sh        (or: make gpu-kit)
#
# Writes the git-ignored folder .gpu_kit/:
#   whl/    wheels (CPython 3.12, manylinux x86_64) of what the device's image lacks: the engine's and the
#           tests' imports that are not in its package list (/work/.library/device/KINDS.md), at the versions
#           this project pins (pyproject.toml / the shared venv). torchserve is carried without its Java
#           front end (model-server.jar: there is no Java there, and only `ts.context` is imported by tests).
#   redis/  redis-server, the libraries `ldd` lists for it, and bin/redis-server: a wrapper that runs it
#           through the carried loader with LD_LIBRARY_PATH on the carried libraries.
# The device run then needs only:  carry [".gpu_kit"],  command "bash scripts/gpu/run.sh".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
KIT=.gpu_kit
PYTHON=${PYTHON:-python3}

# name==version: everything the device lacks (KINDS.md "Python packages already there" has the rest:
# torch, torchvision, numpy, pillow, safetensors, prometheus-client, onnx*, httpx, anyio, pytest,
# pytest-timeout, hypothesis, pyyaml, tqdm, psutil, packaging, click, h11, annotated-doc ...).
WHEELS=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    pydantic-settings==2.16.3
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0      # pydantic 2.14 needs >= 4.16; the image's version is not known
    python-dotenv==1.2.4
    redis==8.1.0
    fastapi==0.163.2
    starlette==1.10.0
    opentelemetry-api==1.45.2      # starlette 1.10 imports it
    uvicorn==0.54.0
    python-multipart==0.0.34
    timm==1.0.31                   # the pinned version (fingerprints and model code), whatever the image has
    torch-model-archiver==0.12.0
    torchserve==0.12.0
)

rm -rf "$KIT/whl" "$KIT/redis"
mkdir -p "$KIT/whl" "$KIT/redis/lib" "$KIT/redis/bin"
echo "[prepare] downloading ${#WHEELS[@]} wheels into $KIT/whl"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d "$KIT/whl" "${WHEELS[@]}"

# this project's own wheel, for its metadata only: run.sh installs it and then removes its packages, so the
# checkout's code runs while the entry points (`e2vpt train` from `e2vpt.commands`) resolve
echo "[prepare] building this project's wheel (entry points)"
"$PYTHON" -m pip wheel -q --no-deps -w "$KIT/whl" .

# torchserve without its Java front end (45 MB): the jar cannot run there and would not fit the 64 MiB that a
# device call carries. Rewritten as a valid wheel: the jar and its RECORD line removed.
ts_whl=$(ls "$KIT"/whl/torchserve-*.whl)
"$PYTHON" - "$ts_whl" <<'PY'
import sys, zipfile, os
src = sys.argv[1]
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.endswith("model-server.jar"):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if b"model-server.jar" not in l)
        zout.writestr(item, data)
os.replace(tmp, src)
PY

# redis-server and its libraries, run through the carried loader: the device image's glibc may differ
# from this machine's, and a carried libc must be loaded by its own ld.so.
exe=$(command -v redis-server) || { echo "[prepare] redis-server is not installed here" >&2; exit 1; }
cp -L "$exe" "$KIT/redis/lib/redis-server"
ldd "$exe" | awk '/=> \// {print $3} /^\s*\/lib/ {print $1}' | sort -u | while read -r lib; do
    cp -L "$lib" "$KIT/redis/lib/"
done
loader=$(ldd "$exe" | awk '/ld-linux/ {print ($3 ~ /^\//) ? $3 : $1}' | head -1)
cp -L "$loader" "$KIT/redis/lib/ld-linux.so"
cat > "$KIT/redis/bin/redis-server" <<'SH'
#!/usr/bin/env bash
# The carried redis-server: its own loader and libraries (LD_LIBRARY_PATH for this process only).
lib="$(cd "$(dirname "${BASH_SOURCE[0]}")/../lib" && pwd)"
LD_LIBRARY_PATH="$lib" exec "$lib/ld-linux.so" --library-path "$lib" "$lib/redis-server" "$@"
SH
chmod +x "$KIT/redis/bin/redis-server" "$KIT/redis/lib/redis-server" "$KIT/redis/lib/ld-linux.so"
"$KIT/redis/bin/redis-server" --version

du -sh "$KIT/whl" "$KIT/redis" "$KIT"
ls "$KIT/whl"
echo "[prepare] done: carry [\".gpu_kit\"] and run: bash scripts/gpu/run.sh"
