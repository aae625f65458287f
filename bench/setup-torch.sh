#!/usr/bin/env bash
# Create (idempotently) a Python venv with PyTorch for CPU, for bench/train_torch.py (the
# PyTorch side of `cargo bench -p trainer --bench train`). Not needed by the tests.
#
#   venv:       ${XDG_CACHE_HOME:-$HOME/.cache}/distill/torch-venv
#   wheelhouse: ${XDG_CACHE_HOME:-$HOME/.cache}/distill/wheels/torch-<version>/
#
# PyPI's Linux torch wheel is a CUDA build and declares the CUDA runtime (nvidia-*,
# cuda-toolkit, triton; ~5 GB installed) as dependencies. Installed with --no-deps it does not
# even import on CPU (`import torch` dlopens libcudart.so.13 and libcublasLt), so it is
# installed the normal way. Only the CPU is used (the check below, and train_torch.py).
#
# The torch wheel is taken from $TORCH_WHEEL, else from /tmp/torchwheel/ or the wheelhouse if
# one for $TORCH_VERSION is there, else downloaded from PyPI (`pip download --no-deps`).
#
# Progress goes to stderr; the last (only) line on stdout is the venv's python.
#
# Env overrides:
#   PYTHON               base interpreter (default: python3)
#   TORCH_VERSION        default 2.15.0
#   TORCH_WHEEL          a torch wheel file to install
#   DISTILL_TORCH_FORCE=1  recreate the venv even if it looks fine
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.15.0}"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/distill"
VENV="$CACHE_DIR/torch-venv"
WHEELHOUSE="$CACHE_DIR/wheels/torch-$TORCH_VERSION"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.distill-torch-stamp"
# What bench/train_torch.py imports besides torch.
DEPS=(numpy safetensors)

log() { echo "setup-torch: $*" >&2; }

mkdir -p "$CACHE_DIR"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE_DIR/torch-setup.lock"
    flock 9
fi

check() {
    "$VENV/bin/python" - <<'PY' >&2
import torch, numpy, safetensors.torch
x = torch.randn(64, 32, requires_grad=True)
(x @ x.t()).sum().backward()
assert x.grad is not None and x.grad.shape == (64, 32)
print("torch", torch.__version__, "CPU OK, threads", torch.get_num_threads())
PY
}

if [[ "${DISTILL_TORCH_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$TORCH_VERSION" ]] && check 2>/dev/null; then
    log "venv $VENV already has torch $TORCH_VERSION"
    echo "$VENV/bin/python"
    exit 0
fi

rm -rf "$VENV"
log "creating $VENV"
"$PYTHON" -m venv "$VENV" >&2
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2 || true

PY_TAG="$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
find_wheel() {
    local d
    for d in "$@"; do
        [[ -d "$d" ]] || continue
        ls "$d"/torch-"$TORCH_VERSION"-"$PY_TAG"-"$PY_TAG"-*"$(uname -m)".whl 2>/dev/null | head -1
    done | head -1
}
WHEEL="${TORCH_WHEEL:-$(find_wheel /tmp/torchwheel "$WHEELHOUSE")}"
if [[ -z "$WHEEL" ]]; then
    mkdir -p "$WHEELHOUSE"
    log "downloading torch $TORCH_VERSION from PyPI (wheel only)"
    "$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELHOUSE" "torch==$TORCH_VERSION" >&2
    WHEEL="$(find_wheel "$WHEELHOUSE")"
fi
[[ -n "$WHEEL" && -f "$WHEEL" ]] || { log "no torch $TORCH_VERSION wheel found"; exit 1; }

log "installing $(basename "$WHEEL") with its dependencies from PyPI"
"$VENV/bin/python" -m pip install --quiet "$WHEEL" "${DEPS[@]}" >&2
check
echo "$TORCH_VERSION" > "$STAMP"
log "ready"
echo "$VENV/bin/python"
