"""The ranged GETs (count, bytes) and the time of a load from the modelled store (20 ms a
request, 90 MB/s a connection) of a real model's shapes:
    PYTHONPATH=TREE python count_gets.py 10000x4KiB"""
import sys, time, numpy, fsspec.core, gpuserial
from benchmarks import remote as br
from gpuserial.storage import remote
name = sys.argv[1]
fs = br._modelled_store(0.02, 90e6)
shapes = br.real_model_shapes(name)
rng = numpy.random.default_rng(0)
model = {k: rng.random(s, dtype=numpy.float32) for k, s in shapes.items()}
f = fsspec.core.OpenFile(fs, 'bench/ours.npz')
gpuserial.save(f, model)
size = fs.store['/bench/ours.npz'].getbuffer().nbytes if '/bench/ours.npz' in fs.store else None
gets = []
cls = type(fs.open('bench/ours.npz', 'rb', cache_type='none'))
orig = cls._fetch_range
def counting(self, start, stop):
    gets.append((start, stop, time.monotonic()))
    return orig(self, start, stop)
cls._fetch_range = counting
t = time.monotonic(); out = gpuserial.load(f); el = time.monotonic() - t
print(name, 'file', size, 'GETs', len(gets), 'bytes', sum(b - a for a, b, _ in gets), f'{el:.2f}s')
target = {k: numpy.empty_like(v) for k, v in model.items()}
gets.clear()
from gpuserial import serializers
t = time.monotonic(); serializers.load_npz(f, target); el = time.monotonic() - t
print(' load_npz into existing: GETs', len(gets), 'bytes', sum(b - a for a, b, _ in gets), f'{el:.2f}s')
