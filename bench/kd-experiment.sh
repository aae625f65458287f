#!/usr/bin/env bash
# The soft-label experiment of the README: SmolLM2-135M-Instruct (local, greedy) answers the 320
# prompts of prompts/short-instructions.jsonl with top-20 soft labels; the same pruned student
# (8 of its 30 layers) then trains for the same steps on the same answers three times, only λ
# changing: λ = 0 (hard labels only), λ = 0.5 and λ = 1 (soft labels only). It prints the
# storage cost of the soft labels, a table of validation cross-entropy and greedy agreement
# (untrained and after each run), and writes the comparison plot.
#
#   bench/kd-experiment.sh                 # everything (about 25 minutes on 2 cores)
#   DB=runs/kd/gen.sqlite bench/kd-experiment.sh   # reuse a database that already has the job
#
# Outputs: runs/kd/{gen.sqlite,hard,kd-0.5,kd-1}, docs/kd-experiment.png.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/distill/target}"
OUT="${OUT:-runs/kd}"
DB="${DB:-$OUT/gen.sqlite}"
PORT="${PORT:-8097}"
STEPS="${STEPS:-60}"
PLOT="${PLOT:-docs/kd-experiment.png}"
MODEL="$(scripts/fetch-model.sh | tail -n 1)"
cargo build --release --locked -p server --bin server -p trainer --bin trainer --example compare_runs
BIN="$CARGO_TARGET_DIR/release"
mkdir -p "$OUT"

if [ ! -f "$DB" ]; then
    echo "== generating: 320 prompts, greedy, top-20 soft labels"
    "$BIN/server" --db "$DB" --bind "127.0.0.1:$PORT" --teacher "smol=local:$MODEL" --max-in-flight 16 >"$OUT/server.log" 2>&1 &
    PID=$!
    trap 'kill $PID 2>/dev/null || true' EXIT
    for _ in $(seq 1 100); do curl -fsS "127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 0.2; done
    json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
    SET="$(curl -fsS --data-binary @prompts/short-instructions.jsonl -H 'content-type: application/x-ndjson' \
        "127.0.0.1:$PORT/v1/prompt-sets?name=short-instructions" | json 'd["id"]')"
    JOB="$(curl -fsS "127.0.0.1:$PORT/v1/jobs" -H 'content-type: application/json' \
        -d "{\"prompt_set\": $SET, \"teacher\": \"smol\", \"max_new_tokens\": 160, \"logprobs\": 20}" | json 'd["id"]')"
    until curl -fsS "127.0.0.1:$PORT/v1/jobs/$JOB" | json 'd["status"]' | grep -qx done; do sleep 2; done
    kill $PID; wait $PID 2>/dev/null || true
    trap - EXIT
fi

echo "== soft-label storage on this job"
python3 - "$DB" <<'EOF'
import sqlite3, sys
c = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
rows = c.execute("SELECT soft_labels FROM completions WHERE soft_labels IS NOT NULL").fetchall()
# Header: k at bytes 6..8, positions at 8..12 (docs/schema.md).
pairs = sum(int.from_bytes(b[6:8], "little") * int.from_bytes(b[8:12], "little") for (b,) in rows)
positions = sum(int.from_bytes(b[8:12], "little") for (b,) in rows)
n, blob, k = len(rows), sum(len(b) for (b,) in rows), int.from_bytes(rows[0][0][6:8], "little")
print(f"{n} answers, {positions} answer tokens, k = {k}: {blob} bytes of soft labels = "
      f"{blob / pairs:.3f} bytes per (id, log-probability) pair, headers included")
EOF

COMMON=(--from-db "$DB" --init "$MODEL" --keep-layers 0,4,8,12,16,20,24,29 --max-len 256 --batch-tokens 2048
    --lr 3e-4 --warmup 5 --max-steps "$STEPS" --eval-every 10 --save-every 100000 --val-fraction 0.2 --min-val 16 --seed 7)
for run in "hard 0" "kd-0.5 0.5" "kd-1 1"; do
    set -- $run
    if [ ! -f "$OUT/$1/model.safetensors" ]; then
        rm -rf "${OUT:?}/$1"
        echo "== training $1 (λ = $2)"
        "$BIN/trainer" "${COMMON[@]}" --kd --lambda "$2" --out "$OUT/$1"
    fi
done

"$BIN/examples/compare_runs" "$PLOT" "hard labels (λ=0)=$OUT/hard" "KD λ=0.5=$OUT/kd-0.5" "KD λ=1=$OUT/kd-1"
echo "== results (validation: held-out teacher answers)"
python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
def evals(run):
    return [m for m in map(json.loads, open(f"{out}/{run}/metrics.jsonl")) if m["kind"] == "eval"]
first = evals("hard")[0]
print("| student | validation CE (nats/token) | greedy agreement |")
print("|---|---|---|")
print(f"| untrained (8 of 30 layers) | {first['val_loss']:.4f} | {100 * first['greedy_agreement']:.2f} % |")
for run, name in [("hard", "hard labels, λ = 0"), ("kd-0.5", "KD, λ = 0.5"), ("kd-1", "KD, λ = 1")]:
    e = evals(run)[-1]
    print(f"| {name}, {e['step']} steps | {e['val_loss']:.4f} | {100 * e['greedy_agreement']:.2f} % |")
print(f"({first['val_tokens']} validation answer tokens)")
EOF
