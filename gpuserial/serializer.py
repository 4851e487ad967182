"""The serializer protocol, as in Chainer: tiny, and imports nothing."""

from __future__ import annotations


class AbstractSerializer:
    """Base of serializers and deserializers.

    An object is serializable when it has ``serialize(serializer)``; inside it, it calls
    ``serializer(key, value)`` for each array or scalar it owns and
    ``child.serialize(serializer[name])`` for each child.
    """

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


def child_path(path: str, key: str) -> str:
    """The path of the child ``key`` under ``path``: ``child_path('a/', '/b/') == 'a/b/'``."""
    return path + key.strip('/') + '/'


def entry_key(path: str, key: str) -> str:
    """The full key of entry ``key`` under ``path``: ``entry_key('a/', '/w') == 'a/w'``."""
    return path + key.lstrip('/')


def is_ignored(key: str, ignore_names) -> bool:
    """Whether ``key`` matches ``ignore_names``: a string, a callable, or a list of them."""
    if ignore_names is None:
        return False
    if isinstance(ignore_names, str) or callable(ignore_names):
        ignore_names = [ignore_names]
    for name in ignore_names:
        if callable(name) and name(key) or isinstance(name, str) and name == key:
            return True
    return False


class DictTarget:
    """A dict of arrays and scalars, serializable: nested dicts are children (``a/b`` keys)."""

    def __init__(self, mapping: dict):
        self.mapping = mapping

    def serialize(self, serializer: AbstractSerializer) -> None:
        for key, value in self.mapping.items():
            if isinstance(value, dict):
                DictTarget(value).serialize(serializer[key])
            else:
                self.mapping[key] = serializer(key, value)


def as_serializable(obj):
    """``obj`` itself when it has ``serialize``, a :class:`DictTarget` when it is a dict."""
    if hasattr(obj, 'serialize'):
        return obj
    if isinstance(obj, dict):
        return DictTarget(obj)
    raise TypeError(f'cannot serialize {type(obj).__name__}: it has no serialize() method '
                    f'and is not a dict')
