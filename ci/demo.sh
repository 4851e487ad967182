#!/usr/bin/env bash
# The main job: a virtual environment .venv with the package (made once, rebuilt only when
# pyproject.toml changes, so later runs work offline), then the demo: a model saved and loaded
# in NPZ and HDF5 on the GPU if one is usable, else on the CPU. Arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/env.sh

install_demo_env() {
  .venv/bin/python -m pip install -q -e .
}
# The test environment (ci/test.sh) has the package too: the demo reuses it as it is.
if ! { [[ -x .venv/bin/gpuserial ]] && [[ -f .venv/.stamp ]] \
       && [[ "$(cat .venv/.stamp)" == "$(project_stamp test)" ]]; }; then
  ensure_venv .venv "$(project_stamp demo)" install_demo_env
fi
exec .venv/bin/gpuserial demo "$@"
