"""One fresh process: save_hdf5 (gzip level 4, Chainer's default) of 32 MiB of float32 weights
(8 arrays of 4 MiB, normal values), best of 3, in seconds; the tree to import is argv[1]."""
import os
import sys
import tempfile
import time

sys.path.insert(0, sys.argv[1])
import numpy  # noqa: E402

from gpuserial import serializers  # noqa: E402

rng = numpy.random.default_rng(0)
model = {f'w{i}': rng.standard_normal(1 << 20).astype(numpy.float32) for i in range(8)}
path = os.path.join(tempfile.mkdtemp(), 'model.h5')
times = []
for _ in range(3):
    start = time.perf_counter()
    serializers.save_hdf5(path, model)
    times.append(time.perf_counter() - start)
os.remove(path)
print(f'{min(times):.4f}')
