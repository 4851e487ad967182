"""``chainer.serializers.hdf5``'s names: the HDF5 serializers of :mod:`gpuserial.formats.hdf5`."""

from gpuserial.formats.hdf5 import HDF5Deserializer, HDF5Serializer, load_hdf5, save_hdf5

__all__ = ['HDF5Deserializer', 'HDF5Serializer', 'load_hdf5', 'save_hdf5']
