#!/usr/bin/env bash
# Does `transformers` load a trainer output folder, and agree with our server on it?
#
#   scripts/check-transformers.sh runs/student [PROMPTS.jsonl]
#
# Serves DIR with our server as a local teacher in f32 (`--local-precision s=f32`, the
# folder's exact arithmetic), has it answer a few prompts greedily, then loads DIR with
# transformers (AutoTokenizer + AutoModelForCausalLM, f32) and checks: the chat template gives
# the server's prompt token ids, and greedy generation gives the server's answer, token for
# token. Uses the PyTorch venv of bench/setup-torch.sh (created if missing) and installs
# transformers into it. Not needed by the tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR="${1:?usage: scripts/check-transformers.sh MODEL_DIR [PROMPTS.jsonl]}"
PROMPTS="${2:-prompts/general-knowledge.jsonl}"
N="${N:-6}"
MAX_NEW="${MAX_NEW:-48}"
PORT="${PORT:-8097}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.25.0}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/distill/target}"
[[ -f "$DIR/config.json" ]] || { echo "$DIR has no config.json: give the trainer's --out folder" >&2; exit 1; }

PY="$(bench/setup-torch.sh | tail -n 1)"
"$PY" -c "import transformers" 2>/dev/null || "$PY" -m pip install --quiet "transformers==$TRANSFORMERS_VERSION" >&2
cargo build --release --locked -p server --bin server -p trainer --bin trainer >&2

WORK="$(mktemp -d)"
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
URL="http://127.0.0.1:$PORT"
"$CARGO_TARGET_DIR/release/server" --db "$WORK/gen.sqlite" --bind "127.0.0.1:$PORT" \
    --teacher "s=local:$DIR" --local-precision s=f32 >"$WORK/server.log" 2>&1 &
PID=$!
for _ in $(seq 1 150); do
    curl -fsS "$URL/health" >/dev/null 2>&1 && break
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
    sleep 0.2
done
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
head -n "$N" "$PROMPTS" > "$WORK/prompts.jsonl"
SET="$(curl -fsS --data-binary @"$WORK/prompts.jsonl" -H 'content-type: application/x-ndjson' "$URL/v1/prompt-sets?name=check" | json 'd["id"]')"
JOB="$(curl -fsS "$URL/v1/jobs" -H 'content-type: application/json' \
    -d "{\"prompt_set\": $SET, \"teacher\": \"s\", \"max_new_tokens\": $MAX_NEW}" | json 'd["id"]')"
until [[ "$(curl -fsS "$URL/v1/jobs/$JOB" | json 'd["status"]')" =~ ^(done|failed|cancelled)$ ]]; do sleep 1; done
curl -fsS "$URL/v1/jobs/$JOB/generations?limit=1000" | json 'json.dumps([g for g in d["items"] if g["status"] == "done"])' > "$WORK/generations.json"
"$PY" scripts/check_transformers.py --model "$DIR" --generations "$WORK/generations.json"
