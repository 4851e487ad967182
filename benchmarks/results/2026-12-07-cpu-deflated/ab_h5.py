"""save_hdf5 of a ResNet-50 + Adam shaped model (compression=0, durable=False), best and median
of 5 in seconds, from the tree given as the first argument; run alternately with the base tree
(the model's shapes come from this checkout's benchmarks)."""

import gc
import os
import sys
import time

import numpy

sys.path.insert(0, sys.argv[1])
sys.path.insert(1, os.path.abspath(os.path.join(os.path.dirname(__file__), '../../..')))
import gpuserial  # noqa: E402
from benchmarks.small_entries import resnet50  # noqa: E402

rng = numpy.random.default_rng(0)
model = {key: numpy.asarray(rng.standard_normal(shape, dtype='float32') if shape else
                            numpy.float32(1))
         for key, shape in resnet50().items()}
path = f'/tmp/ab-h5-{os.getpid()}.h5'
times = []
for _ in range(5):
    if os.path.exists(path):
        os.remove(path)
    os.sync()
    gc.collect()
    start = time.perf_counter()
    gpuserial.save_hdf5(path, model, compression=0, durable=False)
    times.append(time.perf_counter() - start)
os.remove(path)
print(f'{min(times):.3f} {sorted(times)[2]:.3f}')
