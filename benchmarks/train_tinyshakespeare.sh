#!/usr/bin/env bash
# TinyShakespeare character-level benchmark: the GroundThink GSGS preset, then the
# same config as a Transformer (AAAA), each for its 15-minute wall-clock budget,
# then `groundthink eval` on the whole validation split (last 10% of the file).
#
#   . .venv/bin/activate && nohup benchmarks/train_tinyshakespeare.sh > runs/bench-tinyshakespeare.log 2>&1 &
#
# THREADS (default 2) sets torch's CPU threads; OUT (default runs) the parent folder.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=../shared/data/tinyshakespeare.txt
OUT=${OUT:-runs}
THREADS=${THREADS:-2}
mkdir -p "$OUT"

for pattern in GSGS AAAA; do
    run="$OUT/bench-tinyshakespeare-$pattern"
    echo "=== $pattern: $run ($(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))"
    python -m groundthink train --config configs/tinyshakespeare-char.toml --data "$DATA" --out "$run" \
        --set train.num_threads="$THREADS" --set model.layer_pattern="\"$pattern\"" 2>&1 | tee "$run.log"
    python -m groundthink eval "$run" --data "$DATA" --json | tee "$run.eval.json"
done
