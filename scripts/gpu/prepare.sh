#!/usr/bin/env bash
# Prepare the GPU run kit HERE (a machine with network access), for scripts/gpu/run.sh on the device machine.
#
#   bash scripts/gpu/prepare.sh        (or: make gpu-kit)
#
# Writes the git-ignored folder .gpu_kit/:
#   whl/    wheels (CPython 3.12, manylinux x86_64) of what the device's image lacks: the engine's and the
#           tests' imports that are not in its package list (/work/.library/device/KINDS.md), at the versions
#           this project pins (pyproject.toml / the shared venv). torchserve's wheel is carried without its
#           Java front end (model-server.jar, 45 MB deflated), which java.tar.xz holds instead.
#   redis.tar.xz  redis/: redis-server, the libraries `ldd` lists for it, and bin/redis-server: a wrapper that
#           runs it through the carried loader with LD_LIBRARY_PATH on the carried libraries (17 MB -> 5.5).
#   java.tar.xz   java/: a Java runtime linked (jlink) from a portable JDK (KIT_JDK, default the Temurin build
#           here: built against glibc 2.17, so it runs on the device whatever its glibc) with the modules
#           TorchServe's front end uses, and java/model-server.jar (stored, so that xz compresses the
#           classes: 41 MB in all). With it, TorchServe runs on the device: bench_gpu's `http` and `ceiling`
#           sections. Rebuilt only when the JDK or the jar changes (java.key). KIT_JAVA=0: left out.
# A device call carries at most 64 MiB: the kit is about 54 MB. The device run then needs only:
# carry [".gpu_kit"], command "bash scripts/gpu/run.sh".
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

STAGE=$(mktemp -d /tmp/e2vpt-kit-stage.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
rm -rf "$KIT/whl" "$KIT/redis" "$KIT/redis.tar.xz"
mkdir -p "$KIT/whl" "$STAGE/redis/lib" "$STAGE/redis/bin"
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
# The jar is kept (stored, uncompressed) in $STAGE for java.tar.xz.
ts_whl=$(ls "$KIT"/whl/torchserve-*.whl)
"$PYTHON" - "$ts_whl" "$STAGE/model-server.jar" <<'PY'
import io, sys, zipfile, os
src, jar = sys.argv[1], sys.argv[2]
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.endswith("model-server.jar"):
            with zipfile.ZipFile(io.BytesIO(zin.read(item.filename))) as jin, \
                    zipfile.ZipFile(jar, "w", zipfile.ZIP_STORED) as jout:
                for entry in jin.infolist():
                    data = jin.read(entry)
                    entry.compress_type = zipfile.ZIP_STORED
                    jout.writestr(entry, data)
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
cp -L "$exe" "$STAGE/redis/lib/redis-server"
ldd "$exe" | awk '/=> \// {print $3} /^\s*\/lib/ {print $1}' | sort -u | while read -r lib; do
    cp -L "$lib" "$STAGE/redis/lib/"
done
loader=$(ldd "$exe" | awk '/ld-linux/ {print ($3 ~ /^\//) ? $3 : $1}' | head -1)
cp -L "$loader" "$STAGE/redis/lib/ld-linux.so"
cat > "$STAGE/redis/bin/redis-server" <<'SH'
#!/usr/bin/env bash
# The carried redis-server: its own loader and libraries (LD_LIBRARY_PATH for this process only).
lib="$(cd "$(dirname "${BASH_SOURCE[0]}")/../lib" && pwd)"
LD_LIBRARY_PATH="$lib" exec "$lib/ld-linux.so" --library-path "$lib" "$lib/redis-server" "$@"
SH
chmod +x "$STAGE/redis/bin/redis-server" "$STAGE/redis/lib/redis-server" "$STAGE/redis/lib/ld-linux.so"
"$STAGE/redis/bin/redis-server" --version
tar -C "$STAGE" -cf - redis | xz -T2 -9 > "$KIT/redis.tar.xz"

# A Java runtime for TorchServe's front end: jlink from a portable JDK (Temurin's builds need glibc 2.17 and
# no other system library). The modules: what `jdeps --print-module-deps` lists for model-server.jar
# (java.compiler, java.desktop, java.management.rmi, java.naming, java.prefs, java.scripting, java.sql,
# jdk.sctp, jdk.unsupported, with what they require), and jdk.management (the front end's OS metrics),
# jdk.crypto.ec and jdk.zipfs.
JAVA_MODULES=java.base,java.compiler,java.desktop,java.management.rmi,java.naming,java.prefs,java.scripting,\
java.sql,jdk.sctp,jdk.unsupported,jdk.management,jdk.crypto.ec,jdk.zipfs
if [ "${KIT_JAVA:-1}" = 1 ]; then
    jdk=${KIT_JDK:-$(ls -d /usr/lib/jvm/temurin-* 2>/dev/null | sort -V | tail -1)}
    if [ -z "$jdk" ] || [ ! -x "$jdk/bin/jlink" ]; then
        echo "[prepare] no portable JDK with jlink (set KIT_JDK): java.tar.xz left out, TorchServe will not run there"
        rm -f "$KIT/java.tar.xz" "$KIT/java.key"
    else
        key="$("$jdk/bin/java" -version 2>&1 | tr '\n' ' ') $JAVA_MODULES $(sha256sum < "$STAGE/model-server.jar")"
        if [ -f "$KIT/java.tar.xz" ] && [ "$(cat "$KIT/java.key" 2>/dev/null)" = "$key" ]; then
            echo "[prepare] java.tar.xz is up to date"
        else
            echo "[prepare] linking a Java runtime from $jdk and packing it with model-server.jar (about 2 minutes)"
            mkdir -p "$STAGE/java"
            "$jdk/bin/jlink" --add-modules "$JAVA_MODULES" --strip-debug --no-header-files --no-man-pages \
                --output "$STAGE/java/jre"
            "$STAGE/java/jre/bin/java" -version
            mv "$STAGE/model-server.jar" "$STAGE/java/"
            tar -C "$STAGE" -cf - java | xz -T2 -9 > "$KIT/java.tar.xz"
            echo "$key" > "$KIT/java.key"
        fi
    fi
else
    rm -f "$KIT/java.tar.xz" "$KIT/java.key"
fi

du -sh "$KIT"/*
du -sh "$KIT"
ls "$KIT/whl"
echo "[prepare] done: carry [\".gpu_kit\"] and run: bash scripts/gpu/run.sh"
