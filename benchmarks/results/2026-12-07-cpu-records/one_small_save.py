"""One process's small save: 10,000 float32 arrays of 4 KiB with save_npz (stored, not durable),
best of 5, in microseconds an entry, from the tree given as the first argument.

    for i in $(seq 10); do python one_small_save.py OLD; python one_small_save.py NEW; done
"""

import gc
import os
import sys
import time

import numpy

sys.path.insert(0, sys.argv[1])
import gpuserial  # noqa: E402

COUNT = 10000
rng = numpy.random.default_rng(0)
model = {f'updater/model:main/p{i}/W': rng.random(1024, dtype='float32') for i in range(COUNT)}
path = f'/tmp/one-small-save-{os.getpid()}.npz'
times = []
for _ in range(5):
    if os.path.exists(path):
        os.remove(path)
    os.sync()
    gc.collect()
    start = time.perf_counter()
    gpuserial.save_npz(path, model, compression=False, durable=False)
    times.append(time.perf_counter() - start)
os.remove(path)
print(min(times) / COUNT * 1e6)
