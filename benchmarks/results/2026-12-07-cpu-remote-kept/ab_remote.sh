#!/usr/bin/env bash
# A/B of remote loads from the modelled store (20 ms a request, 90 MB/s a connection):
# BASE tree against NEW tree, in alternating fresh processes.
set -u
BASE=$1; NEW=$2; PY=$3; OUTDIR=$4
for model in 10000x4KiB resnet50+adam; do
  for pair in 1 2 3; do
    for side in base new; do
      tree=$BASE; [[ $side == new ]] && tree=$NEW
      echo "=== $model pair $pair $side ($(cd $tree && git rev-parse --short HEAD))"
      (cd "$tree" && PYTHONPATH="$tree" "$PY" -c "import gpuserial,sys; print(gpuserial.__file__)" && \
       PYTHONPATH="$tree" "$PY" -m benchmarks.remote --modelled 20 90 --model "$model" --rounds 3 | tail -6)
    done
  done
done
