"""Files move between real Chainer 7.8.1 and gpuserial, both ways.

Chainer-written reference files (tests/data/chainer, with the script that made them) load into
gpuserial with the values Chainer recorded. The other way, gpuserial writes the same entries and
real Chainer loads them; that half needs Chainer's own environment, which ``ci/test.sh`` builds
and names in GPUSERIAL_CHAINER_PYTHON.
"""

import hashlib
import json
import math
import pathlib
import subprocess
import zipfile

import h5py
import numpy
import pytest

from gpuserial import serializers
from gpuserial.formats import _zipstream
from tests.conftest import CHAINER_PYTHON, flatten

DATA = pathlib.Path(__file__).parent / 'data' / 'chainer'
EXPECTED = json.loads((DATA / 'expected.json').read_text())
SCALAR_TYPES = {'int64': int, 'float64': float, 'bool': bool}


def _target(entries: dict, scalars_as_python: bool) -> dict:
    """A nested dict of zeroed targets shaped like the file's entries."""
    root: dict = {}
    for key, entry in entries.items():
        *parents, name = key.split('/')
        node = root
        for parent in parents:
            node = node.setdefault(parent, {})
        if entry['is_none']:
            node[name] = None  # stays None (a stored None leaves an entry as it is)
        elif entry['shape'] == [] and scalars_as_python and entry['dtype'] in SCALAR_TYPES:
            node[name] = SCALAR_TYPES[entry['dtype']]()
        else:
            node[name] = numpy.zeros(entry['shape'], entry['dtype'])
    return root


def _load(name: str, target) -> None:
    load = serializers.load_npz if name.endswith('.npz') else serializers.load_hdf5
    load(DATA / name, target)


@pytest.mark.parametrize('name', sorted(EXPECTED))
@pytest.mark.parametrize('scalars_as_python', [False, True], ids=['0d', 'python'])
def test_chainer_files_load_with_chainers_values(name, scalars_as_python):
    entries = EXPECTED[name]
    target = _target(entries, scalars_as_python)
    _load(name, target)
    loaded = flatten(target)
    assert loaded.keys() == entries.keys()
    for key, entry in entries.items():
        value = loaded[key]
        if entry['is_none']:
            assert value is None, key
            continue
        if 'value' in entry:
            assert value == entry['value'] and numpy.ndim(value) == 0, key
        if 'values' in entry:
            assert numpy.asarray(value).tolist() == entry['values'], key
        total = numpy.asarray(value).astype(numpy.complex128).sum()
        assert math.isclose(total.real, entry['sum'], rel_tol=1e-12, abs_tol=1e-12), key
        if 'sum_imag' in entry:
            assert math.isclose(total.imag, entry['sum_imag'], rel_tol=1e-12, abs_tol=1e-12)


def test_a_fortran_order_member_loads_in_c_order():
    with numpy.load(DATA / 'numpy_plain.npz') as npz:
        fortran = [key for key in npz.files if npz[key].flags.f_contiguous and npz[key].ndim > 1]
        assert fortran, 'the reference file should hold a Fortran-order array'
        expected = {key: npz[key] for key in fortran}
    target = {key: numpy.zeros(value.shape, value.dtype) for key, value in expected.items()}
    serializers.load_npz(DATA / 'numpy_plain.npz', target, strict=True)
    for key, value in expected.items():
        numpy.testing.assert_array_equal(target[key], value)


def _resave(name: str, directory: pathlib.Path) -> pathlib.Path:
    """Loads a reference file with gpuserial and writes it again with gpuserial."""
    target = _target(EXPECTED[name], scalars_as_python=False)
    _load(name, target)
    path = directory / name
    if name.endswith('.npz'):
        with zipfile.ZipFile(DATA / name) as reference:
            deflated = any(i.compress_type == zipfile.ZIP_DEFLATED for i in reference.infolist())
        serializers.save_npz(path, target, compression=deflated)
    else:
        serializers.save_hdf5(path, target)
    return path


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_gpuserial_files_match_chainers_layout(tmp_path, name):
    path = _resave(name, tmp_path)
    if name.endswith('.npz'):
        with zipfile.ZipFile(path) as ours, zipfile.ZipFile(DATA / name) as theirs:
            assert sorted(ours.namelist()) == sorted(theirs.namelist())
            for info in ours.infolist():
                assert info.compress_type == theirs.getinfo(info.filename).compress_type
        has_none = any(entry['is_none'] for entry in EXPECTED[name].values())
        with numpy.load(path, allow_pickle=has_none) as npz, numpy.load(DATA / name,
                                                                         allow_pickle=has_none) \
                as reference:
            for key in reference.files:
                assert npz[key].dtype == reference[key].dtype
                numpy.testing.assert_array_equal(npz[key], reference[key])
    else:
        with h5py.File(path, 'r') as ours, h5py.File(DATA / name, 'r') as theirs:
            for key in EXPECTED[name]:
                assert ours[key].shape == theirs[key].shape
                assert ours[key].compression == theirs[key].compression
                if theirs[key].shape is not None:
                    numpy.testing.assert_array_equal(ours[key][()], theirs[key][()])


@pytest.mark.chainer
def test_real_chainer_loads_gpuserial_files(tmp_path):
    names = [name for name in EXPECTED if name != 'numpy_plain.npz']
    for name in names:
        _resave(name, tmp_path)
    result = subprocess.run([CHAINER_PYTHON, str(DATA / 'check_gpuserial_files.py'),
                             str(tmp_path), '--compare'], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert sorted(loaded) == sorted(names)


CHAINER_READS = '''
import hashlib
import sys
import chainer
import numpy
target = numpy.zeros(int(sys.argv[2]), numpy.float32)
with numpy.load(sys.argv[1]) as npz:
    chainer.serializers.NpzDeserializer(npz)('w', target)
print(hashlib.sha256(target.tobytes()).hexdigest(), int(target.size))
'''


@pytest.mark.chainer
def test_real_chainer_reads_members_deflated_in_blocks_on_threads(tmp_path):
    size = 3 * _zipstream.BLOCK // 4 + 12345  # float32: 3 blocks and some
    weights = numpy.random.default_rng(0).standard_normal(size).astype(numpy.float32)
    path = tmp_path / 'model.npz'
    serializers.save_npz(path, {'w': weights})
    with zipfile.ZipFile(path) as archive:  # the block list sits in the directory's extra field
        assert archive.getinfo('w.npy').extra
    result = subprocess.run([CHAINER_PYTHON, '-c', CHAINER_READS, str(path), str(size)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    digest, count = result.stdout.split()
    assert (digest, int(count)) == (hashlib.sha256(weights.tobytes()).hexdigest(), size)
