#!/usr/bin/env bash
# Here, where pip reaches PyPI: the wheels that the lent GPU machine lacks (Python 3.12 there,
# x86-64, no network), into .whl/ (ignored by git), for ci/gpu.sh to install there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl isal
ls -l .whl
