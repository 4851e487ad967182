"""One fresh process: save_npz(compression=True) of 128 MiB of float32 weights (16 arrays of 8
MiB, normal values) to a file, then load_npz of the file this tree wrote (written by the newer
tree, given as argv[2], so both load the same bytes) into existing arrays; best of 3 each, in
seconds. The tree to import is argv[1]."""
import os
import sys
import tempfile
import time

sys.path.insert(0, sys.argv[1])
import numpy  # noqa: E402

from gpuserial import serializers  # noqa: E402

rng = numpy.random.default_rng(0)
model = {f'w{i}': rng.standard_normal(2 << 20).astype(numpy.float32) for i in range(16)}
path = os.path.join(tempfile.mkdtemp(), 'model.npz')


def best(call):
    times = []
    for _ in range(3):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


save = best(lambda: serializers.save_npz(path, model, compression=True))
target = {key: numpy.empty_like(value) for key, value in model.items()}
load = best(lambda: serializers.load_npz(sys.argv[2], target))
assert all(numpy.array_equal(target[key], model[key]) for key in model)
os.remove(path)
print(f'{save:.4f} {load:.4f}')
