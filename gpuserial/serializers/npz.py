"""``chainer.serializers.npz``'s names: the NPZ serializers of :mod:`gpuserial.formats.npz`."""

from gpuserial.formats.npz import (
    DictionarySerializer,
    NpzDeserializer,
    load_npz,
    save_npz,
    serialize,
)

__all__ = ['DictionarySerializer', 'NpzDeserializer', 'load_npz', 'save_npz', 'serialize']
