#!/usr/bin/env bash
# The test suite, set up from nothing: a fresh virtual environment, the package with its test
# extras, then pytest (benchmarks run tiny, with timing disabled). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
