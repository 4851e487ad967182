#!/usr/bin/env bash
set -u
BASE=$1; NEW=$2; PY=$3
for pair in 1 2; do
  for side in base new; do
    tree=$BASE; [[ $side == new ]] && tree=$NEW
    echo "=== 10000x4KiB npz pair $pair $side"
    (cd "$tree" && PYTHONPATH="$tree" "$PY" benchmarks/small_entries.py --models 10000x4KiB --pairs npz --rounds 7)
  done
done
