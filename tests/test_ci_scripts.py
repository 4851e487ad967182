"""The scripts in ci/: environments made once and rebuilt only when pyproject.toml changes, and
the mutation script's list of equivalent mutants."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _bash(script: str, cwd) -> str:
    result = subprocess.run(['bash', '-c', f'set -euo pipefail; source {ROOT}/ci/env.sh; '
                             + script], cwd=cwd, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, VENV_OPTIONS='--without-pip'))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_an_environment_is_built_once_then_reused(tmp_path):
    log = tmp_path / 'installs'
    install = f'install() {{ echo "$1" >> {log}; }}'
    _bash(f'{install}; ensure_venv env one install first; ensure_venv env one install again',
          tmp_path)
    assert log.read_text() == 'first\n'
    marker = tmp_path / 'env' / 'kept'
    marker.write_text('')
    _bash(f'{install}; ensure_venv env two install changed', tmp_path)  # a new stamp
    assert log.read_text() == 'first\nchanged\n' and not marker.exists()


def test_a_failed_install_is_not_taken_for_a_complete_environment(tmp_path):
    failing = subprocess.run(['bash', '-c', f'source {ROOT}/ci/env.sh; fail() {{ return 1; }}; '
                              'set -e; ensure_venv env one fail'], cwd=tmp_path,
                             capture_output=True, text=True,
                             env=dict(os.environ, VENV_OPTIONS='--without-pip'))
    assert failing.returncode != 0
    assert not (tmp_path / 'env' / '.stamp').exists()


def test_the_stamp_follows_pyproject(tmp_path):
    (tmp_path / 'pyproject.toml').write_text('a')
    first = _bash('project_stamp test', tmp_path)
    assert _bash('project_stamp test', tmp_path) == first
    assert _bash('project_stamp chainer', tmp_path) != first
    (tmp_path / 'pyproject.toml').write_text('b')
    assert _bash('project_stamp test', tmp_path) != first


def test_every_listed_equivalent_mutant_is_one_the_script_makes():
    """ci/mutants-equivalent.txt names mutants by file, line and column: an edit that moves
    the code must move the ids too, or the reviewed equivalents silently stop counting."""
    listed = subprocess.run([sys.executable, 'ci/mutate.py', '--list'], cwd=ROOT,
                            capture_output=True, text=True, check=True, timeout=120).stdout
    made = {line.split(': ')[0] for line in listed.splitlines() if ': ' in line}
    equivalents = [line.split(' ')[0] for line in
                   (ROOT / 'ci' / 'mutants-equivalent.txt').read_text().splitlines()
                   if line.strip() and not line.startswith('#')]
    assert equivalents and [i for i in equivalents if i not in made] == []


def test_equivalent_ids_follow_their_lines_and_changed_lines_are_reported(tmp_path):
    sys.path.insert(0, str(ROOT / 'ci'))
    try:
        import remap_equivalents
    finally:
        sys.path.remove(str(ROOT / 'ci'))
    old = ['a = 1', 'b = 2', 'c = 3', 'd = 4']
    new = ['import x', 'a = 1', 'b = 2', 'c = 30', 'd = 4']
    assert remap_equivalents.line_map(old, new) == {1: 2, 2: 3, 4: 5}


def test_lines_choose_the_mutants_that_start_on_them():
    cache = 1 + (ROOT / 'gpuserial' / 'serializer.py').read_text().splitlines().index(
        '@functools.lru_cache(maxsize=1 << 16)  # the same keys come back save after save')
    listed = subprocess.run([sys.executable, 'ci/mutate.py', '--list', '--lines',
                             'gpuserial/formats/_npy.py:30-40', f'gpuserial/serializer.py:{cache}'],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    ids = [line.split(': ')[0] for line in listed.splitlines() if ': ' in line]
    assert ids and all(
        (module == 'gpuserial/formats/_npy.py' and 30 <= int(line) <= 40)
        or (module == 'gpuserial/serializer.py' and line == str(cache))
        for module, line in (i.split(':')[:2] for i in ids))
    assert {i.split(':')[0] for i in ids} == {'gpuserial/formats/_npy.py',
                                              'gpuserial/serializer.py'}
    refused = subprocess.run([sys.executable, 'ci/mutate.py', '--list', '--lines', 'x.py:1-2'],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "got 'x.py:1-2'" in refused.stderr


def _mutate_module():
    sys.path.insert(0, str(ROOT / 'ci'))
    try:
        import mutate
    finally:
        sys.path.remove(str(ROOT / 'ci'))
    return mutate


def test_the_mutants_copy_holds_what_the_tests_read():
    """Tests that fail in the copy with no mutant (a file they read left out of it) would count
    every mutant as killed: access.py's tests (test_readme among them) pass in the copy, and the
    script refuses a copy where they fail."""
    mutate = _mutate_module()
    directory = mutate._copy_checkout()
    try:
        mutate.check_baseline(directory, ['gpuserial/access.py'], 300)
        (directory / 'README.md').unlink()
        with pytest.raises(SystemExit, match='(?s)fail in the copy .* with no mutant.*README.md'):
            mutate.check_baseline(directory, ['gpuserial/access.py'], 300)
    finally:
        shutil.rmtree(directory)
