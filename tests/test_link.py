"""Parameters and links: registration, hierarchy paths, devices, and Chainer's serialize layout."""

import json
import math
import pathlib

import h5py
import numpy
import pytest

from gpuserial.engine import devices
from gpuserial.errors import DeviceError
from gpuserial.objects.link import BatchNormalization, Chain, ChainList, Linear, Link, Parameter
from gpuserial.serializer import Deserializer, Serializer, child_path, entry_key
from tests import standin

CHAINER_DATA = pathlib.Path(__file__).parent / 'data' / 'chainer'


class Recorder(Serializer):
    """Records every ``serializer(key, value)`` call as ``{full key: value}``."""

    def __init__(self, target=None, path=''):
        self.target = {} if target is None else target
        self.path = path

    def __getitem__(self, key):
        return Recorder(self.target, child_path(self.path, key))

    def __call__(self, key, value):
        self.target[entry_key(self.path, key)] = value
        return value


class Echo(Deserializer):
    """The loader's dry run: returns every value unchanged, records the keys asked for."""

    def __init__(self, keys=None, path=''):
        self.keys = [] if keys is None else keys
        self.path = path

    def __getitem__(self, key):
        return Echo(self.keys, child_path(self.path, key))

    def __call__(self, key, value):
        self.keys.append(entry_key(self.path, key))
        return value


class FromDict(Deserializer):
    """A minimal deserializer with gpuserial's contract, over a dict of host values.

    Arrays load in place (or, with ``new=True``, come back as new arrays, as a load with
    ``device=`` does); ``value=None`` gives a new array; scalars convert to ``type(value)``.
    """

    def __init__(self, data, path='', new=False):
        self.data, self.path, self.new = data, path, new

    def __getitem__(self, key):
        return FromDict(self.data, child_path(self.path, key), self.new)

    def __call__(self, key, value):
        stored = self.data[entry_key(self.path, key)]
        if stored is None:
            return None
        if value is None or self.new and devices.is_array(value):
            return numpy.array(stored)
        if devices.is_array(value):
            value[...] = stored
            return value
        return type(value)(stored)


def snapshot_state(obj):
    """{key: value} of everything ``obj`` serializes, arrays as NumPy copies."""
    recorder = Recorder()
    obj.serialize(recorder)
    return {k: numpy.array(devices.to_host(v), copy=True) if devices.is_array(v) else v
            for k, v in recorder.target.items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if devices.is_array(a[key]):
            assert a[key].dtype == b[key].dtype, key
            numpy.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert type(a[key]) is type(b[key]) and a[key] == b[key], key


class MLP(Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = Linear(4, 3, initialW=numpy.arange(12, dtype=numpy.float32).reshape(3, 4))
            self.l2 = Linear(3, 2, initialW=0.5)


class Net(Chain):
    """Keys like Chainer's classifier: ``predictor/l1/W``."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.predictor = MLP()


# -- Parameter -----------------------------------------------------------------------------------


def test_parameter_default_is_nan_float32():
    p = Parameter(shape=(2, 3))
    assert p.shape == (2, 3) and p.dtype == numpy.float32
    assert numpy.isnan(p.array).all()
    assert p.grad is None


@pytest.mark.parametrize('dtype', [numpy.int32, numpy.uint8, numpy.bool_])
def test_parameter_default_without_nan_is_zero(dtype):
    p = Parameter(shape=3, dtype=dtype)
    assert p.dtype == dtype and not p.array.any()


@pytest.mark.parametrize('initializer, expected', [(0, 0.0), (2.5, 2.5), (-1, -1.0)])
def test_parameter_scalar_initializer(initializer, expected):
    p = Parameter(initializer, 4)
    assert p.shape == (4,)
    numpy.testing.assert_array_equal(p.array, numpy.full(4, expected, numpy.float32))


def test_parameter_array_initializer_is_the_data():
    a = numpy.arange(6, dtype=numpy.float64).reshape(2, 3)
    p = Parameter(a)
    assert p.array is a and p.data is a
    assert p.dtype == numpy.float64 and p.shape == (2, 3)


def test_parameter_array_initializer_shape_mismatch_names_both():
    with pytest.raises(ValueError, match=r'initial array has shape \(2, 3\), expected \(3, 2\)'):
        Parameter(numpy.zeros((2, 3)), (3, 2))


def test_parameter_callable_initializer_fills_in_place_with_its_dtype():
    def init(array):
        array[...] = numpy.arange(array.size).reshape(array.shape)
    init.dtype = numpy.float16
    p = Parameter(init, (2, 2))
    assert p.dtype == numpy.float16
    numpy.testing.assert_array_equal(p.array, [[0, 1], [2, 3]])


def test_parameter_dtype_argument():
    p = Parameter(0, 3, dtype=numpy.float64)
    assert p.array.dtype == numpy.float64


def test_uninitialized_parameter():
    p = Parameter()
    assert p.array is None and p.data is None and p.shape is None
    assert not p.is_initialized and p.size == 0
    assert p.dtype == numpy.float32 and p.device == devices.CPU
    p.zerograd()
    assert p.grad is None
    p.initialize((3,))
    assert p.shape == (3,) and numpy.isnan(p.array).all()


def test_uninitialized_parameter_keeps_initializer_until_initialize():
    p = Parameter(7, dtype=numpy.int32)
    assert p.array is None and p.dtype == numpy.int32
    p.initialize(2)
    numpy.testing.assert_array_equal(p.array, numpy.array([7, 7], numpy.int32))


def test_parameter_data_alias_and_grads():
    p = Parameter(1, (2,))
    new = numpy.zeros(2, numpy.float32)
    p.data = new
    assert p.array is new
    p.zerograd()
    numpy.testing.assert_array_equal(p.grad, [0, 0])
    p.cleargrad()
    assert p.grad is None


def test_parameter_repr_names_it():
    p = Parameter(0, (2,), name='W')
    assert 'W' in repr(p) and '(2,)' in repr(p)


# -- Link registration ---------------------------------------------------------------------------


def test_init_scope_registers_parameters_only_inside():
    link = Link()
    with link.init_scope():
        link.W = Parameter(0, (2, 2))
        link.other = 3
    link.b = Parameter(0, (2,))  # outside the scope: a plain attribute
    assert [name for name, _ in link.namedparams()] == ['/W']
    assert link.W.name == 'W'
    assert not link.within_init_scope


def test_add_param_and_kwargs():
    link = Link(x=(2, 3), y=None)
    link.add_param('z', 4, dtype=numpy.float64, initializer=1.5)
    assert link.x.shape == (2, 3) and link.y.array is None
    assert link.z.dtype == numpy.float64 and (link.z.array == 1.5).all()
    assert [name for name, _ in link.namedparams()] == ['/x', '/y', '/z']
    assert [name for name, _ in link.namedparams(include_uninit=False)] == ['/x', '/z']
    assert len(list(link.params(include_uninit=False))) == 2
    assert link.count_params() == 10


@pytest.mark.parametrize('method, args', [('add_param', ('W', 2)), ('add_persistent', ('W', 1))])
def test_registering_an_existing_name_fails(method, args):
    link = Link()
    link.add_param('W', 3)
    with pytest.raises(AttributeError, match="cannot register a new .* 'W': attribute exists"):
        getattr(link, method)(*args)


def test_register_persistent_of_missing_attribute_fails():
    with pytest.raises(AttributeError, match="non-existent attribute 'nope'"):
        Link().register_persistent('nope')


def test_delattr_unregisters():
    link = Link(W=(2,))
    link.add_persistent('count', 0)
    del link.W
    del link.count
    assert snapshot_state(link) == {}


class Counter:
    """A serializable persistent that is not an array."""

    def __init__(self):
        self.n = 0

    def serialize(self, serializer):
        self.n = serializer('n', self.n)


def test_persistents_of_every_kind_serialize():
    link = Link()
    link.add_persistent('arr', numpy.arange(3))
    link.add_persistent('count', 5)
    link.add_persistent('np_scalar', numpy.float32(1.5))
    link.add_persistent('label', 'hello')
    link.add_persistent('counter', Counter())
    link.add_persistent('nothing', None)
    state = Recorder()
    link.serialize(state)
    assert set(state.target) == {'arr', 'count', 'np_scalar', 'label', 'counter/n', 'nothing'}
    assert state.target['label'] == 'hello' and state.target['counter/n'] == 0

    data = {'arr': numpy.array([7, 8, 9]), 'count': 6, 'np_scalar': 2.5, 'label': 'bye',
            'counter/n': 4, 'nothing': numpy.ones(2)}
    arr = link.arr
    link.serialize(FromDict(data))
    assert link.arr is arr and list(arr) == [7, 8, 9]
    assert link.count == 6 and type(link.count) is int
    assert link.np_scalar == numpy.float32(2.5) and type(link.np_scalar) is numpy.float32
    assert link.label == 'bye' and link.counter.n == 4
    numpy.testing.assert_array_equal(link.nothing, [1, 1])


# -- hierarchy -----------------------------------------------------------------------------------


def test_chain_paths_match_chainer():
    net = Net()
    assert [name for name, _ in net.namedparams()] == [
        '/predictor/l1/W', '/predictor/l1/b', '/predictor/l2/W', '/predictor/l2/b']
    assert [name for name, _ in net.namedlinks()] == [
        '/', '/predictor', '/predictor/l1', '/predictor/l2']
    assert [name for name, _ in net.namedlinks(skipself=True)][0] == '/predictor'
    assert list(net.links())[0] is net
    assert list(net.children()) == [net.predictor]
    assert net['predictor'] is net.predictor and net.predictor.name == 'predictor'
    assert list(net.params()) == [p for _, p in net.namedparams()]


def test_chain_children_sorted_and_own_params_first():
    chain = Chain(b=Linear(2, 2), a=Linear(2, 2))
    chain.add_param('z', 1)
    assert [name for name, _ in chain.namedparams()] == ['/z', '/a/W', '/a/b', '/b/W', '/b/b']


def test_chain_add_link_errors():
    chain = Chain(l1=Linear(2, 2))
    with pytest.raises(AttributeError, match="'l1': attribute exists"):
        chain.add_link('l1', Linear(2, 2))
    with pytest.raises(TypeError, match='non-link object'):
        chain.add_link('x', 3)
    with pytest.raises(AttributeError, match="'l1': attribute exists"), chain.init_scope():
        chain.l1 = Linear(1, 1)


def test_chainlist_indexes_children():
    chain_list = ChainList(Linear(2, 3), Linear(3, 1))
    chain_list.append(Linear(1, 1, nobias=True))
    assert len(chain_list) == 3
    assert [name for name, _ in chain_list.namedparams()] == [
        '/0/W', '/0/b', '/1/W', '/1/b', '/2/W']
    assert [name for name, _ in chain_list.namedlinks()] == ['/', '/0', '/1', '/2']
    assert [link.name for link in chain_list] == ['0', '1', '2']
    first = chain_list[0]
    del chain_list[0]
    assert chain_list[0].name == '0' and first not in list(chain_list)
    chain_list.insert(0, first)
    assert chain_list[0] is first and chain_list[2].name == '2'
    chain_list[1] = Linear(5, 5)
    assert chain_list[1].W.shape == (5, 5) and chain_list[1].name == '1'
    assert [name for name, _ in snapshot_state(chain_list).items()][:2] == ['0/W', '0/b']


def test_chainlist_rejects_links_in_init_scope_and_non_links():
    chain_list = ChainList()
    with pytest.raises(TypeError, match='init_scope'), chain_list.init_scope():
        chain_list.child = Linear(1, 1)
    with pytest.raises(TypeError, match='non-link object'):
        chain_list.append('x')


def test_cleargrads_and_zerograds_reach_every_parameter():
    net = Net()
    net.zerograds()
    assert all(p.grad is not None and not p.grad.any() for p in net.params())
    net.cleargrads()
    assert all(p.grad is None for p in net.params())


# -- devices -------------------------------------------------------------------------------------


def test_to_device_cpu_keeps_numpy_and_returns_self():
    net = Net()
    net.add_persistent('stat', numpy.ones(3))
    net.zerograds()
    assert net.to_device('cpu') is net
    assert net.to_cpu() is net and net.device == devices.CPU and net.xp is numpy
    assert all(isinstance(p.array, numpy.ndarray) for p in net.params())
    assert all(isinstance(p.grad, numpy.ndarray) for p in net.params())
    assert isinstance(net.stat, numpy.ndarray)
    assert all(link.device == devices.CPU for link in net.links())


@pytest.mark.skipif(devices.gpu_available(), reason='a GPU is usable here')
@pytest.mark.parametrize('spec', [None, 0, 'cuda:1'])
def test_to_gpu_without_gpu_names_the_device(spec):
    with pytest.raises(DeviceError, match='not usable'):
        Net().to_gpu(spec)


def test_to_device_unknown_spec():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        Net().to_device('tpu')


def test_to_device_standin_moves_params_grads_persistents_and_back():
    target = standin.StandInDevice(1)
    net = Net()
    net.add_persistent('stat', numpy.ones(3))
    net.add_persistent('count', 3)
    lazy = Linear(None, 2)
    net.add_link('lazy', lazy)
    net.zerograds()
    expected = snapshot_state(net)
    assert net.to_device(target) is net
    assert all(link.device == target for link in net.links())
    for _, p in net.namedparams(include_uninit=False):
        assert isinstance(p.array, standin.StandInArray) and p.array.device == target
        assert isinstance(p.grad, standin.StandInArray) and p.device == target
    assert isinstance(net.stat, standin.StandInArray) and net.count == 3
    lazy.W.initialize((2, 5))  # created where the link now lives
    assert lazy.W.array.device == target and numpy.isfinite(lazy.W.array.get()).all()
    lazy.W.array = None
    net.to_cpu()
    assert all(isinstance(p.array, numpy.ndarray) for p in net.params(include_uninit=False))
    assert_same_state(expected, snapshot_state(net))


@pytest.mark.gpu
def test_to_gpu_moves_params_grads_persistents_and_back():
    import cupy
    net = Net()
    net.add_persistent('stat', numpy.ones(3))
    net.add_persistent('count', 3)
    uninit = Linear(None, 2)
    net.add_link('lazy', uninit)
    net.zerograds()
    expected = {name: p.array.copy() for name, p in net.namedparams(include_uninit=False)}
    net.to_gpu()
    assert net.device == devices.get_device('cuda:0')
    for name, p in net.namedparams(include_uninit=False):
        assert isinstance(p.array, cupy.ndarray) and isinstance(p.grad, cupy.ndarray)
        numpy.testing.assert_array_equal(p.array.get(), expected[name])
    assert isinstance(net.stat, cupy.ndarray) and net.count == 3
    uninit.W.initialize((2, 5))
    assert isinstance(uninit.W.array, cupy.ndarray)
    net.to_cpu()
    assert all(isinstance(p.array, numpy.ndarray) for p in net.params())
    assert isinstance(net.stat, numpy.ndarray)


# -- serialize -----------------------------------------------------------------------------------


def test_serialize_layout_chain_with_batchnorm():
    chain = Chain(predictor=Net(), bn=BatchNormalization(3))
    state = Recorder()
    chain.serialize(state)
    assert sorted(state.target) == [
        'bn/N', 'bn/avg_mean', 'bn/avg_var', 'bn/beta', 'bn/gamma',
        'predictor/predictor/l1/W', 'predictor/predictor/l1/b',
        'predictor/predictor/l2/W', 'predictor/predictor/l2/b']
    assert state.target['bn/N'] == 0 and type(state.target['bn/N']) is int
    assert state.target['predictor/predictor/l1/W'] is chain.predictor.predictor.l1.W.array


def test_serialize_uninitialized_parameter_passes_none():
    state = Recorder()
    Linear(None, 2).serialize(state)
    assert state.target['W'] is None and state.target['b'].shape == (2,)


def test_load_initializes_uninitialized_parameter():
    link = Linear(None, 2)
    assert link.W.array is None
    w = numpy.arange(6, dtype=numpy.float64).reshape(2, 3)
    link.serialize(FromDict({'W': w, 'b': numpy.ones(2)}))
    assert link.W.shape == (2, 3) and link.W.dtype == numpy.float32  # the parameter's dtype
    numpy.testing.assert_array_equal(link.W.array, w)
    numpy.testing.assert_array_equal(link.b.array, [1, 1])


def test_load_of_new_arrays_replaces_them_and_keeps_grads():
    net = Net()
    net.zerograds()
    old = {name: p.array for name, p in net.namedparams()}
    data = {k: numpy.full_like(v, 3) for k, v in snapshot_state(net).items()}
    net.serialize(FromDict(data, new=True))
    for name, p in net.namedparams():
        assert p.array is not old[name]
        assert (p.array == 3).all() and p.grad is not None and p.grad.shape == p.shape


def test_stored_none_leaves_parameter_alone():
    link = Linear(2, 2, initialW=1.0)
    link.serialize(FromDict({'W': None, 'b': numpy.zeros(2)}))
    assert (link.W.array == 1).all()


# -- Linear and BatchNormalization ----------------------------------------------------------------


def test_linear_shapes_and_forward():
    link = Linear(3, 2, initialW=numpy.ones((2, 3), numpy.float32), initial_bias=0.5)
    numpy.testing.assert_allclose(link(numpy.ones((4, 3), numpy.float32)), numpy.full((4, 2), 3.5))
    assert Linear(3, 2, nobias=True).b is None
    assert [name for name, _ in Linear(3, 2, nobias=True).namedparams()] == ['/W']


def test_linear_default_initializer_is_lecun_normal():
    numpy.random.seed(0)
    w = Linear(400, 300).W.array
    assert w.dtype == numpy.float32 and not numpy.isnan(w).any()
    assert abs(w.std() - math.sqrt(1 / 400)) < 0.005


def test_linear_deferred_shape_from_forward():
    link = Linear(2)
    assert link.W.array is None and link.b.shape == (2,)
    assert link(numpy.ones((1, 5), numpy.float32)).shape == (1, 2)
    assert link.W.shape == (2, 5)


def test_linear_without_sizes_needs_a_loaded_w_before_forward():
    with pytest.raises(TypeError, match=r'Linear\(None\) has no out_size .*: load W first'):
        Linear(None)(numpy.ones((1, 5), numpy.float32))


def test_plain_link_has_no_forward():
    with pytest.raises(NotImplementedError, match='Chain has no forward'):
        Chain()(numpy.zeros(1))


def test_batchnorm_state_and_forward():
    bn = BatchNormalization(3)
    assert [name for name, _ in bn.namedparams()] == ['/beta', '/gamma']
    assert (bn.avg_mean == 0).all() and (bn.avg_var == 1).all() and bn.N == 0
    x = numpy.arange(6, dtype=numpy.float32).reshape(2, 3)
    numpy.testing.assert_allclose(bn(x), x / numpy.sqrt(1 + 2e-5), rtol=1e-6)


# -- files ---------------------------------------------------------------------------------------


@pytest.fixture
def serializers():
    return pytest.importorskip('gpuserial.serializers')


@pytest.fixture(params=['npz', 'h5'])
def fmt(request, serializers):
    """(extension, save, load) of one format."""
    if request.param == 'npz':
        return 'npz', serializers.save_npz, serializers.load_npz
    return 'h5', serializers.save_hdf5, serializers.load_hdf5


def test_round_trip_through_a_file(tmp_path, fmt):
    ext, save, load = fmt
    model = Chain(predictor=Net(), bn=BatchNormalization(3))
    model.bn.avg_mean[...] = [1, 2, 3]
    model.bn.N = 7
    before = snapshot_state(model)
    save(tmp_path / f'model.{ext}', model)
    fresh = Chain(predictor=Net(), bn=BatchNormalization(3))
    for p in fresh.params():
        p.array[...] = 0
    arrays = {name: p.array for name, p in fresh.namedparams()}
    load(tmp_path / f'model.{ext}', fresh)
    assert_same_state(before, snapshot_state(fresh))
    assert {name: p.array for name, p in fresh.namedparams()} == arrays  # loaded in place


def test_uninitialized_parameters_get_values_from_a_file(tmp_path, fmt):
    ext, save, load = fmt
    saved = Chain(l1=Linear(3, 2), bn=BatchNormalization(2))
    saved.bn.avg_var[...] = [4, 5]
    save(tmp_path / f'm.{ext}', saved)
    lazy = Chain(l1=Linear(None, 2), bn=BatchNormalization())
    assert lazy.l1.W.array is None and lazy.bn.gamma.array is None and lazy.bn.avg_var is None
    load(tmp_path / f'm.{ext}', lazy)
    assert_same_state(snapshot_state(saved), snapshot_state(lazy))


def test_uninitialized_parameter_saved_as_none_round_trips(tmp_path, fmt):
    ext, save, load = fmt
    save(tmp_path / f'm.{ext}', Linear(None, 2, initial_bias=3.0))
    target = Linear(None, 2)
    load(tmp_path / f'm.{ext}', target)
    assert target.W.array is None and (target.b.array == 3).all()


def test_load_onto_another_device(tmp_path, fmt):
    ext, save, load = fmt
    saved = Chain(l1=Linear(3, 2), bn=BatchNormalization(2), lazy=Linear(4, 2))
    saved.bn.avg_mean[...] = [1, 2]
    save(tmp_path / f'm.{ext}', saved)
    target = Chain(l1=Linear(3, 2, initialW=0.0), bn=BatchNormalization(2), lazy=Linear(None, 2))
    target.zerograds()
    held = target.l1.W.array
    device = standin.StandInDevice(0)
    load(tmp_path / f'm.{ext}', target, device=device)
    assert not held.any()  # new arrays on the device: the host's are not written
    for name, p in target.namedparams():
        assert p.array.device == device, name
    assert target.l1.W.grad.device == device and target.bn.avg_mean.device == device
    target.to_cpu()
    assert_same_state(snapshot_state(saved), snapshot_state(target))


def test_uninitialized_parameter_loads_where_its_link_lives(tmp_path, fmt):
    ext, save, load = fmt
    save(tmp_path / f'm.{ext}', Linear(3, 2))
    device = standin.StandInDevice(1)
    lazy = Linear(None, 2).to_device(device)
    load(tmp_path / f'm.{ext}', lazy)  # no device=: each array stays where it is
    assert lazy.W.array.device == device and lazy.W.shape == (2, 3)
    other = standin.StandInDevice(0)
    lazy = Linear(None, 2).to_device(device)
    load(tmp_path / f'm.{ext}', lazy, device=other)
    assert lazy.W.array.device == other and lazy.b.array.device == other


def test_save_from_another_device(tmp_path, fmt):
    ext, save, load = fmt
    model = Net()
    expected = snapshot_state(model)
    model.to_device(standin.StandInDevice(1))
    save(tmp_path / f'm.{ext}', model)
    target = Net()
    for p in target.params():
        p.array[...] = -1
    load(tmp_path / f'm.{ext}', target)
    assert_same_state(expected, snapshot_state(target))


def test_failed_load_leaves_model_unchanged(tmp_path, fmt):
    ext, save, load = fmt
    save(tmp_path / f'm.{ext}', Chain(l1=Linear(3, 2, initialW=1.0), l2=Linear(2, 2)))
    target = Chain(l1=Linear(3, 2, initialW=7.0), l2=Linear(3, 2), lazy=Linear(None, 2))
    before = snapshot_state(target)
    with pytest.raises(ValueError):  # l2/W has another shape; l1 comes first
        load(tmp_path / f'm.{ext}', target)
    assert_same_state(before, snapshot_state(target))


def test_failed_load_initializes_no_parameter_and_sets_no_persistent(tmp_path, fmt):
    ext, save, load = fmt
    saved = Chain(a=Linear(3, 2), bn=BatchNormalization(2), z=Linear(3, 2, nobias=True))
    saved.bn.N = 5
    save(tmp_path / f'm.{ext}', saved)
    target = Chain(a=Linear(None, 2), bn=BatchNormalization(2), z=Linear(3, 2))
    with pytest.raises(KeyError, match="'z/b'"):  # a and bn come first
        load(tmp_path / f'm.{ext}', target)
    assert target.a.W.array is None and target.bn.N == 0


# Chainer's own files (tests/data/chainer, made by make_reference.py with Chainer 7.8.1).


def _reference_model(stem):
    if stem == 'linear':
        return Linear(3, 2)
    if stem in ('chain', 'momentum_sgd_model', 'adam_model'):
        return Net()
    if stem == 'chainlist':
        return ChainList(Linear(2, 3), Linear(3, 1))
    if stem == 'bn':
        return BatchNormalization(3)
    if stem == 'uninit':
        return Linear(None, 2)
    raise KeyError(stem)


def _stored_values(path):
    """{key: value} read with numpy / h5py directly (None for Chainer's stored None)."""
    if path.suffix == '.npz':
        with numpy.load(path, allow_pickle=True) as npz:  # trusted test data
            values = {k: npz[k] for k in npz.files}
        return {k: None if v.dtype == object else v for k, v in values.items()}
    values = {}
    with h5py.File(path, 'r') as f:
        f.visititems(lambda k, v: values.__setitem__(k, None if v.shape is None else v[()])
                     if isinstance(v, h5py.Dataset) else None)
    return values


MODEL_FILES = ['linear.npz', 'linear_uncompressed.npz', 'linear.h5', 'chain.npz', 'chain.h5',
               'chainlist.npz', 'chainlist.h5', 'bn.npz', 'bn.h5', 'uninit.npz', 'uninit.h5',
               'momentum_sgd_model.npz', 'adam_model.h5']


@pytest.mark.parametrize('name', MODEL_FILES)
def test_chainer_reference_model_loads_with_equal_values(name, serializers):
    path = CHAINER_DATA / name
    expected = json.loads((CHAINER_DATA / 'expected.json').read_text())[name]
    stem = path.stem.removesuffix('_uncompressed')
    model = _reference_model(stem)
    load = serializers.load_npz if path.suffix == '.npz' else serializers.load_hdf5
    load(path, model)
    state = snapshot_state(model)
    assert set(state) == set(expected)
    stored = _stored_values(path)
    for key, meta in expected.items():
        if meta['is_none']:
            assert state[key] is None and stored[key] is None
            continue
        value = numpy.asarray(state[key])
        assert value.shape == tuple(meta['shape']) and value.dtype == numpy.dtype(meta['dtype'])
        numpy.testing.assert_array_equal(value, stored[key], err_msg=key)
        assert math.isclose(float(value.astype(numpy.float64).sum()), meta['sum'],
                            rel_tol=1e-12, abs_tol=1e-12)
