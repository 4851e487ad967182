"""gpuserial: save and load the state of GPU-resident models, Chainer's serializers kept exactly."""

import sys

from gpuserial import serializers
from gpuserial.access import EntryMetadata, LazyFile, LoadReport, load, load_into, save
from gpuserial.access import open as open  # not in __all__: see below
from gpuserial.checkpoints import latest
from gpuserial.engine.asyncsave import SaveHandle, save_async, wait_all
from gpuserial.engine.devices import Device, get_array_module, get_device, gpu_available
from gpuserial.engine.transfer import configure, release_pool
from gpuserial.errors import (
                              CorruptFileError,
                              DeviceError,
                              DtypeMismatchError,
                              GpuserialError,
                              InvalidKeyError,
                              KeyCollisionError,
                              KeyNotFoundError,
                              MismatchError,
                              ReadFailedError,
                              UnsafeCastError,
                              UnsafeFileError,
                              UnstorableValueError,
)
from gpuserial.objects import optimizers, training
from gpuserial.objects.link import BatchNormalization, Chain, ChainList, Linear, Link, Parameter
from gpuserial.objects.optimizers import (
                              SGD,
                              Adam,
                              GradientMethod,
                              MomentumSGD,
                              Optimizer,
                              UpdateRule,
)
from gpuserial.objects.training import (
                              SerialIterator,
                              StandardUpdater,
                              Trainer,
                              get_trigger,
                              snapshot,
                              snapshot_object,
)
from gpuserial.serializer import AbstractSerializer, Deserializer, Serializer, after_load
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

# Chainer's module names: `from gpuserial import optimizers` and `import gpuserial.training` work
sys.modules['gpuserial.optimizers'] = optimizers
sys.modules['gpuserial.training'] = training

__version__ = '0.1.0'

# gpuserial.open is left out of __all__: a star import would hide the builtin open.

__all__ = [
    'SGD', 'AbstractSerializer', 'Adam', 'BatchNormalization', 'Chain', 'ChainList',
    'after_load',
    'CorruptFileError', 'Deserializer', 'Device', 'DeviceError', 'DictionarySerializer',
    'DtypeMismatchError',
    'EntryMetadata', 'LazyFile', 'LoadReport', 'latest', 'load', 'load_into', 'save',
    'GpuserialError', 'GradientMethod', 'HDF5Deserializer', 'HDF5Serializer', 'InvalidKeyError',
    'KeyCollisionError', 'KeyNotFoundError', 'Linear', 'Link', 'MismatchError', 'MomentumSGD',
    'NpzDeserializer', 'Optimizer', 'Parameter', 'ReadFailedError', 'SaveHandle',
    'SerialIterator', 'Serializer', 'StandardUpdater', 'Trainer', 'UnsafeCastError',
    'UnsafeFileError', 'UnstorableValueError', 'UpdateRule', 'configure', 'get_array_module',
    'get_device', 'get_trigger', 'gpu_available', 'load_hdf5', 'load_npz', 'optimizers',
    'release_pool', 'save_hdf5', 'save_async', 'save_npz', 'serialize', 'serializers', 'snapshot',
    'snapshot_object', 'training', 'wait_all',
]
