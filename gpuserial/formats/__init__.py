"""The file formats: NPZ and HDF5 serializers (``npz``, ``hdf5``), the deserializer they
share (``loading``), and the pieces under NPZ: ``.npy`` headers (``_npy``), zip members written
as streams (``_zipstream``) and read back checked (``_zipread``)."""
