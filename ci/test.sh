#!/usr/bin/env bash
# The test suite: a virtual environment .venv with the package (editable) and its test extras,
# a second one, .venv-chainer, with real Chainer 7.8.1 and gpuserial beside it (the peer the
# tests load our files into and drive through our serializers), then pytest. Each environment
# is made once and rebuilt only when pyproject.toml changes, so later runs work offline.
# Before the tests, ruff (lint) and mypy (the type hints the package ships, with py.typed) must
# pass.
# The Chainer tests are required here: a missing Chainer environment fails the run. Benchmarks
# run tiny, with timing disabled. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/env.sh

install_test_env() {
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
}
install_chainer_env() {
  .venv-chainer/bin/python -m pip install -q 'setuptools<70' wheel
  .venv-chainer/bin/python -m pip install -q --no-build-isolation 'chainer==7.8.1' 'numpy<2' h5py
  .venv-chainer/bin/python -m pip install -q --no-build-isolation -e .
}
ensure_venv .venv "$(project_stamp test)" install_test_env
ensure_venv .venv-chainer "$(project_stamp chainer 7.8.1)" install_chainer_env

.venv/bin/python -m ruff check gpuserial tests benchmarks ci
.venv/bin/python -m mypy gpuserial

export GPUSERIAL_CHAINER_PYTHON="$PWD/.venv-chainer/bin/python"
export GPUSERIAL_REQUIRE_CHAINER=1
export GPUSERIAL_REQUIRE_EXTRAS=1  # the test extras are installed here: none of their tests skips
exec .venv/bin/python -m pytest "$@"
