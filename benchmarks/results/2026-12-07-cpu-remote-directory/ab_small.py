"""10,000 x 4 KiB local saves and loads (the Chainer calls, into existing arrays), best of 5,
us an entry:

    PYTHONPATH=TREE python ab_small.py LABEL
"""

import sys
import time

import numpy

from gpuserial import serializers

rng = numpy.random.default_rng(0)
model = {f'l{i:05d}/W': rng.random(1024, dtype=numpy.float32) for i in range(10000)}
target = {key: numpy.empty_like(value) for key, value in model.items()}


def best(run, times: int = 5) -> float:
    took = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        took.append(time.perf_counter() - start)
    return min(took) / len(model) * 1e6


def main(label: str) -> None:
    results = {}
    for fmt, save, load in (
            ('npz', lambda p: serializers.save_npz(p, model, compression=False, durable=False),
             serializers.load_npz),
            ('h5', lambda p: serializers.save_hdf5(p, model, compression=0),
             serializers.load_hdf5)):
        path = f'/tmp/ab_small.{fmt}'
        results[f'{fmt} save'] = best(lambda save=save, path=path: save(path))
        results[f'{fmt} load'] = best(lambda load=load, path=path: load(path, target))
    print(label, ' '.join(f'{k} {v:.2f}' for k, v in results.items()), 'us/entry')


if __name__ == '__main__':
    main(sys.argv[1])
