#!/usr/bin/env bash
# The whole test suite from a fresh clone: fetch the SmolLM2 GGUF into models/, set up
# llama.cpp's OpenAI-compatible server (a real teacher for one test), then run every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/distill/target}"
scripts/fetch-model.sh >/dev/null
LLAMA_SERVER_PYTHON="$(scripts/setup-llama-server.sh | tail -n 1)"
export LLAMA_SERVER_PYTHON
# mistralrs (the engine for non-Llama GGUF architectures) is an opt-in feature; test it too.
cargo test --workspace --locked --features distill-tests/mistralrs "$@"
