"""Chainer's own serializer tests (``serializers_tests/test_npz.py``, ``test_hdf5.py`` of Chainer
7.8.1), rewritten for gpuserial: the same cases, the same expectations, ``call_count == 1``
included. Chainer's links and optimizers become gpuserial's (``Adam`` stands in for
``AdaDelta``, whose state keys differ); chainerx and iDeep cases have no counterpart here.
"""

import io
from unittest import mock

import h5py
import numpy
import pytest

from gpuserial import Adam, Chain, Linear, Link
from gpuserial.serializers import hdf5, npz
from tests.conftest import host, make_device

DATA = numpy.random.default_rng(0).uniform(-1, 1, (2, 3)).astype(numpy.float32)
ARRAY_DEVICES = ['cpu', 'standin:0', pytest.param('cuda:0', marks=pytest.mark.gpu)]


@pytest.fixture(params=ARRAY_DEVICES, ids=['cpu', 'standin', 'cuda0'])
def device(request):
    return make_device(request.param)


# -- DictionarySerializer ---------------------------------------------------------------------


@pytest.mark.parametrize('key', ['x', '/x/'])
def test_dictionary_serializer_child_path(key):
    child = npz.DictionarySerializer({})[key]
    assert isinstance(child, npz.DictionarySerializer) and child.path == 'x/'


@pytest.mark.parametrize('query', ['w', '/w'])
def test_dictionary_serializer_stores_arrays_on_the_host(device, query):
    serializer = npz.DictionarySerializer({})
    data = device.send(DATA)
    assert serializer(query, data) is data
    stored = serializer.target['w']
    assert isinstance(stored, numpy.ndarray)
    assert (stored.shape, stored.dtype) == (DATA.shape, DATA.dtype)
    numpy.testing.assert_array_equal(stored, DATA)


def test_dictionary_serializer_scalar_and_none():
    serializer = npz.DictionarySerializer({})
    assert serializer('x', 10) == 10
    assert serializer.target['x'].shape == () and serializer.target['x'].dtype == int
    assert serializer.target['x'][()] == 10
    assert serializer('n', None) is None
    stored = serializer.target['n']
    assert stored.shape == () and stored.dtype == object and stored[()] is None


# -- NpzDeserializer ----------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=['stored', 'compressed'])
def npzfile(request, tmp_path):
    path = tmp_path / 'd.npz'
    savez = numpy.savez_compressed if request.param else numpy.savez
    savez(path, **{'x/': None, 'y': DATA, 'z': numpy.asarray(10), 'w': None})
    with numpy.load(path) as f:
        yield f


@pytest.mark.parametrize('key', ['x', '/x/'])
def test_npz_deserializer_child_path(npzfile, key):
    child = npz.NpzDeserializer(npzfile)[key]
    assert isinstance(child, npz.NpzDeserializer) and child.path == 'x/'


@pytest.mark.parametrize('query', ['y', '/y'])
def test_npz_deserializer_loads_in_place(npzfile, device, query):
    y = device.send(numpy.empty((2, 3), numpy.float32))
    assert npz.NpzDeserializer(npzfile)(query, y) is y
    numpy.testing.assert_array_equal(host(y), DATA)


def test_npz_deserializer_by_passing_none(npzfile):
    numpy.testing.assert_array_equal(npz.NpzDeserializer(npzfile)('y', None), DATA)


def test_npz_deserializer_different_dtype(npzfile, device):
    y = device.send(numpy.empty((2, 3), numpy.float16))
    assert npz.NpzDeserializer(npzfile)('y', y) is y
    numpy.testing.assert_array_equal(host(y), DATA.astype(numpy.float16))


def test_npz_deserializer_scalar_and_none(npzfile):
    deserializer = npz.NpzDeserializer(npzfile)
    assert deserializer('z', 5) == 10
    assert deserializer('w', None) is None
    assert deserializer('w', numpy.empty(1, numpy.float32)) is None


def test_npz_deserializer_non_strict(tmp_path):
    numpy.savez(tmp_path / 'd.npz', x=numpy.asarray(10))
    with numpy.load(tmp_path / 'd.npz') as f:
        y = numpy.empty((2, 3), numpy.float32)
        assert npz.NpzDeserializer(f, strict=False)('y', y) is y


IGNORE_YY = ['yy', ['yy'], lambda key: key == 'yy', [lambda key: key == 'yy']]


@pytest.mark.parametrize('ignore_names', IGNORE_YY)
def test_npz_deserializer_ignore_names(tmp_path, ignore_names):
    numpy.savez(tmp_path / 'd.npz', x=numpy.asarray(10), yy=numpy.empty((2, 3)))
    with numpy.load(tmp_path / 'd.npz') as f:
        yy = numpy.ones((2, 1), numpy.float32)  # a shape that would not load
        assert npz.NpzDeserializer(f, ignore_names=ignore_names)('yy', yy) is yy


@pytest.mark.parametrize('ignore_names', IGNORE_YY)
def test_load_npz_ignore_names(tmp_path, ignore_names):
    x, yy = numpy.asarray(10, numpy.float32), numpy.ones((2, 3), numpy.float32)
    numpy.savez(tmp_path / 'd.npz', x=x, yy=yy)
    chain = Link(x=(), yy=(2, 3))
    npz.load_npz(tmp_path / 'd.npz', chain, ignore_names=ignore_names)
    assert chain.x.array == x
    assert not (chain.yy.array == yy).all()


def _parent(child_name='linear'):
    return Chain(linear=Linear(3, 2), child=Chain(**{child_name: Linear(2, 3)}))


@pytest.fixture(params=['filename', 'bytesio'])
def saved_parent(request, tmp_path):
    """A saved parent chain, and a file (path or BytesIO at 0) to read it from."""
    file = tmp_path / 'p.npz' if request.param == 'filename' else io.BytesIO()
    parent = _parent()
    npz.save_npz(file, parent)
    if request.param == 'bytesio':
        file.seek(0)
    return parent, file


def test_npz_deserializer_non_strict_group_hierarchy(saved_parent):
    source, file = saved_parent
    target = _parent('linear2')
    kept = target.child.linear2.W.array.copy(), target.child.linear2.b.array.copy()
    with numpy.load(file) as f:
        npz.NpzDeserializer(f, strict=False).load(target)
    numpy.testing.assert_array_equal(target.linear.W.array, source.linear.W.array)
    numpy.testing.assert_array_equal(target.linear.b.array, source.linear.b.array)
    numpy.testing.assert_array_equal(target.child.linear2.W.array, kept[0])
    numpy.testing.assert_array_equal(target.child.linear2.b.array, kept[1])


@pytest.mark.parametrize('ignore_names', [
    ['linear/W', 'child/linear2/b'],
    lambda key: key in ['linear/W', 'child/linear2/b'],
    [lambda key: key in ['linear/W'], lambda key: key in ['child/linear2/b']],
    [lambda key: key in ['linear/W'], 'child/linear2/b'],
])
def test_npz_deserializer_ignore_names_group_hierarchy(tmp_path, ignore_names):
    source = _parent('linear2')
    npz.save_npz(tmp_path / 'p.npz', source)
    target = _parent('linear2')
    kept_w, kept_b = target.linear.W.array.copy(), target.child.linear2.b.array.copy()
    with numpy.load(tmp_path / 'p.npz') as f:
        npz.NpzDeserializer(f, ignore_names=ignore_names).load(target)
    numpy.testing.assert_array_equal(target.linear.b.array, source.linear.b.array)
    numpy.testing.assert_array_equal(target.child.linear2.W.array, source.child.linear2.W.array)
    numpy.testing.assert_array_equal(target.linear.W.array, kept_w)
    numpy.testing.assert_array_equal(target.child.linear2.b.array, kept_b)


def test_serialize_calls_serialize_once():
    obj = mock.MagicMock()
    target = npz.serialize(obj)
    assert obj.serialize.call_count == 1
    (serializer,), _ = obj.serialize.call_args
    assert isinstance(serializer, npz.DictionarySerializer) and isinstance(target, dict)


@pytest.mark.parametrize('compress', [False, True])
@pytest.mark.parametrize('file_type', ['filename', 'bytesio'])
def test_save_npz_calls_serialize_once(tmp_path, compress, file_type):
    obj = mock.MagicMock()
    npz.save_npz(tmp_path / 'm.npz' if file_type == 'filename' else io.BytesIO(), obj, compress)
    assert obj.serialize.call_count == 1
    (serializer,), _ = obj.serialize.call_args
    assert isinstance(serializer, npz.DictionarySerializer)


@pytest.mark.parametrize('strict', [True, False])
def test_load_npz_calls_serialize_once(saved_parent, strict):
    _, file = saved_parent
    obj = mock.MagicMock()
    npz.load_npz(file, obj, strict=strict)
    assert obj.serialize.call_count == 1
    (serializer,), _ = obj.serialize.call_args
    assert isinstance(serializer, npz.NpzDeserializer) and serializer.strict is strict


def test_load_npz_with_and_without_path(saved_parent):
    source, file = saved_parent
    target = Chain(linear=Linear(2, 3))
    npz.load_npz(file, target, 'child/')
    numpy.testing.assert_array_equal(target.linear.W.array, source.child.linear.W.array)
    if hasattr(file, 'seek'):
        file.seek(0)
    target = Chain(linear=Linear(3, 2))
    npz.load_npz(file, target, path='')
    numpy.testing.assert_array_equal(target.linear.W.array, source.linear.W.array)


# -- hierarchies with an optimizer, both formats --------------------------------------------------


def _trained_parent():
    child = Chain(linear=Linear(2, 3))
    child.add_param('Wc', (2, 3))
    parent = Chain(child=child)
    parent.add_param('Wp', (2, 3))
    for param in parent.params():
        param.array[...] = 0.5
    optimizer = Adam().setup(parent)
    for param in parent.params():
        param.grad = numpy.ones_like(param.array)
    optimizer.update()  # every state initialized
    return parent, optimizer


CHAIN_KEYS = {'child/linear/W', 'child/linear/b', 'child/Wc', 'Wp'}
OPTIMIZER_KEYS = ({f'{param}/{key}' for param in CHAIN_KEYS for key in ('t', 'm', 'v')}
                  | {'epoch', 't'})


@pytest.mark.parametrize('compress', [False, True])
def test_npz_hierarchies(tmp_path, compress):
    parent, optimizer = _trained_parent()
    target = {}
    npz.DictionarySerializer(target, 'test/').save(parent)
    assert set(target) == {'test/' + key for key in CHAIN_KEYS}
    target = {}
    npz.DictionarySerializer(target, 'test/').save(optimizer)
    assert set(target) == {'test/' + key for key in OPTIMIZER_KEYS}
    npz.save_npz(tmp_path / 'o.npz', optimizer, compress)
    with numpy.load(tmp_path / 'o.npz') as f:
        assert set(f.keys()) == OPTIMIZER_KEYS
    for param in parent.params():
        param.array.fill(1)
    npz.save_npz(tmp_path / 'p.npz', parent, compress)
    del parent.child.linear.b
    for param in parent.params():
        param.array.fill(0)
    npz.load_npz(tmp_path / 'p.npz', parent, strict=False)
    assert all((param.array == 1).all() for param in parent.params())
    assert not hasattr(parent.child.linear, 'b')


def test_hdf5_hierarchies(tmp_path):
    parent, optimizer = _trained_parent()
    path = tmp_path / 'h.h5'
    with h5py.File(path, 'w') as f:
        hdf5.HDF5Serializer(f.create_group('chain')).save(parent)
        hdf5.HDF5Serializer(f.create_group('optimizer')).save(optimizer)
        assert set(f) == {'chain', 'optimizer'}
        assert set(f['chain']) == {'child', 'Wp'}
        assert set(f['chain/child']) == {'linear', 'Wc'}
        assert set(f['chain/child/linear']) == {'W', 'b'}
        assert set(f['optimizer']) == {'child', 'Wp', 'epoch', 't'}
    fresh_parent, fresh_optimizer = _trained_parent()
    for param in fresh_parent.params():
        param.array.fill(0)
        param.update_rule.state['m'].fill(0)
    with h5py.File(path, 'r') as f:
        hdf5.HDF5Deserializer(f['chain']).load(fresh_parent)
        hdf5.HDF5Deserializer(f['optimizer']).load(fresh_optimizer)
    saved = dict(parent.namedparams())
    for name, param in fresh_parent.namedparams():
        numpy.testing.assert_array_equal(param.array, saved[name].array)
        numpy.testing.assert_array_equal(param.update_rule.state['m'],
                                         saved[name].update_rule.state['m'])
    hdf5.save_hdf5(tmp_path / 'p.h5', parent)
    with h5py.File(tmp_path / 'p.h5', 'r') as f:
        assert set(f) == {'child', 'Wp'}


# -- HDF5Serializer and HDF5Deserializer ---------------------------------------------------------


@pytest.fixture
def h5_writer(tmp_path):
    with h5py.File(tmp_path / 'w.h5', 'w') as f:
        yield f, hdf5.HDF5Serializer(f, compression=3)


def test_hdf5_serializer_child(h5_writer):
    _, serializer = h5_writer
    child = serializer['x']
    assert isinstance(child, hdf5.HDF5Serializer)
    assert child.group.name == '/x' and child.compression == 3


def test_hdf5_serializer_array(h5_writer, device):
    f, serializer = h5_writer
    data = device.send(DATA)
    assert serializer('w', data) is data
    dataset = f['w']
    assert isinstance(dataset, h5py.Dataset)
    assert (dataset.shape, dataset.size, dataset.dtype) == (DATA.shape, DATA.size, DATA.dtype)
    read = numpy.empty((2, 3), numpy.float32)
    dataset.read_direct(read)
    numpy.testing.assert_array_equal(read, DATA)
    assert dataset.compression_opts == 3


def test_hdf5_serializer_scalar_and_none(h5_writer):
    f, serializer = h5_writer
    assert serializer('x', 10) == 10
    dataset = f['x']
    assert (dataset.shape, dataset.size, dataset.dtype) == ((), 1, int)
    read = numpy.empty((), numpy.int32)
    dataset.read_direct(read)
    assert read == 10 and dataset.compression_opts is None
    assert serializer('n', None) is None
    assert isinstance(f['n'], h5py.Dataset) and f['n'].shape is None


@pytest.fixture
def h5_reader(tmp_path):
    with h5py.File(tmp_path / 'r.h5', 'w') as f:
        f.require_group('x')
        f.create_dataset('y', data=DATA)
        f.create_dataset('z', data=numpy.asarray(10))
        f.create_dataset('w', data=h5py.Empty('f'))
        f.create_dataset('str', data='abc')
    with h5py.File(tmp_path / 'r.h5', 'r') as f:
        yield hdf5.HDF5Deserializer(f)


def test_hdf5_deserializer_child(h5_reader):
    child = h5_reader['x']
    assert isinstance(child, hdf5.HDF5Deserializer) and child.group.name == '/x'


def test_hdf5_deserializer_loads_in_place(h5_reader, device):
    y = device.send(numpy.empty((2, 3), numpy.float32))
    assert h5_reader('y', y) is y
    numpy.testing.assert_array_equal(host(y), DATA)
    numpy.testing.assert_array_equal(h5_reader('y', None), DATA)


def test_hdf5_deserializer_different_dtype(h5_reader, device):
    y = device.send(numpy.empty((2, 3), numpy.float16))
    assert h5_reader('y', y) is y
    numpy.testing.assert_array_equal(host(y), DATA.astype(numpy.float16))


def test_hdf5_deserializer_scalars_strings_and_none(h5_reader):
    assert h5_reader('z', 5) == 10
    assert h5_reader('str', '') == 'abc'
    assert h5_reader('w', None) is None
    assert h5_reader('w', numpy.empty((1,))) is None


def test_hdf5_deserializer_non_strict(tmp_path):
    with h5py.File(tmp_path / 'e.h5', 'w') as f:
        f.require_group('x')
    with h5py.File(tmp_path / 'e.h5', 'r') as f:
        y = numpy.empty((2, 3), numpy.float32)
        assert hdf5.HDF5Deserializer(f, strict=False)('y', y) is y


def test_hdf5_deserializer_non_strict_group_hierarchy(tmp_path):
    source = _parent()
    hdf5.save_hdf5(tmp_path / 'p.h5', source)
    target = _parent('linear2')
    kept = target.child.linear2.W.array.copy(), target.child.linear2.b.array.copy()
    with h5py.File(tmp_path / 'p.h5', 'r') as f:
        hdf5.HDF5Deserializer(f, strict=False).load(target)
    numpy.testing.assert_array_equal(target.linear.W.array, source.linear.W.array)
    numpy.testing.assert_array_equal(target.linear.b.array, source.linear.b.array)
    numpy.testing.assert_array_equal(target.child.linear2.W.array, kept[0])
    numpy.testing.assert_array_equal(target.child.linear2.b.array, kept[1])


def test_save_hdf5_calls_serialize_once(tmp_path):
    obj = mock.MagicMock()
    hdf5.save_hdf5(tmp_path / 'm.h5', obj, compression=3)
    assert obj.serialize.call_count == 1
    (serializer,), _ = obj.serialize.call_args
    assert isinstance(serializer, hdf5.HDF5Serializer) and serializer.compression == 3


def test_load_hdf5_calls_serialize_once(tmp_path):
    h5py.File(tmp_path / 'm.h5', 'w').close()
    obj = mock.MagicMock()
    hdf5.load_hdf5(tmp_path / 'm.h5', obj)
    assert obj.serialize.call_count == 1
    (serializer,), _ = obj.serialize.call_args
    assert isinstance(serializer, hdf5.HDF5Deserializer)
