# Sourced by ci/test.sh and ci/demo.sh: virtual environments made once and reused.
#
# ensure_venv DIR STAMP INSTALL...: DIR is (re)made and INSTALL run in it only when DIR/.stamp
# differs from STAMP (what the environment was built from) or its python is missing; a complete
# environment is reused as it is, so that a second run needs no network. VENV_OPTIONS go to
# `python3 -m venv` (the tests use --without-pip); VENV_PYTHON names another interpreter.
ensure_venv() {
  local dir=$1 stamp=$2; shift 2
  if [[ -x $dir/bin/python && -f $dir/.stamp && "$(cat "$dir/.stamp")" == "$stamp" ]]; then
    return 0
  fi
  rm -rf "$dir"
  "${VENV_PYTHON:-python3}" -m venv ${VENV_OPTIONS:-} "$dir"
  "$@"
  echo "$stamp" > "$dir/.stamp"
}

# What an environment with this checkout installed is built from: pyproject.toml and python.
project_stamp() {
  { python3 --version; sha256sum pyproject.toml; echo "$*"; } | sha256sum | cut -d' ' -f1
}
