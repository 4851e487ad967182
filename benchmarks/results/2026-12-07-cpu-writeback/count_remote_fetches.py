"""A load of ResNet-50 + Adam (compressed NPZ, as Chainer's save_npz writes by default) from the
modelled store of benchmarks/remote.py (20 ms a request, 90 MB/s a connection): its time, its
ranged GETs and the bytes they fetched. Run with the checkout to measure first on sys.path:

    python benchmarks/results/2026-12-07-cpu-writeback/count_remote_fetches.py [CHECKOUT]
"""
import collections
import sys
import time

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else '.')
import fsspec.core  # noqa: E402
import numpy  # noqa: E402

import gpuserial  # noqa: E402
from benchmarks import remote  # noqa: E402

shapes = remote.real_model_shapes('resnet50+adam')
rng = numpy.random.default_rng(0)
model = {k: numpy.asarray(rng.standard_normal(s, dtype=numpy.float32)) for k, s in shapes.items()}
fs = remote._modelled_store(0.02, 90e6)
file = fsspec.core.OpenFile(fs, 'bench/ours.npz')
gpuserial.save(file, model, compression=True)
stats = collections.Counter()
Ranged = type(fs._open('bench/ours.npz'))
fetch_range = Ranged._fetch_range


def counting(self, start, end):
    stats['gets'] += 1
    stats['bytes'] += end - start
    return fetch_range(self, start, end)


Ranged._fetch_range = counting
started = time.perf_counter()
loaded = gpuserial.load(file)
print(f'{time.perf_counter() - started:.2f} s, {stats["gets"]} GETs, {stats["bytes"]} bytes '
      f'fetched, file {fs.size("bench/ours.npz")} bytes')
assert all(loaded[key].tobytes() == value.tobytes() for key, value in model.items())
