#!/usr/bin/env bash
# The test suite on the oldest versions gpuserial supports: Python 3.10 with the dependencies
# pinned in ci/oldest.txt, in its own environment .venv-oldest (made once, rebuilt when
# pyproject.toml or ci/oldest.txt changes). The optional libraries the main suite also drives
# (torch, JAX, CuPy, moto, MPI, real Chainer) are left out: their tests skip here and run in
# ci/test.sh. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/env.sh

find_python() {  # OLDEST_PYTHON, else python3.10 or pyenv's 3.10 (its shim may not be active)
  local candidate candidates=(python3.10
    "$(pyenv root 2> /dev/null || echo ~/.pyenv)"/versions/3.10*/bin/python3.10)
  [[ -n ${OLDEST_PYTHON:-} ]] && candidates=("$OLDEST_PYTHON")
  for candidate in "${candidates[@]}"; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2> /dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "ci/test-oldest.sh: no Python 3.10 found (tried: ${candidates[*]}; set OLDEST_PYTHON)" >&2
  return 1
}
PYTHON=$(find_python)
install_oldest_env() {
  .venv-oldest/bin/python -m pip install -q --upgrade pip
  .venv-oldest/bin/python -m pip install -q -c ci/oldest.txt -e '.[remote]' pytest \
    pytest-benchmark hypothesis
}
VENV_PYTHON=$PYTHON ensure_venv .venv-oldest \
  "$(project_stamp oldest "$("$PYTHON" --version)" "$(sha256sum ci/oldest.txt)")" \
  install_oldest_env
.venv-oldest/bin/python - <<'PY'
import importlib.metadata as metadata, sys
pins = dict(line.strip().split('==') for line in open('ci/oldest.txt')
            if line.strip() and not line.startswith('#'))
wrong = {name: metadata.version(name) for name in pins if metadata.version(name) != pins[name]}
print(f'oldest versions: Python {sys.version.split()[0]},',
      ', '.join(f'{name} {metadata.version(name)}' for name in pins))
sys.exit(f'not the pinned versions: {wrong}' if wrong else 0)
PY
exec .venv-oldest/bin/python -m pytest "$@"
