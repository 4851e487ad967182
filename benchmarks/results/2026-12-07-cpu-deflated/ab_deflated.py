"""Best of 5 save_npz and load_npz, in us an entry, of 10,000 float32 arrays of 4 KiB, stored
and deflated (Chainer's default), from the tree given as the first argument (see
ab_deflated.sh)."""

import gc
import os
import sys
import time

import numpy

sys.path.insert(0, sys.argv[1])
import gpuserial  # noqa: E402

rng = numpy.random.default_rng(0)
model = {f'p{i:05d}/W': rng.standard_normal(1024, dtype='float32') for i in range(10000)}
path = f'/tmp/ab-deflated-{os.getpid()}.npz'
figures = []
for compression in (False, True):
    saves, loads = [], []
    for _ in range(5):
        gc.collect()
        start = time.perf_counter()
        gpuserial.save_npz(path, model, compression=compression, durable=False)
        saves.append(time.perf_counter() - start)
        gc.collect()
        start = time.perf_counter()
        gpuserial.load_npz(path, model)
        loads.append(time.perf_counter() - start)
    figures += [min(saves) / 1e4 * 1e6, min(loads) / 1e4 * 1e6]
os.remove(path)
print(' '.join(f'{figure:.3f}' for figure in figures))
