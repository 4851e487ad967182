"""One fresh process: load_hdf5 of 256 MiB of float32 weights (8 arrays of 32 MiB, normal
values * 0.02) gzipped at level 4 (Chainer's default), best of 3, in seconds, into existing
arrays; argv[1] is the tree to import, argv[2] the file's writer: 'gpuserial' (its own 64 KiB
chunks) or 'chainer' (h5py's chunk shapes, as Chainer's save_hdf5 writes them)."""
import os
import sys
import tempfile
import time

sys.path.insert(0, sys.argv[1])
import h5py  # noqa: E402
import numpy  # noqa: E402

from gpuserial import serializers  # noqa: E402

rng = numpy.random.default_rng(0)
model = {f'w{i}': (rng.standard_normal((2048, 4096)) * 0.02).astype(numpy.float32)
         for i in range(8)}
path = os.path.join(tempfile.mkdtemp(), 'model.h5')
if sys.argv[2] == 'chainer':
    with h5py.File(path, 'w') as f:
        for key, value in model.items():
            f.create_dataset(key, data=value, compression=4)
else:
    serializers.save_hdf5(path, model)
target = {key: numpy.zeros_like(value) for key, value in model.items()}
times = []
for _ in range(3):
    start = time.perf_counter()
    serializers.load_hdf5(path, target)
    times.append(time.perf_counter() - start)
assert all((target[key] == model[key]).all() for key in model)
os.remove(path)
print(f'{min(times):.4f}')
