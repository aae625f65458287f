#!/usr/bin/env bash
# One command, no GPU, no API key: fetch the SmolLM2-135M teacher, build the server, run a real
# generation job on the embedded local teacher, and leave the server running for your own jobs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/distill/target}"
PORT="${PORT:-8080}"
DB="${DB:-$PWD/gen.sqlite}"
URL="http://127.0.0.1:$PORT"
SET="${SET:-prompts/math-word-problems.jsonl}"
MAX_NEW="${MAX_NEW:-256}"

MODEL="$(scripts/fetch-model.sh | tail -n 1)"
echo "== building the server and the trainer (release; the first build takes a few minutes)"
cargo build --release --locked -p server --bin server -p trainer --bin trainer
if curl -fsS "$URL/health" >/dev/null 2>&1; then
    echo "something already answers on $URL; stop it or run with PORT=..." >&2
    exit 1
fi
LOG="${DB%.sqlite}.server.log"
nohup "$CARGO_TARGET_DIR/release/server" --db "$DB" --bind "127.0.0.1:$PORT" \
    --teacher "smol=local:$MODEL" --max-in-flight 8 >"$LOG" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
    curl -fsS "$URL/health" >/dev/null 2>&1 && break
    kill -0 "$PID" 2>/dev/null || { echo "the server exited; see $LOG" >&2; tail -n 20 "$LOG" >&2; exit 1; }
    sleep 0.2
done
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
SET_ID="$(curl -fsS --data-binary @"$SET" -H 'content-type: application/x-ndjson' \
    "$URL/v1/prompt-sets?name=$(basename "$SET" .jsonl)" | json 'd["id"]')"
TEMPLATE="$(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read()))' prompts/templates/reason-step-by-step.j2)"
JOB_ID="$(curl -fsS "$URL/v1/jobs" -H 'content-type: application/json' \
    -d "{\"prompt_set\": $SET_ID, \"teacher\": \"smol\", \"max_new_tokens\": $MAX_NEW, \"template\": $TEMPLATE}" | json 'd["id"]')"
echo "== job $JOB_ID: $SET answered by SmolLM2-135M-Instruct (local, greedy, <= $MAX_NEW tokens)"
echo "   watch it in a browser: $URL/#/jobs/$JOB_ID"
while true; do
    LINE="$(curl -fsS "$URL/v1/jobs/$JOB_ID" | json '"%s %d/%d done, %d failed, %.1f answers/s, %d tokens out, ETA %s s" % (d["status"], d["counts"]["done"], d["total"], d["counts"]["failed"], d["answers_per_second"], d["tokens_out"], "?" if d["eta_seconds"] is None else round(d["eta_seconds"]))')"
    printf '\r%-90s' "$LINE"
    case "$LINE" in done*|cancelled*) break ;; esac
    sleep 1
done
echo
echo "== finished: every answer is in $DB (schema: docs/schema.md)"
echo "   export for TRL:  curl -s '$URL/v1/jobs/$JOB_ID/export?format=jsonl' > job-$JOB_ID.jsonl"
echo "   next: fine-tune a 15-layer student of the teacher on it (CPU: about 25 s a step on 2 cores, 20 steps ~ 8 minutes):"
echo "   $CARGO_TARGET_DIR/release/trainer --from-db $DB --init $MODEL \\"
echo "       --keep-layers 0,2,4,6,8,10,12,14,16,18,20,22,24,26,28 --max-steps 20 --max-len 512 --batch-tokens 1024 --grad-accum 4 --out runs/student"
echo "== the server keeps running at $URL (pid $PID, log $LOG) for your own prompt sets:"
echo "   in the browser: $URL/#/new (upload a JSONL / CSV / Parquet file or paste prompts)"
echo "   curl --data-binary @my-prompts.jsonl -H 'content-type: application/x-ndjson' '$URL/v1/prompt-sets?name=mine'"
echo "   curl $URL/v1/jobs -H 'content-type: application/json' -d '{\"prompt_set\": ID, \"teacher\": \"smol\"}'"
echo "   stop it with: kill $PID"
