#!/usr/bin/env bash
# Create (idempotently) a Python venv with llama-cpp-python[server] (CPU-only).
#
#   venv:      ${XDG_CACHE_HOME:-$HOME/.cache}/distill/llama-venv
#   wheelhouse ${XDG_CACHE_HOME:-$HOME/.cache}/distill/wheels/<key>/
#
# llama-cpp-python is built from its sdist (it compiles the vendored llama.cpp
# with cmake; the cmake/ninja build tools come from PyPI as wheels). The build
# takes several minutes on 2 cores the first time; the resulting wheel and
# all dependency wheels are cached in the wheelhouse, so recreating the venv
# on the same machine is fast and needs no network.
#
# All progress output goes to stderr; the last (only) line on stdout is the
# path of the venv's python.
#
# Env overrides:
#   PYTHON               base interpreter (default: python3)
#   LLAMA_CMAKE_ARGS     replace the default CMAKE_ARGS below
#   DISTILL_LLAMA_FORCE=1  rebuild the venv even if it looks fine
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/distill"
VENV="$CACHE_DIR/llama-venv"
PYTHON="${PYTHON:-python3}"

# CPU-only, portable (x86-64 AVX2 baseline rather than -march=native, so a cached
# wheel never hits SIGILL on a different CPU), and skip everything the Python
# bindings don't need (tests, examples, tools, llama.cpp's own server, the
# multimodal mtmd library, https support).
DEFAULT_CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Release \
-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_CUDA=OFF -DGGML_HIP=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
-DGGML_SYCL=OFF -DGGML_OPENCL=OFF -DGGML_BLAS=OFF -DGGML_RPC=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DLLAVA_BUILD=OFF"
if [[ "$(uname -m)" != "x86_64" ]]; then
    DEFAULT_CMAKE_ARGS="${DEFAULT_CMAKE_ARGS//-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON/}"
fi
BUILD_CMAKE_ARGS="${LLAMA_CMAKE_ARGS:-$DEFAULT_CMAKE_ARGS}"

log() { echo "setup-llama-server: $*" >&2; }

mkdir -p "$CACHE_DIR"

# Serialise concurrent runs (e.g. parallel CI jobs on one machine).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE_DIR/llama-setup.lock"
    flock 9
fi

PY_TAG="$("$PYTHON" -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')"
ARGS_HASH="$(printf '%s' "$BUILD_CMAKE_ARGS" | "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:12])')"
KEY="llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$PY_TAG-$ARGS_HASH"
WHEELHOUSE="$CACHE_DIR/wheels/$KEY"
STAMP="$VENV/.distill-llama-stamp"

venv_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]] || return 1
    "$VENV/bin/python" - "$LLAMA_CPP_PYTHON_VERSION" <<'PY' >/dev/null 2>&1
import sys
import llama_cpp, llama_cpp.server.app  # noqa: F401  (loads libllama.so, fastapi, uvicorn)
assert llama_cpp.__version__ == sys.argv[1], llama_cpp.__version__
PY
}

if [[ "${DISTILL_LLAMA_FORCE:-0}" != 1 ]] && venv_ok; then
    log "venv up to date ($KEY)"
    echo "$VENV/bin/python"
    exit 0
fi

# 1. Build the wheelhouse once (the slow part).
if [[ ! -f "$WHEELHOUSE/.complete" ]]; then
    log "building wheels into $WHEELHOUSE (first time: compiles llama.cpp, several minutes)"
    log "CMAKE_ARGS=$BUILD_CMAKE_ARGS"
    TMP_WH="$(mktemp -d "$CACHE_DIR/wheels-tmp.XXXXXX")"
    trap 'rm -rf "$TMP_WH"' EXIT
    start=$SECONDS
    CMAKE_ARGS="$BUILD_CMAKE_ARGS" \
    FORCE_CMAKE=1 \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
        "$PYTHON" -m pip wheel --no-cache-dir \
            --wheel-dir "$TMP_WH" \
            "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION" >&2
    log "wheel build took $((SECONDS - start))s"
    mkdir -p "$CACHE_DIR/wheels"
    rm -rf "$WHEELHOUSE"
    touch "$TMP_WH/.complete"
    mv "$TMP_WH" "$WHEELHOUSE"
    trap - EXIT
else
    log "using cached wheelhouse $WHEELHOUSE"
fi

# 2. (Re)create the venv from the wheelhouse, offline.
log "creating venv $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" \
    "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION" >&2
printf '%s' "$KEY" >"$STAMP"

if ! venv_ok; then
    log "ERROR: venv at $VENV failed the import check"
    "$VENV/bin/python" -c 'import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)' >&2 || true
    exit 1
fi

log "ready: llama-cpp-python $LLAMA_CPP_PYTHON_VERSION"
echo "$VENV/bin/python"
