"""Name for name with ``chainer.serializers``: ``from gpuserial import serializers``.

The submodules ``npz`` and ``hdf5`` hold the same names as Chainer's, so that
``from gpuserial.serializers import npz`` works where ``from chainer.serializers import npz`` did.
"""

from gpuserial.serializers import hdf5, npz
from gpuserial.serializers.hdf5 import HDF5Deserializer, HDF5Serializer, load_hdf5, save_hdf5
from gpuserial.serializers.npz import (
    DictionarySerializer,
    NpzDeserializer,
    load_npz,
    save_npz,
    serialize,
)

__all__ = ['DictionarySerializer', 'HDF5Deserializer', 'HDF5Serializer', 'NpzDeserializer', 'hdf5',
           'load_hdf5', 'load_npz', 'npz', 'save_hdf5', 'save_npz', 'serialize']
