"""HDF5 saves and loads through the paths this session touched, best of 5 (seconds):
gzip chunks written and read one by one (each direct-chunk call now under h5py's lock), and
10,000 small gzip entries (the plain path, where the fill time is now chosen):

    PYTHONPATH=TREE python ab_h5.py LABEL
"""

import sys
import time

import numpy

from gpuserial import serializers

rng = numpy.random.default_rng(0)
large = {f'l{i}/W': rng.random(4 << 20, dtype=numpy.float32) for i in range(4)}  # 64 MiB
small = {f'l{i:05d}/W': rng.random(1024, dtype=numpy.float32) for i in range(10000)}


def best(run, times: int = 5) -> float:
    took = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        took.append(time.perf_counter() - start)
    return min(took)


def main(label: str) -> None:
    results = {}
    path = '/tmp/ab_h5.h5'
    for name, model in (('64MiB gzip', large), ('10000x4KiB gzip', small)):
        target = {key: numpy.empty_like(value) for key, value in model.items()}
        results[f'{name} save'] = best(
            lambda model=model: serializers.save_hdf5(path, model, compression=4))
        results[f'{name} load'] = best(lambda target=target: serializers.load_hdf5(path, target))
    print(label, ' '.join(f'{k} {v:.3f}' for k, v in results.items()), 's')


if __name__ == '__main__':
    main(sys.argv[1])
