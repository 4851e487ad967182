"""gpuserial: save and load the state of GPU-resident models, Chainer's serializers kept exactly."""

from gpuserial import serializers
from gpuserial.devices import Device, get_array_module, get_device, gpu_available
from gpuserial.errors import (
                              CorruptFileError,
                              DeviceError,
                              GpuserialError,
                              KeyNotFoundError,
                              MismatchError,
                              UnsafeCastError,
                              UnsafeFileError,
)
from gpuserial.serializer import AbstractSerializer, Deserializer, Serializer
from gpuserial.serializers import (
                              DictionarySerializer,
                              HDF5Deserializer,
                              HDF5Serializer,
                              NpzDeserializer,
                              load_hdf5,
                              load_npz,
                              save_hdf5,
                              save_npz,
                              serialize,
)
from gpuserial.transfer import configure, release_pool

__version__ = '0.1.0'

__all__ = [
    'AbstractSerializer', 'CorruptFileError', 'Device', 'DeviceError', 'Deserializer',
    'DictionarySerializer', 'GpuserialError', 'HDF5Deserializer', 'HDF5Serializer',
    'KeyNotFoundError', 'MismatchError', 'NpzDeserializer', 'Serializer', 'UnsafeCastError',
    'UnsafeFileError', 'configure', 'get_array_module', 'get_device', 'gpu_available',
    'load_hdf5', 'load_npz', 'release_pool', 'save_hdf5', 'save_npz', 'serialize',
    'serializers',
]
