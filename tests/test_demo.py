"""``gpuserial demo``: the README's main job, run tiny, through its real entry points."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import h5py
import numpy
import pytest

from gpuserial.engine import devices
from gpuserial.formats import npz
from gpuserial.tools import cli, demo

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZE = '4MiB'


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def table(out: str) -> dict[str, list[str]]:
    """{format: the table row's cells} of the demo's output."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('format '))
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows[line.split()[0]] = line.split()
    return rows


def test_demo_prints_its_table_and_checks_every_value(capsys):
    status, out, err = run(capsys, 'demo', '--size', SIZE, '--device', 'cpu')
    assert (status, err) == (0, '')
    assert out.startswith('gpuserial demo: a 4 MiB model of 10 float32 arrays on the CPU '
                          '(NumPy; as asked)')
    rows = table(out)
    assert sorted(rows) == ['HDF5', 'NPZ']
    assert rows['NPZ'][1] == 'save_npz(compression=False)'
    assert rows['HDF5'][1] == 'save_hdf5(compression=0)'
    for cells in rows.values():
        size, unit, save_s, load_s, save_gbps, load_gbps = cells[2:8]
        assert (unit, cells[8:]) == ('MiB', ['ok,', 'bit-exact'])
        assert 4.0 <= float(size) < 4.1
        assert min(float(save_s), float(load_s)) > 0
        assert min(float(save_gbps), float(load_gbps)) > 0
    assert out.rstrip().endswith('All 10 arrays came back bit-exactly from both formats.')


def test_demo_default_device(capsys):
    status, out, _ = run(capsys, 'demo', '--size', SIZE)
    assert status == 0
    if devices.gpu_available():
        assert ' on cuda:' in out.splitlines()[0]
    else:
        assert 'the CPU (NumPy; no usable GPU' in out.splitlines()[0]


@pytest.mark.parametrize('where', ['a file', 'missing/dir'])
def test_demo_dir_must_be_a_directory_or_one_it_can_make(capsys, tmp_path, where):
    """--dir of a file said 'File exists'; --dir under a missing directory made every missing
    parent (a misspelt path too): both are errors naming the path, before any timing."""
    (tmp_path / 'a file').write_bytes(b'x')
    status, out, err = run(capsys, 'demo', '--size', '1MiB', '--dir', tmp_path / where)
    assert status != 0 and 'gpuserial demo' in out and 'files in' not in out
    assert str(tmp_path / where) in err
    assert sorted(os.listdir(tmp_path)) == ['a file']


def test_demo_keeps_its_files_in_dir(capsys, tmp_path):
    status, out, _ = run(capsys, 'demo', '--size', '1MiB', '--dir', tmp_path / 'files',
                         '--compress')
    assert status == 0
    assert f'files in {tmp_path / "files"}\n' in out
    rows = table(out)
    assert rows['NPZ'][1] == 'save_npz(compression=True)'
    assert rows['HDF5'][1] == 'save_hdf5(compression=4)'
    assert sorted(os.listdir(tmp_path / 'files')) == ['demo.h5', 'demo.npz']
    model = demo.make_model(1 << 20, devices.CPU)
    with numpy.load(tmp_path / 'files' / 'demo.npz') as f:
        assert sorted(f.files) == sorted(f'{layer}/{name}' for layer in model
                                         for name in model[layer])
        numpy.testing.assert_array_equal(f['fc1/W'], model['fc1']['W'])
    with h5py.File(tmp_path / 'files' / 'demo.h5') as f:
        assert f['conv1/W'].compression == 'gzip'
        numpy.testing.assert_array_equal(f['conv1/W'][()], model['conv1']['W'])


def test_demo_model_size_and_shapes():
    model = demo.make_model(4 << 20, devices.CPU)
    arrays = {f'{layer}/{name}': a for layer in model for name, a in model[layer].items()}
    assert sum(a.nbytes for a in arrays.values()) == 4 << 20
    assert {a.dtype for a in arrays.values()} == {numpy.dtype(numpy.float32)}
    assert {a.ndim for a in arrays.values()} == {1, 2, 4}
    channels = arrays['conv1/W'].shape[0]
    assert arrays['conv1/W'].shape == (channels, channels, 3, 3)
    assert arrays['bn1/gamma'].shape == (channels,)
    zeros = demo.make_model(4 << 20, devices.CPU, zeros=True)
    assert not any(a.any() for layer in zeros.values() for a in layer.values())


def test_demo_fails_when_a_value_comes_back_wrong(capsys, monkeypatch):
    load = npz.load_npz

    def wrong_load(path, obj, **kwargs):
        load(path, obj, **kwargs)
        obj['fc1']['b'][3] += 1

    monkeypatch.setattr(npz, 'load_npz', wrong_load)
    status, out, _ = run(capsys, 'demo', '--size', '1MiB', '--device', 'cpu')
    assert status == 1
    assert table(out)['NPZ'][8:] == ['FAILED:', 'fc1/b']
    assert table(out)['HDF5'][8:] == ['ok,', 'bit-exact']
    assert 'FAILED: values differ after the NPZ round trip' in out


@pytest.mark.skipif(devices.gpu_available(), reason='a GPU is usable here')
def test_demo_on_a_gpu_that_is_not_there(capsys):
    status, out, err = run(capsys, 'demo', '--size', SIZE, '--device', 'cuda:0')
    assert (status, out) == (2, '')
    assert err == ("gpuserial: error: device 'cuda:0' is not usable: no GPU is available (cupy "
                   "missing, or cupy.is_available() is False)\n")


@pytest.mark.parametrize(('size', 'message'), [
    ('60KiB', 'a demo model needs at least 64 KiB, got 61440 bytes'),
])
def test_demo_too_small(capsys, size, message):
    status, out, err = run(capsys, 'demo', '--size', size)
    assert (status, out, err) == (2, '', f'gpuserial: error: {message}\n')


def test_demo_bad_arguments(capsys):
    for args in (['--size', 'lots'], ['--device']):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(['demo', *args])
        assert exit_info.value.code == 2
        assert 'usage: gpuserial demo' in capsys.readouterr().err
    status, _, err = run(capsys, 'demo', '--size', SIZE, '--device', 'tpu')
    assert status == 2 and err.startswith("gpuserial: error: unknown device 'tpu'")


def test_demo_through_the_module_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, '-m', 'gpuserial', 'demo', '--size', '1MiB'],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'ok, bit-exact' in result.stdout
    assert os.listdir(tmp_path) == []  # the temporary directory is gone, the cwd untouched


@pytest.mark.gpu
def test_demo_on_the_gpu(capsys):
    status, out, _ = run(capsys, 'demo', '--size', SIZE, '--device', 'cuda:0')
    assert status == 0
    assert ' on cuda:0 (' in out.splitlines()[0] and 'CuPy)' in out.splitlines()[0]
    assert [cells[8:] for cells in table(out).values()] == [['ok,', 'bit-exact']] * 2
