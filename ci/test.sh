#!/usr/bin/env bash
# The test suite, set up from nothing: a fresh virtual environment with the package and its test
# extras, a second one with real Chainer 7.8.1 (the compatibility peer the tests load our files
# into), then pytest (benchmarks run tiny, with timing disabled). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
if ! .venv-chainer/bin/python -c "import chainer, h5py" 2>/dev/null; then
  rm -rf .venv-chainer
  python3 -m venv .venv-chainer
  .venv-chainer/bin/python -m pip install -q 'setuptools<70' wheel
  .venv-chainer/bin/python -m pip install -q --no-build-isolation 'chainer==7.8.1' 'numpy<2' h5py
fi
export GPUSERIAL_CHAINER_PYTHON="$PWD/.venv-chainer/bin/python"
exec .venv/bin/python -m pytest "$@"
