"""One process's model-shaped save (save_npz, stored, not durable), median of 7, in
milliseconds, from the tree given as the first argument; the model and GPT-2's width scale
as benchmarks/small_entries.py names them.

    for i in $(seq 6); do python ab_model.py OLD resnet50+adam
                          python ab_model.py NEW resnet50+adam; done
    python ab_model.py TREE gpt2-small+adam 0.5
"""

import os
import statistics
import sys
import time

ROOT = sys.argv[1]
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..'))

import gpuserial  # noqa: E402
from benchmarks import small_entries  # noqa: E402
from gpuserial.engine import devices  # noqa: E402

assert gpuserial.__file__.startswith(ROOT), gpuserial.__file__
scale = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
model = small_entries.make(small_entries.MODELS[sys.argv[2]](scale), devices.get_device('cpu'))
path = f'/tmp/ab-model-{os.getpid()}.npz'
times = []
for _ in range(7):
    if os.path.exists(path):
        os.remove(path)
    start = time.perf_counter()
    gpuserial.save_npz(path, model, compression=False, durable=False)
    times.append(time.perf_counter() - start)
os.remove(path)
print(statistics.median(times) * 1e3)
