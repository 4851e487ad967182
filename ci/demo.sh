#!/usr/bin/env bash
# The main job, set up from nothing: a fresh virtual environment, the package, then the demo
# (a model saved and loaded in NPZ and HDF5 on the GPU if one is usable, else on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -e .
exec .venv/bin/gpuserial demo "$@"
