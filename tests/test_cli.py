"""The ``gpuserial`` command line, driven through its entry points on real files.

Most tests call :func:`gpuserial.tools.cli.main` and capture its output; a few run ``python -m
gpuserial`` in a subprocess, which is what the console script runs too. Files come from
``tests/data/chainer`` (written by real Chainer 7.8.1 and by ``numpy.savez``) or are made in
``tmp_path``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import tracemalloc
import warnings
import zipfile

import h5py
import numpy
import pytest

import gpuserial
from gpuserial import serializers
from gpuserial.engine import devices
from gpuserial.tools import cli
from tests import crafting
from tests.conftest import CHAINER_PYTHON

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHAINER = ROOT / 'tests' / 'data' / 'chainer'
EXPECTED = json.loads((CHAINER / 'expected.json').read_text())
REFERENCE_FILES = sorted(EXPECTED)
COMMANDS = ['demo', 'inspect', 'convert', 'diff', 'bench', 'clean']


def run(capsys, *args: str) -> tuple[int, str, str]:
    """``gpuserial ARGS`` in this process: (exit status, stdout, stderr)."""
    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def run_module(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """``python -m gpuserial ARGS`` in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, '-m', 'gpuserial', *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(status: int, out: str, err: str, *needles: str) -> None:
    assert status == 2
    assert out == ''
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith('gpuserial: error: ')
    assert 'Traceback' not in err
    for needle in needles:
        assert needle in lines[0]


def npz_values(path) -> dict:
    """{key: array} of an NPZ file, with None for a stored None (found by its header)."""
    with numpy.load(path, allow_pickle=False) as f:
        return {key: None if _is_none_member(f, key) else f[key] for key in f.files}


def _is_none_member(npz, key: str) -> bool:
    return npz.zip.read(key + '.npy')[10:].lstrip().startswith(b"{'descr': '|O'")


def h5_values(path) -> dict:
    values = {}
    with h5py.File(path, 'r') as f:
        f.visititems(lambda name, node: values.__setitem__(
            name, None if node.shape is None else node[()])
            if isinstance(node, h5py.Dataset) else None)
    return values


def assert_same_values(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        if value is None or b[key] is None:
            assert value is None and b[key] is None, key
            continue
        assert numpy.asarray(value).dtype == numpy.asarray(b[key]).dtype, key
        numpy.testing.assert_array_equal(value, b[key], err_msg=key, strict=True)


# ---------------------------------------------------------------------------------------------
# Entry points and help


def test_module_entry_point_help(tmp_path):
    result = run_module('--help', cwd=tmp_path)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize('command', COMMANDS)
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, '--help'])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f'usage: gpuserial {command}')
    assert '--verbose' in out


def test_version(capsys):
    """gpuserial --version was a usage error: 'the following arguments are required'."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['--version'])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f'gpuserial {gpuserial.__version__}\n'


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert 'required: COMMAND' in capsys.readouterr().err


def test_console_script_is_declared():
    text = (ROOT / 'pyproject.toml').read_text()
    assert 'gpuserial = "gpuserial.tools.cli:main"' in text


# ---------------------------------------------------------------------------------------------
# inspect


@pytest.mark.parametrize('name', REFERENCE_FILES)
def test_inspect_json_lists_every_key(capsys, name):
    status, out, err = run(capsys, 'inspect', '--json', CHAINER / name)
    assert (status, err) == (0, '')
    document = json.loads(out)
    expected = EXPECTED[name]
    assert document['format'] == ('npz' if name.endswith('.npz') else 'hdf5')
    assert document['file_size'] == (CHAINER / name).stat().st_size
    entries = {e['key']: e for e in document['entries']}
    assert sorted(entries) == sorted(expected)
    for key, want in expected.items():
        entry = entries[key]
        assert (entry['kind'] == 'none') == want['is_none'], key
        if not want['is_none']:
            assert entry['shape'] == want['shape'], key
            assert entry['dtype'] == want['dtype'], key
            assert entry['nbytes'] == (numpy.prod(want['shape'], dtype=int)
                                       * numpy.dtype(want['dtype']).itemsize), key
        if 'zip_compress_type' in want:
            assert entry['compression'] == {8: 'deflate', 0: 'stored'}[want['zip_compress_type']]
        if want.get('h5_compression'):
            assert entry['compression'] == f"gzip:{want['h5_compression_opts']}"
    totals = document['totals']
    assert totals['entries'] == len(expected)
    assert totals['none'] == sum(w['is_none'] for w in expected.values())
    assert totals['nbytes'] == sum(e['nbytes'] for e in document['entries'])


@pytest.mark.parametrize('name', ['uninit.npz', 'uninit.h5'])
def test_inspect_shows_none_entries(capsys, name):
    status, out, _ = run(capsys, 'inspect', CHAINER / name)
    assert status == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:-1]}
    assert rows['W'][1] == 'None'
    assert rows['b'][1:3] == ['(2,)', 'float32']
    assert out.splitlines()[-1].startswith('total: 2 entries (1 None), 8 B raw')


def test_inspect_shows_a_tree(capsys):
    status, out, _ = run(capsys, 'inspect', CHAINER / 'chain.npz')
    assert status == 0
    labels = [line.split()[0] for line in out.splitlines()[2:-1]]
    assert labels == ['predictor/', 'l1/', 'W', 'b', 'l2/', 'W', 'b']
    assert '    W  ' in out  # two levels deep


def test_inspect_stored_and_compressed_sizes(capsys, tmp_path):
    zeros = {'z': numpy.zeros((256, 256), numpy.float32)}
    serializers.save_npz(tmp_path / 'c.npz', zeros, compression=True)
    serializers.save_npz(tmp_path / 'u.npz', zeros, compression=False)
    serializers.save_hdf5(tmp_path / 'c.h5', zeros, compression=9)
    sizes = {}
    for name in ('c.npz', 'u.npz', 'c.h5'):
        (entry,) = json.loads(run(capsys, 'inspect', '--json', tmp_path / name)[1])['entries']
        assert entry['nbytes'] == 256 * 256 * 4
        sizes[name] = (entry['stored_bytes'], entry['compression'])
    assert sizes['c.npz'][1] == 'deflate' and sizes['c.npz'][0] < 4096
    assert sizes['u.npz'] == (256 * 256 * 4 + 128, 'stored')  # with its 128-byte header
    assert sizes['c.h5'][1] == 'gzip:9' and sizes['c.h5'][0] < 4096
    out = run(capsys, 'inspect', tmp_path / 'c.npz')[1]
    assert out.splitlines()[-1].endswith('% of raw')



@pytest.mark.parametrize(('raw', 'ratio'), [(64 << 10, ', 100% of raw'), ((64 << 10) - 1, '')])
def test_inspect_shows_the_share_of_raw_from_64_kib(capsys, tmp_path, raw, ratio):
    """Below 64 KiB of raw data the .npy headers dominate and the ratio would say nothing."""
    serializers.save_npz(tmp_path / 'a.npz', {'b': numpy.zeros(raw, numpy.uint8)},
                         compression=False)
    status, out, _ = run(capsys, 'inspect', tmp_path / 'a.npz')
    assert status == 0
    assert out.splitlines()[-1] == (f'total: 1 entries (0 None), {cli.format_bytes(raw)} raw, '
                                    f'{cli.format_bytes(raw + 128)} stored{ratio}')

def test_inspect_never_unpickles(capsys, tmp_path):
    """An object array holding a pickle that would run code is listed, not executed."""
    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), 'w'))

    path = tmp_path / 'evil.npz'
    numpy.savez(path, weights=numpy.ones(3, numpy.float32),
                evil=numpy.array([Payload()], dtype=object))
    assert not marker.exists()  # pickling the payload does not run it
    status, out, err = run(capsys, 'inspect', '--json', path)
    assert (status, err) == (0, '')
    kinds = {e['key']: e['kind'] for e in json.loads(out)['entries']}
    assert kinds == {'weights': 'array', 'evil': 'object'}
    assert 'pickled: refused' in run(capsys, 'inspect', path)[1]
    assert not marker.exists()
    status, out, err = run(capsys, 'diff', path, path)
    assert_one_line_error(status, out, err, 'evil', 'never unpickles')
    assert not marker.exists()
    with numpy.load(path, allow_pickle=True) as f:  # the payload is real: unpickling runs it
        crafting.close_unpickled(f['evil'])
    assert marker.exists()


def test_inspect_reads_no_data(capsys, tmp_path):
    """Inspecting a 64 MiB file allocates far less than its data (headers only)."""
    path = tmp_path / 'big.npz'
    serializers.save_npz(path, {f'w{i}': numpy.ones(4 << 20, numpy.float32) for i in range(4)},
                         compression=True)
    tracemalloc.start()
    try:
        status, out, _ = run(capsys, 'inspect', path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 0
    assert 'total: 4 entries (0 None), 64.0 MiB raw' in out
    assert peak < 1 << 20


def test_inspect_non_npy_zip_members(capsys, tmp_path):
    path = tmp_path / 'mixed.npz'
    numpy.savez(path, a=numpy.arange(3))
    with zipfile.ZipFile(path, 'a') as archive:
        archive.writestr('notes.txt', 'hello')
    entries = json.loads(run(capsys, 'inspect', '--json', path)[1])['entries']
    assert [(e['key'], e['kind']) for e in entries] == [('a', 'array'), ('notes.txt', 'other')]


# ---------------------------------------------------------------------------------------------
# diff


@pytest.mark.parametrize('name', REFERENCE_FILES)
def test_diff_of_a_file_with_itself_is_equal(capsys, name):
    status, out, err = run(capsys, 'diff', CHAINER / name, CHAINER / name)
    assert (status, err) == (0, '')
    assert out.splitlines() == [out.splitlines()[-1]]
    assert out.startswith(f'equal: {len(EXPECTED[name])} common keys')


@pytest.mark.parametrize('stem', ['linear', 'chain', 'bn', 'uninit', 'adam', 'momentum_sgd',
                                  'adam_model'])
def test_diff_across_formats_is_equal(capsys, stem):
    status, out, _ = run(capsys, 'diff', CHAINER / f'{stem}.npz', CHAINER / f'{stem}.h5')
    assert status == 0, out


def test_diff_of_two_checkpoints_names_the_keys(capsys):
    a, b = CHAINER / 'momentum_sgd_model.npz', CHAINER / 'adam_model.h5'
    status, out, err = run(capsys, 'diff', a, b)
    assert (status, err) == (1, '')
    lines = out.splitlines()
    for key in EXPECTED['adam_model.npz']:
        assert any(line.startswith(f'values differ: {key} ') for line in lines), key
    assert lines[-1].startswith('different: 4 common keys (0 equal, 4 differ)')


def test_diff_of_model_and_optimizer_lists_keys_only_in_each(capsys):
    status, out, _ = run(capsys, 'diff', CHAINER / 'chain.npz', CHAINER / 'adam.npz')
    assert status == 1
    lines = out.splitlines()
    only_a = [line.rsplit(': ', 1)[1] for line in lines if line.startswith('only in ')
              and 'chain.npz' in line]
    only_b = [line.rsplit(': ', 1)[1] for line in lines if line.startswith('only in ')
              and 'adam.npz' in line]
    assert sorted(only_a) == sorted(EXPECTED['chain.npz'])
    assert sorted(only_b) == sorted(EXPECTED['adam.npz'])
    assert '0 common keys' in lines[-1]


def test_diff_shape_dtype_none_and_values(capsys, tmp_path):
    a = {'same': numpy.arange(4.0), 'shape': numpy.zeros((2, 3)), 'dtype': numpy.ones(3),
         'none': numpy.zeros(2), 'values': numpy.array([1.0, 2.0, 4.0]),
         'nan': numpy.array([numpy.nan, 1.0]), 'big': numpy.array([2 ** 62], numpy.int64),
         'text': numpy.array('abc')}
    b = dict(a, shape=numpy.zeros((3, 2)), dtype=numpy.ones(3, numpy.float32), none=None,
             values=numpy.array([1.0, 2.5, 2.0]), big=numpy.array([2 ** 62 + 1], numpy.int64),
             text='abd')  # an HDF5 string
    serializers.save_npz(tmp_path / 'a.npz', a)
    serializers.save_hdf5(tmp_path / 'b.h5', b)
    status, out, _ = run(capsys, 'diff', tmp_path / 'a.npz', tmp_path / 'b.h5')
    assert status == 1
    lines = out.splitlines()
    assert 'shape differs: shape: (2, 3) float64 -> (3, 2) float64' in lines
    assert 'none differs: none: (2,) float64 -> None' in lines
    assert ('dtype differs: dtype: (3,) float64 -> (3,) float32; 0 element(s) differ, max abs '
            'diff 0, max rel diff 0') in lines
    assert ('values differ: values (3,) float64: 2 element(s) differ, max abs diff 2, max rel '
            'diff 1') in lines
    assert any(line.startswith('values differ: big (1,) int64: 1 element(s)') for line in lines)
    assert 'values differ: text () str: values differ' in lines
    assert not any(' same' in line or ' nan' in line for line in lines)  # NaN equals NaN
    assert lines[-1].startswith('different: 8 common keys (2 equal, 6 differ)')



@pytest.mark.parametrize('dtype', ['float64', 'int32'])
def test_diff_relative_differences_where_values_are_zero_or_one_apart(capsys, tmp_path, dtype):
    """An element that is 0 in both files is no difference at all (not 0/0); one 1 apart has
    its own relative difference, like any other."""
    serializers.save_npz(tmp_path / 'a.npz', {'w': numpy.array([0, 1, 3, 6], dtype)})
    serializers.save_npz(tmp_path / 'b.npz', {'w': numpy.array([0, 2, 3, 8], dtype)})
    status, out, _ = run(capsys, 'diff', tmp_path / 'a.npz', tmp_path / 'b.npz')
    assert status == 1
    assert out.splitlines()[0] == (f'values differ: w (4,) {dtype}: 2 element(s) differ, max '
                                   f'abs diff 2, max rel diff 0.5')

def test_bfloat16_and_float8_are_shown_and_compared_as_their_types(capsys, tmp_path):
    ml_dtypes = pytest.importorskip('ml_dtypes')
    a = {'w': numpy.array([[1.0, 1.0], [1.0, 2.0]], ml_dtypes.bfloat16),
         'f8': numpy.ones(4, ml_dtypes.float8_e5m2)}
    serializers.save_npz(tmp_path / 'a.npz', a)
    serializers.save_hdf5(tmp_path / 'b.h5', dict(a, w=a['w'] * 3))
    status, out, _ = run(capsys, 'inspect', tmp_path / 'a.npz')
    assert status == 0
    assert any(line.split()[:3] == ['w', '(2,', '2)'] and 'bfloat16' in line
               for line in out.splitlines())
    assert any(line.startswith('f8 ') and 'float8_e5m2' in line for line in out.splitlines())
    status, out, _ = run(capsys, 'diff', tmp_path / 'a.npz', tmp_path / 'b.h5')
    assert status == 1
    assert ('values differ: w (2, 2) bfloat16: 4 element(s) differ, max abs diff 4, max rel '
            'diff 0.666667') in out.splitlines()


def test_diff_tolerances(capsys, tmp_path):
    serializers.save_npz(tmp_path / 'a.npz', {'w': numpy.array([1.0, 100.0])})
    serializers.save_npz(tmp_path / 'b.npz', {'w': numpy.array([1.001, 100.1])})
    assert run(capsys, 'diff', tmp_path / 'a.npz', tmp_path / 'b.npz')[0] == 1
    assert run(capsys, 'diff', '--atol', '0.2', tmp_path / 'a.npz', tmp_path / 'b.npz')[0] == 0
    assert run(capsys, 'diff', '--rtol', '1e-2', tmp_path / 'a.npz', tmp_path / 'b.npz')[0] == 0
    status, out, _ = run(capsys, 'diff', '--atol', '0.01', tmp_path / 'a.npz',
                         tmp_path / 'b.npz')
    assert status == 1 and '1 element(s) differ' in out


@pytest.mark.parametrize(('options', 'said'), [
    ([], ''), (['--atol', '0.2'], '; equal means within rtol=0, atol=0.2'),
    (['--rtol', '1e-2'], '; equal means within rtol=0.01, atol=0'),
    (['--rtol', '1e-2', '--atol', '0.5'], '; equal means within rtol=0.01, atol=0.5')])
def test_diff_summary_names_the_tolerances_given(capsys, tmp_path, options, said):
    serializers.save_npz(tmp_path / 'a.npz', {'w': numpy.array([1.0, 100.0])})
    serializers.save_npz(tmp_path / 'b.npz', {'w': numpy.array([1.0, 100.1])})
    status, out, _ = run(capsys, 'diff', *options, tmp_path / 'a.npz', tmp_path / 'b.npz')
    summary = out.splitlines()[-1]
    assert summary.endswith(f'0 only in {tmp_path / "b.npz"}{said}')
    assert summary.startswith('equal: ' if options else 'different: ')
    assert status == (0 if options else 1)


def test_diff_through_the_module_entry_point(tmp_path):
    same = run_module('diff', CHAINER / 'chain.npz', CHAINER / 'chain.h5', cwd=tmp_path)
    different = run_module('diff', CHAINER / 'adam.npz', CHAINER / 'momentum_sgd.npz',
                           cwd=tmp_path)
    assert (same.returncode, different.returncode) == (0, 1)
    assert 'only in' in different.stdout and 'l1/W/m' in different.stdout


# ---------------------------------------------------------------------------------------------
# convert


@pytest.mark.parametrize('name', [n for n in REFERENCE_FILES if n.endswith('.npz')])
def test_convert_there_and_back_keeps_every_value(capsys, tmp_path, name):
    h5, back = tmp_path / 'there.h5', tmp_path / 'back.npz'
    status, out, err = run(capsys, 'convert', CHAINER / name, h5)
    assert (status, err) == (0, '')
    assert f'{len(EXPECTED[name])} entries' in out and 'HDF5 (gzip 4)' in out
    assert run(capsys, 'convert', h5, back)[0] == 0
    original = npz_values(CHAINER / name)
    assert_same_values(original, h5_values(h5))
    assert_same_values(original, npz_values(back))
    nones = [key for key, value in original.items() if value is None]
    assert (name == 'uninit.npz') == bool(nones)
    with numpy.load(back, allow_pickle=True) as f:  # the None members are Chainer's
        for key in nones:
            assert f[key].shape == () and f[key][()] is None
    assert run(capsys, 'diff', CHAINER / name, back)[0] == 0


@pytest.mark.parametrize('name', [n for n in REFERENCE_FILES if n.endswith('.h5')])
def test_convert_chainer_hdf5_to_npz(capsys, tmp_path, name):
    assert run(capsys, 'convert', CHAINER / name, tmp_path / 'out.npz')[0] == 0
    assert_same_values(h5_values(CHAINER / name), npz_values(tmp_path / 'out.npz'))


@pytest.mark.parametrize(('option', 'compression'), [
    ('none', 'stored'), ('stored', 'stored'), ('deflate', 'deflate'), ('0', 'stored'),
    ('6', 'deflate')])
def test_convert_npz_compression(capsys, tmp_path, option, compression):
    dst = tmp_path / 'out.npz'
    status, out, _ = run(capsys, 'convert', CHAINER / 'chain.h5', dst, '--compression', option)
    assert status == 0
    assert out.endswith(f', NPZ ({compression})\n')
    entries = json.loads(run(capsys, 'inspect', '--json', dst)[1])['entries']
    assert {e['compression'] for e in entries} == {compression}
    with zipfile.ZipFile(dst) as archive:
        assert archive.testzip() is None


@pytest.mark.parametrize(('option', 'compression', 'said'), [
    (None, 'gzip:4', 'gzip 4'), ('none', 'none', 'uncompressed'),
    ('stored', 'none', 'uncompressed'), ('gzip', 'gzip:4', 'gzip 4'),
    ('default', 'gzip:4', 'gzip 4'), ('9', 'gzip:9', 'gzip 9')])
def test_convert_hdf5_compression(capsys, tmp_path, option, compression, said):
    dst = tmp_path / 'out.hdf5'
    extra = [] if option is None else ['--compression', option]
    status, out, _ = run(capsys, 'convert', CHAINER / 'chain.npz', dst, *extra)
    assert status == 0
    assert out.endswith(f', HDF5 ({said})\n')
    entries = json.loads(run(capsys, 'inspect', '--json', dst)[1])['entries']
    assert {e['compression'] for e in entries} == {compression}


def test_convert_format_option_and_unknown_extension(capsys, tmp_path):
    status, out, err = run(capsys, 'convert', CHAINER / 'bn.npz', tmp_path / 'bn.weights')
    assert_one_line_error(status, out, err, 'bn.weights', "'.weights'", '.npz, .h5 or .hdf5')
    assert not (tmp_path / 'bn.weights').exists()
    assert run(capsys, 'convert', CHAINER / 'bn.npz', tmp_path / 'bn.weights',
               '--format', 'hdf5')[0] == 0
    assert h5py.is_hdf5(tmp_path / 'bn.weights')
    assert run(capsys, 'convert', tmp_path / 'bn.weights', tmp_path / 'bn.model',
               '--format', 'npz')[0] == 0
    assert zipfile.is_zipfile(tmp_path / 'bn.model')
    with pytest.raises(SystemExit):
        cli.main(['convert', str(CHAINER / 'bn.npz'), str(tmp_path / 'x.npz'),
                  '--compression', 'lz4'])
    assert "unknown compression 'lz4'" in capsys.readouterr().err


def test_convert_to_a_directory_says_it_is_one(capsys, tmp_path):
    """It said the format could not be told from the extension ''."""
    status, out, err = run(capsys, 'convert', CHAINER / 'bn.npz', tmp_path)
    assert_one_line_error(status, out, err, f"cannot save to '{tmp_path}': it is a directory")


def test_convert_strings(capsys, tmp_path):
    serializers.save_hdf5(tmp_path / 'a.h5', {'name': 'adam', 'x': numpy.arange(6).reshape(2, 3)})
    assert run(capsys, 'convert', tmp_path / 'a.h5', tmp_path / 'b.npz')[0] == 0
    with numpy.load(tmp_path / 'b.npz') as f:
        assert f['name'].dtype.kind == 'U' and f['name'][()] == 'adam'
        numpy.testing.assert_array_equal(f['x'], numpy.arange(6).reshape(2, 3))
    numpy.savez(tmp_path / 'c.npz', names=numpy.array(['a', 'bc']), name=numpy.array('adam'))
    for source in ('b.npz', 'c.npz'):
        assert run(capsys, 'convert', tmp_path / source, tmp_path / 'd.h5')[0] == 0
        with h5py.File(tmp_path / 'd.h5') as f:
            assert f['name'].asstr()[()] == 'adam'
            if source == 'c.npz':
                assert list(f['names'].asstr()[()]) == ['a', 'bc']
        assert run(capsys, 'diff', tmp_path / source, tmp_path / 'd.h5')[0] == 0


def test_convert_of_hdf5_bytes_to_npz_keeps_them_without_a_warning(capsys, tmp_path):
    serializers.save_hdf5(tmp_path / 'a.h5', {'tags': numpy.array([b'x', b'yz'])})
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # numpy warns of dtype metadata it cannot store
        assert run(capsys, 'convert', tmp_path / 'a.h5', tmp_path / 'b.npz')[0] == 0
    with numpy.load(tmp_path / 'b.npz') as f:
        assert f['tags'].tolist() == [b'x', b'yz'] and f['tags'].dtype == numpy.dtype('S2')


def test_convert_keys_that_hdf5_cannot_hold(capsys, tmp_path):
    numpy.savez(tmp_path / 'clash.npz', **{'a': numpy.zeros(2), 'a/b': numpy.zeros(2)})
    status, out, err = run(capsys, 'convert', tmp_path / 'clash.npz', tmp_path / 'clash.h5')
    assert_one_line_error(status, out, err, "key 'a'", "a dataset (key 'a') where key 'a/b' "
                          "needs a group")
    assert not (tmp_path / 'clash.h5').exists()
    assert os.listdir(tmp_path) == ['clash.npz']  # no temporary file left behind


def test_convert_from_a_corrupt_file_leaves_the_target(capsys, tmp_path):
    data = bytearray((CHAINER / 'linear_uncompressed.npz').read_bytes())
    header_end = data.index(b'\n', data.index(b"'shape': (2,), }"))
    data[header_end + 2] ^= 0xFF  # a data byte of member 'b'
    (tmp_path / 'bad.npz').write_bytes(data)
    (tmp_path / 'out.h5').write_bytes(b'the old file')
    status, out, err = run(capsys, 'convert', tmp_path / 'bad.npz', tmp_path / 'out.h5')
    assert_one_line_error(status, out, err, 'bad.npz', 'CRC mismatch')
    assert (tmp_path / 'out.h5').read_bytes() == b'the old file'
    assert sorted(os.listdir(tmp_path)) == ['bad.npz', 'out.h5']


def test_convert_bounded_memory(capsys, tmp_path):
    """Memory is bounded by the largest entry, not by the file."""
    path = tmp_path / 'big.npz'
    serializers.save_npz(path, {f'w{i}': numpy.ones(2 << 20, numpy.float32) for i in range(8)},
                         compression=False)
    tracemalloc.start()
    try:
        status = cli.main(['convert', str(path), str(tmp_path / 'big.h5'), '--compression', '0'])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    capsys.readouterr()
    assert status == 0
    assert peak < 3 * (8 << 20)  # the file holds 64 MiB; one entry is 8 MiB


@pytest.mark.chainer
def test_converted_files_load_into_chainer(capsys, tmp_path):
    for name in REFERENCE_FILES:
        stem, extension = os.path.splitext(name)
        if name == 'numpy_plain.npz':
            continue
        other = '.h5' if extension == '.npz' else '.npz'
        if (CHAINER / (stem + other)).exists() or stem == 'trainer_snapshot':
            assert run(capsys, 'convert', CHAINER / name, tmp_path / (stem + other))[0] == 0
    result = subprocess.run([CHAINER_PYTHON, str(CHAINER / 'check_gpuserial_files.py'),
                             str(tmp_path), '--compare'], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert '__error__' not in result.stdout


# ---------------------------------------------------------------------------------------------
# Errors at the shell


@pytest.mark.parametrize('args', [['inspect', '{missing}'], ['diff', '{missing}', '{good}'],
                                  ['diff', '{good}', '{missing}'],
                                  ['convert', '{missing}', '{out}']])
def test_missing_file(capsys, tmp_path, args):
    names = {'missing': tmp_path / 'nope.npz', 'good': CHAINER / 'chain.npz',
             'out': tmp_path / 'out.h5'}
    status, out, err = run(capsys, *[a.format(**names) for a in args])
    assert_one_line_error(status, out, err, 'nope.npz', 'no such file')


def _corrupt_files(tmp_path) -> dict[str, pathlib.Path]:
    files = {}
    for name, size in (('chain.npz', 200), ('chain.h5', 3000)):
        files['truncated ' + name] = tmp_path / ('truncated-' + name)
        files['truncated ' + name].write_bytes((CHAINER / name).read_bytes()[:size])
    files['text'] = tmp_path / 'notes.npz'
    files['text'].write_text('not a checkpoint\n')
    files['empty'] = tmp_path / 'empty.h5'
    files['empty'].write_bytes(b'')
    header = bytearray((CHAINER / 'linear_uncompressed.npz').read_bytes())
    header[header.index(b"'descr'") + 10] = ord('?')  # '<f4' becomes '<?4'
    files['bad header'] = tmp_path / 'bad-header.npz'
    files['bad header'].write_bytes(header)
    return files


@pytest.mark.parametrize('kind', ['truncated chain.npz', 'truncated chain.h5', 'text', 'empty',
                                  'bad header'])
@pytest.mark.parametrize('command', ['inspect', 'diff', 'convert'])
def test_corrupt_file(capsys, tmp_path, kind, command):
    path = _corrupt_files(tmp_path)[kind]
    args = {'inspect': [path], 'diff': [path, CHAINER / 'chain.npz'],
            'convert': [path, tmp_path / 'out.npz']}[command]
    status, out, err = run(capsys, command, *args)
    assert_one_line_error(status, out, err, path.name)
    assert not (tmp_path / 'out.npz').exists()



@pytest.mark.parametrize(('content', 'start'), [(b'not a checkpoint\n', b'not a ch'),
                                                 (b'PK', b'PK'), (b'', b'')])
def test_a_file_that_is_neither_npz_nor_hdf5_is_named_with_its_first_bytes(capsys, tmp_path,
                                                                            content, start):
    (tmp_path / 'notes.npz').write_bytes(content)
    status, out, err = run(capsys, 'inspect', tmp_path / 'notes.npz')
    assert_one_line_error(status, out, err)
    assert err == (f"gpuserial: error: '{tmp_path / 'notes.npz'}': not an NPZ or HDF5 file (it "
                   f"starts with {start!r})\n")

def test_convert_into_a_missing_directory(capsys, tmp_path):
    status, out, err = run(capsys, 'convert', CHAINER / 'bn.npz', tmp_path / 'no' / 'bn.h5')
    assert_one_line_error(status, out, err, f"'{tmp_path / 'no' / 'bn.h5'}': no such directory")


def test_a_directory_is_not_a_file(capsys, tmp_path):
    status, out, err = run(capsys, 'inspect', tmp_path)
    assert_one_line_error(status, out, err)
    assert err == (f"gpuserial: error: '{tmp_path}': is a directory, not an NPZ or HDF5 file, "
                   f"nor a sharded checkpoint (no index.json in it)\n")


def test_verbose_shows_the_traceback(capsys, tmp_path):
    for args in (['-v', 'inspect', str(tmp_path / 'nope.h5')],
                 ['inspect', '-v', str(tmp_path / 'nope.h5')]):
        status, _, err = run(capsys, *args)
        assert status == 2
        assert err.startswith('Traceback (most recent call last):')
        assert err.splitlines()[-1] == f"gpuserial: error: '{tmp_path / 'nope.h5'}': no such file"


def test_errors_through_the_module_entry_point(tmp_path):
    (tmp_path / 'notes.txt').write_text('hello')
    for args, needle in ((['inspect', 'nope.npz'], "'nope.npz': no such file"),
                         (['inspect', 'notes.txt'], 'not an NPZ or HDF5 file'),
                         (['convert', CHAINER / 'bn.h5', 'bn.xyz'], "extension '.xyz'")):
        result = run_module(*args, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stdout == ''
        assert result.stderr.splitlines() == [result.stderr.strip()]
        assert result.stderr.startswith('gpuserial: error: ') and needle in result.stderr


def test_unexpected_errors_are_one_line_too(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError('something\nwent wrong')

    monkeypatch.setattr(cli, 'cmd_inspect', broken)
    monkeypatch.setattr(cli, 'build_parser', _parser_with(inspect=broken))
    status, out, err = run(capsys, 'inspect', 'x')
    assert_one_line_error(status, out, err, 'RuntimeError: something went wrong')


def _parser_with(**functions):
    build = cli.build_parser

    def build_parser():
        parser = build()
        for action in parser._subparsers._group_actions:
            for name, function in functions.items():
                action.choices[name].set_defaults(func=function)
        return parser

    return build_parser


def test_interrupt(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, 'build_parser', _parser_with(diff=interrupted))
    status, _, err = run(capsys, 'diff', 'a', 'b')
    assert (status, err) == (130, 'gpuserial: interrupted\n')


# ---------------------------------------------------------------------------------------------
# bench


def test_bench_json(capsys, tmp_path):
    status, out, err = run(capsys, 'bench', '--json', '--sizes', '4KiB', '--repeat', '1')
    assert status == 0
    document = json.loads(out)
    operations = {row['name'] for row in document['rows']}
    assert {'save_npz', 'load_npz', 'save_hdf5', 'load_hdf5'} <= operations
    assert {row['nbytes'] for row in document['rows']} == {4096}


def test_bench_table(capsys):
    status, out, err = run(capsys, 'bench', '--sizes', '4KiB,8KiB', '--repeat', '1')
    assert (status, err) == (0, '')
    assert 'GB/s' in out.splitlines()[1]
    assert '8 KiB' in out


def test_bench_plot_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib fails
    monkeypatch.setitem(sys.modules, 'matplotlib.pyplot', None)
    status, out, err = run(capsys, 'bench', '--plot', tmp_path / 'b.png', '--sizes', '4KiB')
    assert_one_line_error(status, out, err, 'matplotlib', 'pip install matplotlib')
    assert not (tmp_path / 'b.png').exists()


def test_bench_plot(capsys, tmp_path):
    pytest.importorskip('matplotlib')
    status, _, _ = run(capsys, 'bench', '--plot', tmp_path / 'b.png', '--sizes', '4KiB,8KiB',
                       '--repeat', '1')
    assert status == 0
    assert (tmp_path / 'b.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_bench_bad_size(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['bench', '--sizes', '4 parsecs'])
    assert exit_info.value.code == 2
    assert 'not a size' in capsys.readouterr().err


def test_output_helpers():
    assert [cli.format_bytes(n) for n in (0, 1023, 1024, 1536, 256 << 20, 3 << 30)] == [
        '0 B', '1023 B', '1.0 KiB', '1.5 KiB', '256.0 MiB', '3.0 GiB']


# ---------------------------------------------------------------------------------------------
# Exit statuses that say what happened, whoever reads the output


def _environment(stdout: str) -> dict:
    """The environment of ``python -m gpuserial``: stdout ``'buffered'`` (a pipe's default) or
    ``'unbuffered'`` (``PYTHONUNBUFFERED``, as some CI runners set it)."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONUNBUFFERED'}
    return dict(env, PYTHONPATH=str(ROOT), **({'PYTHONUNBUFFERED': '1'}
                                                if stdout == 'unbuffered' else {}))


def _piped(command: str, cwd, stdout: str, stderr: str = '',
           program: str = '-m gpuserial') -> tuple[int, str]:
    """``python -m gpuserial ... | head ...`` in bash: gpuserial's exit status, head's output;
    its stderr must be ``stderr``."""
    script = (f'{sys.executable} {program} {command}; '
              'echo "status=${PIPESTATUS[0]}"')
    result = subprocess.run(['bash', '-c', script], cwd=cwd, capture_output=True, text=True,
                            env=_environment(stdout), timeout=120)
    *shown, status = result.stdout.splitlines()
    assert result.stderr == stderr
    return int(status.split('=')[1]), '\n'.join(shown)


# ``gpuserial``, with Ctrl-C arriving as ``clean`` starts on the prefix ``ctrl-c``
CTRL_C = '''
import sys
from gpuserial import checkpoints
from gpuserial.tools import cli

def clean(prefix, **options):
    if prefix == 'ctrl-c':
        raise KeyboardInterrupt
    return real(prefix, **options)

real, checkpoints.clean = checkpoints.clean, clean
sys.exit(cli.main(sys.argv[1:]))
'''
FAILURES = {'error': ('nowhere', '-m gpuserial', 2,
                      "gpuserial: error: 'nowhere': no such directory\n"),
            'interrupt': ('ctrl-c', f'-c {shlex.quote(CTRL_C)}', 130,
                          'gpuserial: interrupted\n')}


@pytest.mark.parametrize('stdout', ['buffered', 'unbuffered'])
def test_a_reader_that_leaves_early_does_not_change_the_exit_status(tmp_path, stdout):
    numpy.savez(tmp_path / 'a.npz', **{f'k{i}': numpy.arange(i) for i in range(300)})
    numpy.savez(tmp_path / 'b.npz', **{f'k{i}': numpy.arange(i) + 1 for i in range(300)})
    assert _piped('diff a.npz a.npz | head -c 0', tmp_path, stdout) == (0, '')
    status, shown = _piped('diff a.npz b.npz | head -1', tmp_path, stdout)
    assert status == 1 and shown.startswith('values differ: k1 ')
    status, shown = _piped('demo --size 1MiB --device -1 | head -1', tmp_path, stdout)
    assert status == 0 and shown.startswith('gpuserial demo: a 1 MiB model')


@pytest.mark.parametrize('failure', FAILURES)
@pytest.mark.parametrize('stdout', ['buffered', 'unbuffered'])
def test_a_command_that_fails_after_its_reader_left_keeps_its_exit_status(tmp_path, stdout,
                                                                          failure):
    """``gpuserial clean stale nowhere | head -c 0``: the lines printed for ``stale`` went
    nowhere, then ``nowhere`` failed (or Ctrl-C came): exit status 2 (130) and the one-line
    message, not Python's 120 and a BrokenPipeError from its last flush."""
    prefix, program, code, message = FAILURES[failure]
    stale = _temporary_file(tmp_path, 'snapshot_iter_100', _dead_pid())
    status, shown = _piped(f'clean --dry-run {shlex.quote(str(tmp_path))} {prefix} | head -c 0',
                           tmp_path, stdout, message, program)
    assert (status, shown) == (code, '')
    assert stale.exists()


@pytest.mark.parametrize('failure', FAILURES)
def test_a_failed_command_prints_its_error_after_its_output(tmp_path, failure):
    """With stdout and stderr in one log (``> log 2>&1``), what a command printed before it
    failed (or Ctrl-C came) comes before the message, as it happened."""
    prefix, program, code, message = FAILURES[failure]
    stale = _temporary_file(tmp_path, 'snapshot_iter_100', _dead_pid())
    result = subprocess.run(
        ['bash', '-c', f'{sys.executable} {program} clean --dry-run '
         f'{shlex.quote(str(tmp_path))} {prefix} 2>&1'], cwd=tmp_path, capture_output=True,
        text=True, env=_environment('buffered'), timeout=120)
    assert result.returncode == code
    assert result.stdout.splitlines() == [
        f'would remove {stale} (10 B, process {stale.name.split(".")[-2].split("-")[0]} is '
        f'gone)', message.rstrip('\n')]


def test_demo_takes_an_int_device(capsys, tmp_path):
    status, out, _ = run(capsys, 'demo', '--size', '64KiB', '--device', '-1', '--dir', tmp_path)
    assert status == 0 and 'on the CPU' in out
    if not devices.gpu_available():
        status, out, err = run(capsys, 'demo', '--size', '64KiB', '--device', '0')
        assert_one_line_error(status, out, err, "device 0 is not usable")


def test_diff_of_infinities_is_infinite(capsys, tmp_path):
    numpy.savez(tmp_path / 'a.npz', x=numpy.array([numpy.inf, 1.0]))
    numpy.savez(tmp_path / 'b.npz', x=numpy.array([-numpy.inf, 2.0]))
    status, out, _ = run(capsys, 'diff', tmp_path / 'a.npz', tmp_path / 'b.npz')
    assert status == 1
    assert 'values differ: x (2,) float64: 2 element(s) differ, max abs diff inf, max rel diff ' \
           'inf' in out


# ---------------------------------------------------------------------------------------------
# clean


def _temporary_file(directory, target: str, pid: int, size: int = 10) -> pathlib.Path:
    from gpuserial.storage import _fileio
    path = directory / f'.{target}.{pid}-{_fileio.HOST}-00aa{_fileio.TEMP_SUFFIX}'
    path.write_bytes(bytes(size))
    return path


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                              capture_output=True, text=True, check=True).stdout)


def test_clean_lists_and_removes_only_stale_temporaries(capsys, tmp_path):
    stale = _temporary_file(tmp_path, 'snapshot_iter_100', _dead_pid(), 2048)
    live = _temporary_file(tmp_path, 'snapshot_iter_200', os.getpid())
    (tmp_path / 'snapshot_iter_50').write_bytes(b'a finished snapshot')
    status, out, err = run(capsys, 'clean', '--dry-run', tmp_path)
    pid = stale.name.split('.')[-2].split('-')[0]
    assert (status, err) == (0, '')
    assert out.splitlines() == [
        f'would remove {stale} (2.0 KiB, process {pid} is gone)',
        f'kept {live} (10 B, process {os.getpid()} is running)',
        'would remove 1 leftover(s) (2.0 KiB); kept 1']
    assert stale.exists()
    status, out, err = run(capsys, 'clean', tmp_path)
    assert status == 0
    assert out.splitlines()[-1] == 'removed 1 leftover(s) (2.0 KiB); kept 1'
    assert not stale.exists() and live.exists() and (tmp_path / 'snapshot_iter_50').exists()


def test_clean_of_a_missing_directory(capsys, tmp_path):
    status, out, err = run(capsys, 'clean', tmp_path / 'nowhere')
    assert_one_line_error(status, out, err, 'nowhere', 'no such directory')
