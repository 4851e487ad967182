"""README.md tells the truth: its two commands, its Python examples and its CLI transcripts.

- Every ```python block runs, in order, in one namespace, in an empty directory (``tmp_path``),
  as a reader following along would run them.
- Every ```console block is a transcript: each ``$ gpuserial ...`` line is run again (in a
  directory holding a copy of ``tests/data/chainer``) and must print exactly what follows it.
- The ```text block of the demo has the demo's current layout.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import shlex
import shutil

import pytest

from gpuserial.tools import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text()
BLOCK = re.compile(r'^```(\w*)\n(.*?)^```$', re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block tagged ``language``."""
    return [(README[:m.start()].count('\n') + 1, m.group(2)) for m in BLOCK.finditer(README)
            if m.group(1) == language]


def section(title: str) -> str:
    start = README.index(f'\n## {title}\n')
    end = README.find('\n## ', start + 1)
    return README[start:end if end >= 0 else None]


def test_quick_start_gives_exactly_two_commands():
    text = section('Quick start: two commands')
    assert README.index(text) < len(README) // 10  # near the top
    (code,) = BLOCK.findall(text)
    assert code[0] == 'sh'
    commands = [line.split('#')[0].strip() for line in code[1].splitlines()]
    assert commands == ['bash ci/demo.sh', 'bash ci/test.sh']
    for script in ('ci/demo.sh', 'ci/test.sh'):
        assert (ROOT / script).is_file()
    assert 'gpuserial demo' in (ROOT / 'ci' / 'demo.sh').read_text()
    assert 'pytest' in (ROOT / 'ci' / 'test.sh').read_text()


def test_python_blocks_run_in_order(tmp_path, monkeypatch):
    pytest.importorskip('torch')  # one block needs it: a test extra, not in ci/test-oldest.sh
    found = blocks('python')
    assert len(found) >= 7
    monkeypatch.chdir(tmp_path)
    namespace: dict = {'__name__': '__readme__'}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for line, code in found:
            exec(compile(code, f'README.md, the python block at line {line}', 'exec'), namespace)
    out = printed.getvalue().splitlines()
    assert "['layer/W', 'step']" in out
    assert 'steps 7' in out
    assert "['l1/W', 'l1/b', 'l2/W', 'l2/b']" in out
    assert '<Device @numpy> <Device @numpy>' in out
    assert "'my.model', key 'l3/W': not in the file" in out
    assert "['embedding', 'model/W', 'model/step']" in out
    assert 'memory://run/snapshot_iter_200' in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'ckpt.npz', 'my.h5', 'my.model', 'my.state', 'result', 'sharded', 'sharded.npz',
        'state.npz']


def transcripts() -> list[tuple[int, str, list[str]]]:
    """(line, command, expected output lines) of each ``$ `` command in console blocks."""
    found = []
    for line, code in blocks('console'):
        for offset, text in enumerate(code.splitlines()):
            if text.startswith('$ '):
                found.append((line + 1 + offset, text[2:], []))
            else:
                found[-1][2].append(text)
    return found


TRANSCRIPTS = transcripts()


def test_console_blocks_cover_each_command():
    assert len(TRANSCRIPTS) >= 6
    used = {shlex.split(command)[1] for _, command, _ in TRANSCRIPTS}
    assert {'inspect', 'diff', 'convert'} <= used


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> pathlib.Path:
    """A directory like the repository root, with a copy of the Chainer reference files."""
    root = tmp_path_factory.mktemp('readme')
    shutil.copytree(ROOT / 'tests' / 'data' / 'chainer', root / 'tests' / 'data' / 'chainer')
    return root


@pytest.mark.parametrize(('line', 'command', 'expected'), TRANSCRIPTS,
                         ids=[f'line{line}' for line, _, _ in TRANSCRIPTS])
def test_console_transcript(workdir, monkeypatch, capsys, line, command, expected):
    """Each transcript, rerun: the same output (stdout and stderr, in order), line by line."""
    monkeypatch.chdir(workdir)
    words = shlex.split(command)
    assert words[0] == 'gpuserial'
    status = cli.main(words[1:])
    out, err = capsys.readouterr()
    assert (out + err).splitlines() == expected
    if words[1] == 'diff':
        assert status == (0 if expected[-1].startswith('equal') else 1)
    else:
        assert status == (2 if err else 0)


def test_demo_block_has_the_demo_layout(capsys):
    (text,) = [code for _, code in blocks('text') if code.startswith('gpuserial demo:')]
    assert cli.main(['demo', '--size', '1MiB', '--device', 'cpu']) == 0
    out = capsys.readouterr().out.splitlines()
    shown = text.splitlines()
    assert len(shown) == len(out)
    for mine, real in zip(shown, out, strict=True):
        if real.startswith(('NPZ ', 'HDF5 ')):  # timings differ; the row's shape does not
            assert mine.split()[:2] == real.split()[:2]
            assert mine.split()[-2:] == real.split()[-2:]
        elif real.startswith(('gpuserial demo:', 'files in ')):
            assert mine.split()[:2] == real.split()[:2]
        else:
            assert mine == real


def test_links_and_paths_exist():
    for target in re.findall(r'\]\(([^)#]+)\)', README):
        assert (ROOT / target).exists(), target
    for path in ('tests/data/chainer', 'tests/test_readme.py', 'BENCHMARKS.md',
                 'benchmarks/compare.py', 'ci/gpu.sh'):
        assert path in README
        assert (ROOT / path).exists(), path
    assert '`py.typed` marker' in README and (ROOT / 'gpuserial' / 'py.typed').is_file()
