"""The protocol module: key paths, ignore_names, dict targets, and Chainer's scalar/array rules."""

import re
import sys
import types

import numpy
import pytest

import gpuserial
from gpuserial import serializers
from gpuserial.errors import KeyNotFoundError, MismatchError, UnsafeCastError
from gpuserial.serializer import (
    AbstractSerializer,
    Deserializer,
    Serializer,
    as_serializable,
    child_path,
    entry_key,
    is_ignored,
)


@pytest.mark.parametrize(('path', 'key', 'expected'), [
    ('', 'x', 'x/'), ('', '/x/', 'x/'), ('a/', '/b/', 'a/b/'), ('a/', 'b', 'a/b/'),
])
def test_child_path_strips_slashes(path, key, expected):
    assert child_path(path, key) == expected


@pytest.mark.parametrize(('path', 'key', 'expected'), [
    ('', 'w', 'w'), ('', '/w', 'w'), ('a/', '//w', 'a/w'), ('a/b/', 'c/d', 'a/b/c/d'),
])
def test_entry_key_strips_leading_slashes(path, key, expected):
    assert entry_key(path, key) == expected


@pytest.mark.parametrize(('names', 'ignored'), [
    (None, False), ('l1/W', True), ('l1/b', False), (lambda k: k.endswith('/W'), True),
    (['x', lambda k: k.startswith('l1')], True), (['x', 'y'], False), (('x', 'l1/W'), True),
    ('W', False), ('l1', False), ('/l1/W', False), ('l1/W/', False),  # whole keys only
])
def test_ignore_names_forms(names, ignored):
    assert is_ignored('l1/W', names) is ignored


@pytest.mark.parametrize('names', [3, [None], ['x', 1.5]])
def test_ignore_names_of_another_kind_is_an_error(names):
    with pytest.raises(ValueError, match='ignore_names needs strings, callables or a list'):
        is_ignored('l1/W', names)


def test_abstract_serializer_is_abstract():
    with pytest.raises(NotImplementedError):
        AbstractSerializer()['x']
    with pytest.raises(NotImplementedError):
        AbstractSerializer()('x', 1)


class Recorder(Serializer):
    def __init__(self, calls, path=''):
        self.calls, self.path = calls, path

    def __getitem__(self, key):
        return Recorder(self.calls, child_path(self.path, key))

    def __call__(self, key, value):
        self.calls.append(entry_key(self.path, key))
        return value


class Loader(Deserializer):
    """A deserializer that hands back ten times what it is given, recording each key."""

    def __init__(self, calls, path=''):
        self.calls, self.path = calls, path

    def __getitem__(self, key):
        return Loader(self.calls, child_path(self.path, key))

    def __call__(self, key, value):
        self.calls.append(entry_key(self.path, key))
        return value * 10


def test_save_and_load_call_serialize_once():
    class Obj:
        a, b, count = 1, 2, 0

        def serialize(self, s):
            self.count += 1
            self.a = s('a', self.a)
            self.b = s['child']('/b', self.b)

    calls, obj = [], Obj()
    Recorder(calls).save(obj)
    assert calls == ['a', 'child/b'] and (obj.a, obj.b, obj.count) == (1, 2, 1)
    calls = []
    Loader(calls).load(obj)
    assert calls == ['a', 'child/b'] and (obj.a, obj.b, obj.count) == (10, 20, 2)
    target = {'a': 1, 'child': {'b': 2}}
    Loader([]).load(target)  # a dict gets what the load returned
    assert target == {'a': 10, 'child': {'b': 20}}
    assert issubclass(Deserializer, AbstractSerializer)


def test_dict_target_flattens_nested_dicts():
    calls = []
    Recorder(calls).save(as_serializable({'a': 1, 'b': {'c': 2, 'd': {'e': 3}}}))
    assert calls == ['a', 'b/c', 'b/d/e']


def test_as_serializable_refuses_other_objects():
    with pytest.raises(TypeError, match='int'):
        as_serializable(3)


class Model:
    """A tiny serializable object: an array, scalars, a child."""

    def __init__(self):
        self.w = numpy.arange(6, dtype=numpy.float32).reshape(2, 3)
        self.t = 5
        self.name = 'model'
        self.child = Child()

    def serialize(self, serializer):
        serializer('w', self.w)
        self.t = serializer('t', self.t)
        self.name = serializer('name', self.name)
        self.child.serialize(serializer['child'])


class Child:
    def __init__(self):
        self.v = numpy.ones(4, numpy.float64)
        self.none = None

    def serialize(self, serializer):
        serializer('v', self.v)
        self.none = serializer('none', self.none)


def test_serialize_returns_flat_dict_of_host_arrays():
    target = serializers.serialize(Model())
    assert sorted(target) == ['child/none', 'child/v', 'name', 't', 'w']
    assert target['t'].dtype == numpy.int64 and target['t'].shape == ()
    assert target['child/none'].dtype == object and target['child/none'][()] is None
    assert str(target['name']) == 'model'


def test_npz_deserializer_reads_a_mapping():
    source = Model()
    source.w += 1
    source.t = 9
    flat = serializers.serialize(source)
    target = Model()
    serializers.NpzDeserializer(flat).load(target)
    numpy.testing.assert_array_equal(target.w, source.w)
    assert target.t == 9 and type(target.t) is int


def test_npz_deserializer_path_loads_a_subtree():
    flat = {'outer/v': numpy.full(4, 7.0), 'outer/none': numpy.asarray(None)}
    child = Child()
    serializers.NpzDeserializer(flat, path='outer/').load(child)
    numpy.testing.assert_array_equal(child.v, 7.0)


def test_stored_none_returns_none_and_leaves_value():
    w = numpy.ones(3)
    assert serializers.NpzDeserializer({'w': numpy.asarray(None)})('w', w) is None
    numpy.testing.assert_array_equal(w, 1)


def test_value_none_returns_the_stored_array():
    got = serializers.NpzDeserializer({'w': numpy.arange(3)})('w', None)
    numpy.testing.assert_array_equal(got, [0, 1, 2])


@pytest.mark.parametrize(('stored', 'value', 'expected'), [
    (numpy.int64(3), 0, 3), (numpy.float64(1.5), 0.0, 1.5), (numpy.bool_(True), False, True),
    (numpy.asarray('abc'), '', 'abc'), (numpy.int32(4), numpy.int64(0), 4),
    (numpy.uint64(2**63), 0, 2**63),  # any integer fits a Python int, as in Chainer
])
def test_scalars_cast_safely(stored, value, expected):
    got = serializers.NpzDeserializer({'k': numpy.asarray(stored)})('k', value)
    assert got == expected and type(got) is type(value)


@pytest.mark.parametrize(('stored', 'value'), [
    (numpy.float32(1.5), 0), (numpy.int64(3), numpy.uint32(0)), (numpy.float64(1), numpy.int8(0)),
    (numpy.int64(1), False),
])
def test_unsafe_scalar_cast_raises_type_error(stored, value):
    with pytest.raises(TypeError, match=r"key 'k'.*does not cast safely") as info:
        serializers.NpzDeserializer({'k': numpy.asarray(stored)})('k', value)
    assert isinstance(info.value, UnsafeCastError)


def test_array_cast_follows_same_kind():
    value = numpy.zeros(3, numpy.float16)
    serializers.NpzDeserializer({'k': numpy.arange(3, dtype=numpy.float32)})('k', value)
    numpy.testing.assert_array_equal(value, [0, 1, 2])
    with pytest.raises(ValueError, match=r"key 'k'.*complex128.*float16") as info:
        serializers.NpzDeserializer({'k': numpy.ones(3, complex)})('k', value)
    assert isinstance(info.value, MismatchError)
    assert isinstance(info.value, TypeError)  # as numpy.copyto raises it in Chainer


@pytest.mark.parametrize('stored, target', [
    (numpy.array(['héllo', 'b']), 'U3'),  # cut short
    (numpy.array([b'hello', b'b']), 'S3'),
    (numpy.array(['ab', 'c']), 'S5')])  # str into bytes: would fail on non-ASCII text
def test_text_loads_only_into_text_that_holds_it_whole(stored, target):
    value = numpy.zeros(2, target)
    with pytest.raises(MismatchError, match=r"key 'k': stored dtype .* does not cast to the "
                                            r"target dtype .*text only into text at least as "
                                            r"wide"):
        serializers.NpzDeserializer({'k': stored})('k', value)
    assert value.tolist() == numpy.zeros(2, target).tolist()
    wide = numpy.zeros(2, 'U8')
    serializers.NpzDeserializer({'k': numpy.array([b'ab', b'c'])})('k', wide)  # bytes fit
    assert wide.tolist() == ['ab', 'c']


def test_shape_must_match_exactly_no_broadcasting():
    with pytest.raises(ValueError, match=r"key 'k': stored shape \(1, 3\) does not match the "
                                         r"target shape \(2, 3\)"):
        serializers.NpzDeserializer({'k': numpy.ones((1, 3))})('k', numpy.zeros((2, 3)))


def test_missing_key_is_a_key_error_under_strict():
    with pytest.raises(KeyError, match=r"key 'a/k': not in the file") as info:
        serializers.NpzDeserializer({}, path='a/')('k', 1)
    assert isinstance(info.value, KeyNotFoundError)
    assert serializers.NpzDeserializer({}, strict=False)('k', 1) == 1


def test_ignore_names_skips_entries():
    value = numpy.zeros(2)
    got = serializers.NpzDeserializer({'c/k': numpy.ones(2)}, ignore_names='c/k')['c']('k', value)
    assert got is value
    numpy.testing.assert_array_equal(value, 0)


@pytest.fixture
def fake_chainer(monkeypatch):
    """A stand-in for ``chainer.serializer`` in sys.modules, as once the caller imports Chainer."""
    module = types.ModuleType('chainer.serializer')

    class AbstractSerializer:
        pass

    class Serializer(AbstractSerializer):
        pass

    class Deserializer(AbstractSerializer):
        pass

    module.AbstractSerializer, module.Serializer = AbstractSerializer, Serializer
    module.Deserializer = Deserializer
    monkeypatch.setitem(sys.modules, 'chainer.serializer', module)
    return module


def test_serializers_take_chainers_bases_once_chainer_is_imported(tmp_path, fake_chainer):
    serializers.save_npz(tmp_path / 'm.npz', {'w': numpy.ones(2)})
    with numpy.load(tmp_path / 'm.npz') as npz:
        deserializer = serializers.NpzDeserializer(npz)
        assert isinstance(deserializer, fake_chainer.Deserializer)
        assert isinstance(deserializer['child'], fake_chainer.Deserializer)
        assert not isinstance(deserializer, fake_chainer.Serializer)
        assert isinstance(deserializer, serializers.NpzDeserializer)
        assert type(deserializer).__name__ == 'NpzDeserializer'
    serializer = serializers.DictionarySerializer()
    assert isinstance(serializer, fake_chainer.Serializer)
    assert isinstance(serializer['x'], fake_chainer.Serializer)
    assert type(serializers.DictionarySerializer()) is type(serializer)  # made once per class


def test_serializers_are_plain_without_chainer(monkeypatch):
    monkeypatch.delitem(sys.modules, 'chainer.serializer', raising=False)
    serializer = serializers.DictionarySerializer()
    assert type(serializer) is serializers.DictionarySerializer


def test_a_load_calls_serialize_once_with_one_deserializer(tmp_path):
    serializers.save_npz(tmp_path / 'm.npz', {'w': numpy.ones(2), 'n': 3})
    calls = []

    class Obj:
        w, n = numpy.zeros(2), 0

        def serialize(self, serializer):
            calls.append(serializer)
            serializer('w', self.w)
            assert (self.w == 0).all()  # in-place fills wait until serialize has returned
            self.n = serializer('n', self.n)

    obj = Obj()
    serializers.load_npz(tmp_path / 'm.npz', obj)
    assert len(calls) == 1 and isinstance(calls[0], serializers.NpzDeserializer)
    assert (obj.w == 1).all() and obj.n == 3


def test_keys_that_are_not_strings_are_refused_and_str_subclasses_taken_as_str():
    from gpuserial.errors import InvalidKeyError

    class Name(str):
        pass

    serializer = serializers.DictionarySerializer()
    with pytest.raises(InvalidKeyError,
                       match=r"key \['a'\] under path '' is not a string \(it is of type list\)"):
        serializer(['a'], numpy.zeros(1))  # unhashable, too
    serializer(Name('/w'), numpy.zeros(1))
    assert [type(key) for key in serializer.target] == [str]
    assert list(serializer.target) == ['w']


@pytest.mark.parametrize('save', [serializers.save_npz, serializers.save_hdf5])
@pytest.mark.parametrize('state', [{'w\x00eights': numpy.ones(1)},  # an entry, a child
                                   {'a\x00': {'w': numpy.ones(1)}}])
def test_a_key_holding_nul_is_refused_not_cut_short(tmp_path, save, state):
    from gpuserial.errors import InvalidKeyError
    path = tmp_path / 'm'
    with pytest.raises(InvalidKeyError, match=re.escape(f"{str(path)!r}, key ") + ".*"
                       "holds a NUL character"):
        save(path, state)
    assert not path.exists()


@pytest.mark.parametrize('save', [serializers.save_npz, serializers.save_hdf5])
@pytest.mark.parametrize('state', [{'w\udcffeights': numpy.ones(1)},  # an entry, a child
                                   {'a\ud800': {'w': numpy.ones(1)}}])
def test_a_key_that_is_not_utf8_text_is_refused_naming_the_file(tmp_path, save, state):
    """A lone surrogate (os.listdir's name of undecodable bytes) has no UTF-8 form for a zip
    or HDF5 name: it was a bare UnicodeEncodeError (NPZ) or TypeError (HDF5)."""
    from gpuserial.errors import InvalidKeyError
    path = tmp_path / 'm'
    with pytest.raises(InvalidKeyError, match=re.escape(f"{str(path)!r}, key ") + ".* is not "
                       "UTF-8 text: it holds '\\\\ud[8c][0f][0f]', a lone surrogate"):
        save(path, state)
    assert not path.exists()


def test_the_base_classes_leave_their_abstract_methods_to_subclasses():
    """A serializer, format reader or array backend that forgets a method fails loudly."""
    from gpuserial.engine import devices
    from gpuserial.formats import loading
    from gpuserial.serializer import AbstractSerializer
    calls = [
        lambda: AbstractSerializer()['x'],
        lambda: AbstractSerializer()('x', 1),
        lambda: loading.Reader().entry('x'),
        lambda: loading.Reader().read_into(None, None),
        lambda: loading.Reader().read_whole(None, memoryview(b'')),
        lambda: devices.Backend().owns(1),
        lambda: devices.Backend().device_of(1),
        lambda: devices.Backend().empty((1,), numpy.float32, devices.CPU),
        lambda: devices.Backend().send(1, devices.CPU),
        lambda: devices.Backend().to_host_async(None, 0, None, None),
        lambda: devices.Backend().from_host_async(None, None, 0, None),
        lambda: devices.Backend().record(None),
        lambda: devices.Backend().to_numpy(1),
    ]
    for call in calls:
        with pytest.raises(NotImplementedError):
            call()


@pytest.mark.parametrize('save', [serializers.save_npz, serializers.save_hdf5],
                         ids=['npz', 'hdf5'])
def test_a_save_with_its_arguments_swapped_says_the_file_comes_first(tmp_path, save):
    """A Chainer user's slip: save(model, 'model.npz'). Nothing is written."""
    class Model:
        def serialize(self, serializer):
            serializer('w', numpy.ones(2))

    path = str(tmp_path / 'model.npz')
    with pytest.raises(TypeError, match=re.escape(f"cannot serialize str: it has no serialize() "
                                                  f"method and is not a dict ({path!r} looks "
                                                  f"like a file: the file comes first")):
        save(Model(), path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match=r'cannot serialize int: .* is not a dict$'):
        save(str(tmp_path / 'other.npz'), 3)


def test_a_torch_module_is_pointed_to_its_state_dict(tmp_path):
    """load_into(file, model) with a torch module said only that it has no serialize()
    method; its state_dict() is what loads (in place)."""
    class Module:  # as torch.nn.Module
        def state_dict(self):
            return {}

    serializers.save_npz(tmp_path / 'm.npz', {'w': numpy.ones(2)})
    with pytest.raises(TypeError, match=re.escape('cannot serialize Module: it has no serialize() '
                                                  'method and is not a dict (a torch module: pass '
                                                  'its state_dict(), whose tensors load in '
                                                  'place)')):
        gpuserial.load_into(tmp_path / 'm.npz', Module())
