#!/usr/bin/env bash
# TinyShakespeare character-level benchmark: the GroundThink GSGS preset, then the
# same config as a Transformer (AAAA), each for its 15-minute wall-clock budget,
# then `groundthink eval` on the whole validation split (last 10% of the file).
#
#   . .venv/bin/activate && nohup benchmarks/train_tinyshakespeare.sh > runs/bench-tinyshakespeare.log 2>&1 &
#
# Environment: THREADS (default 2) sets torch's CPU threads, OUT (default runs) the
# parent folder, NAME (default bench-tinyshakespeare) the run-folder prefix, PATTERNS
# (default "GSGS AAAA") the layer patterns, and STEPS, when set, replaces the time
# budget by that many updates, e.g. STEPS=1540 for the tokens of 15 idle minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=../shared/data/tinyshakespeare.txt
OUT=${OUT:-runs}
THREADS=${THREADS:-2}
NAME=${NAME:-bench-tinyshakespeare}
PATTERNS=${PATTERNS:-GSGS AAAA}
budget=()
if [ -n "${STEPS:-}" ]; then
    budget=(--set train.max_minutes=0 --set train.max_steps="$STEPS")
fi
mkdir -p "$OUT"

for pattern in $PATTERNS; do
    run="$OUT/$NAME-$pattern"
    echo "=== $pattern: $run ($(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))"
    python -m groundthink train --config configs/tinyshakespeare-char.toml --data "$DATA" --out "$run" \
        --set train.num_threads="$THREADS" --set model.layer_pattern="\"$pattern\"" "${budget[@]}" 2>&1 \
        | tee "$run.log"
    python -m groundthink eval "$run" --data "$DATA" --json | tee "$run.eval.json"
done
