"""The serializer protocol, as in Chainer: tiny, and imports nothing but the errors.

Where the caller has imported Chainer, every serializer made here is also an instance of
Chainer's ``Serializer``/``Deserializer``/``AbstractSerializer``: real Chainer objects branch on
``isinstance`` (optimizer state, ``LogReport``, ``Trainer``). Chainer is never imported here;
its classes are taken from ``sys.modules`` once the caller has imported it (its objects cannot
exist before), so ``import gpuserial`` does not pay for importing Chainer.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

from gpuserial.errors import InvalidKeyError, UnstorableValueError


class AbstractSerializer:
    """Base of serializers and deserializers.

    An object is serializable when it has ``serialize(serializer)``; inside it, it calls
    ``serializer(key, value)`` for each array or scalar it owns and
    ``child.serialize(serializer[name])`` for each child.
    """

    def __new__(cls, *args, **kwargs):
        return super().__new__(_with_chainer_bases(cls))

    def __getitem__(self, key: str) -> AbstractSerializer:
        """Returns a child serializer for the sub-path ``key``."""
        raise NotImplementedError

    def __call__(self, key: str, value):
        """Stores (serializer) or restores (deserializer) ``value`` under ``key``."""
        raise NotImplementedError


class Serializer(AbstractSerializer):
    """Base of serializers: ``__call__`` stores ``value`` and returns it."""

    def save(self, obj) -> None:
        """Saves an object (or a dict) by calling its ``serialize`` method with this serializer."""
        as_serializable(obj).serialize(self)


class Deserializer(AbstractSerializer):
    """Base of deserializers: ``__call__`` copies stored data into ``value`` and returns it."""

    def load(self, obj) -> None:
        """Loads an object (or a dict) by calling its ``serialize`` method with this one."""
        as_serializable(obj).serialize(self)

    def after_load(self, apply: Callable[[], None]) -> None:
        """Runs ``apply`` once the load has succeeded (see :func:`after_load`); here at once.
        gpuserial's loads hold it back until every entry is checked and every array filled."""
        apply()


def after_load(serializer: AbstractSerializer, apply: Callable[[], None]) -> None:
    """How a ``serialize`` sets what a load returned (a count, a new array): ``apply`` runs once
    the load has succeeded, where ``serializer`` holds such changes back (gpuserial's loads, so
    that a failed load changes nothing), else at once (a save, Chainer's deserializers)."""
    hold = getattr(serializer, 'after_load', None)
    if hold is None:
        apply()
    else:
        hold(apply)


_CHAINER_MODULE = 'chainer.serializer'
_chainer_classes: dict[tuple[type, type], type] = {}


def saves(serializer: AbstractSerializer) -> bool:
    """Whether ``serializer`` saves: gpuserial's serializers, and Chainer's (which are not
    gpuserial's) once the caller has imported Chainer."""
    return _is_a(serializer, Serializer, 'Serializer')


def loads(serializer: AbstractSerializer) -> bool:
    """Whether ``serializer`` loads: gpuserial's deserializers, and Chainer's."""
    return _is_a(serializer, Deserializer, 'Deserializer')


def _is_a(serializer: AbstractSerializer, ours: type, name: str) -> bool:
    chainers = getattr(sys.modules.get(_CHAINER_MODULE), name, None)
    return isinstance(serializer, ours) or (chainers is not None
                                            and isinstance(serializer, chainers))


def _with_chainer_bases(cls: type) -> type:
    """``cls``, or once Chainer is imported, a subclass of ``cls`` and Chainer's matching base."""
    chainer = sys.modules.get(_CHAINER_MODULE)
    base = getattr(chainer, 'AbstractSerializer', None)
    if chainer is None or base is None or issubclass(cls, base):
        return cls
    if issubclass(cls, Serializer):
        base = chainer.Serializer
    elif issubclass(cls, Deserializer):
        base = chainer.Deserializer
    if (cls, base) not in _chainer_classes:
        _chainer_classes.setdefault((cls, base), type(cls.__name__, (cls, base), {
            '__module__': cls.__module__, '__qualname__': cls.__qualname__,
            '__doc__': cls.__doc__}))
    return _chainer_classes[cls, base]


def child_path(path: str, key: str) -> str:
    """The path of the child ``key`` under ``path``: ``child_path('a/', '/b/') == 'a/b/'``."""
    return path + _checked(key, path).strip('/') + '/'


def entry_key(path: str, key: str) -> str:
    """The full key of entry ``key`` under ``path``: ``entry_key('a/', '/w') == 'a/w'``."""
    if type(key) is not str:
        key = str(_checked(key, path))  # a str subclass; anything else raises
    return _string_entry_key(path, key)


@functools.lru_cache(maxsize=1 << 16)  # the same keys come back save after save
def _string_entry_key(path: str, key: str) -> str:
    return path + _checked(key, path).lstrip('/')


def _checked(key, path: str) -> str:
    if not isinstance(key, str):
        hint = (" (a torch optimizer's state_dict() has int keys and lists of settings: it is "
                "not a dict of values gpuserial saves)" if isinstance(key, int) else '')
        raise InvalidKeyError(f'key {key!r} under path {path!r} is not a string (it is of '
                              f'type {type(key).__name__}): keys are strings{hint}')
    if not key.strip('/'):
        raise InvalidKeyError(f'key {key!r} under path {path!r} is empty')
    if '\x00' in key:  # HDF5 and numpy.load would cut the name there
        raise InvalidKeyError(f'key {key!r} under path {path!r} holds a NUL character')
    if not key.isascii():
        try:
            key.encode('utf-8')
        except UnicodeEncodeError as error:  # NPZ and HDF5 store names as UTF-8
            raise InvalidKeyError(f'key {key!r} under path {path!r} is not UTF-8 text: it '
                                  f'holds {error.object[error.start]!r}, a lone surrogate (a '
                                  f'name decoded with errors=\'surrogateescape\'?)') from None
    return key


def is_ignored(key: str, ignore_names) -> bool:
    """Whether ``key`` matches ``ignore_names``: a string (the whole key), a callable on the key,
    or a list or tuple of them.

    Raises:
        ValueError: an item is neither a string nor a callable (as in Chainer).
    """
    if ignore_names is None:
        return False
    if not isinstance(ignore_names, (list, tuple)):
        ignore_names = (ignore_names,)
    for name in ignore_names:
        if isinstance(name, str):
            if name == key:
                return True
        elif callable(name):
            if name(key):
                return True
        else:
            raise ValueError(f'ignore_names needs strings, callables or a list of them; got '
                             f'{name!r}')
    return False


class DictTarget:
    """A dict of arrays and scalars, serializable: nested dicts are children (``a/b`` keys).

    A load fills arrays in place; other values it returns (scalars, arrays for entries that
    held None) are set in the dicts once it has succeeded (:func:`after_load`). A stored None
    leaves its entry as it is.
    """

    def __init__(self, mapping: dict):
        self.mapping = mapping

    def serialize(self, serializer: AbstractSerializer) -> None:
        self._serialize(self.mapping, serializer)

    def _serialize(self, mapping: dict, serializer: AbstractSerializer) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict):
                self._serialize(value, serializer[key])
                continue
            result = serializer(key, value)
            if result is not value and result is not None:
                after_load(serializer, functools.partial(mapping.__setitem__, key, result))


def keeps_returned_arrays(obj) -> bool:
    """Whether ``obj.serialize`` keeps the arrays a deserializer returns (not only scalars).

    Chainer's links ignore what ``serializer(key, array)`` returns for an array they hold (the
    load is in place). gpuserial's own objects and dicts keep it, and say so with a class
    attribute ``keeps_returned_arrays = True``; a load with ``device=`` hands such objects new
    arrays made on that device, and loads every other object in place, then moves it.
    """
    return isinstance(obj, DictTarget) or getattr(type(obj), 'keeps_returned_arrays', None) is True


def object_as_value_error(where: str, obj) -> UnstorableValueError | None:
    """The error for ``obj`` handed to a serializer as a value when it is an object that holds
    values (a link or a torch module in a dict), saying how to save it; else None."""
    if hasattr(obj, 'serialize'):
        how = ('save it with save_npz(file, obj) or save_hdf5, or as a child of the object '
               'saved')
    elif callable(getattr(obj, 'state_dict', None)):
        how = 'save its state_dict()'
    else:
        return None
    return UnstorableValueError(f'{where}: an object ({type(obj).__name__}), not a value: '
                                f'{how}; a dict holds arrays, numbers, strings, None and dicts')


def as_serializable(obj):
    """``obj`` itself when it has ``serialize``, a :class:`DictTarget` when it is a dict."""
    if hasattr(obj, 'serialize'):
        return obj
    if isinstance(obj, dict):
        return DictTarget(obj)
    swapped = (f' ({obj!r} looks like a file: the file comes first, as in save_npz(file, '
               f'obj))' if isinstance(obj, (str, bytes, os.PathLike)) else
               ' (a torch module: pass its state_dict(), whose tensors load in place)'
               if callable(getattr(obj, 'state_dict', None)) else '')
    raise TypeError(f'cannot serialize {type(obj).__name__}: it has no serialize() method '
                    f'and is not a dict{swapped}')
