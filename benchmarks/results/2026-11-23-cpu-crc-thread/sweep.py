import os, sys, time, statistics, numpy
from gpuserial import serializers, _zipstream, bench
DURABLE = sys.argv[1] == 'durable'
ROUNDS = int(sys.argv[2])
MODES = sys.argv[3:]
model = bench.make_model(1 << 30)
D = '/work/main/.bench-ab'; os.makedirs(D, exist_ok=True)
res = {m: [] for m in MODES}
original_write = _zipstream.ZipWriter._write
def run(mode):
    kind, _, piece = mode.partition(':')
    path = f'{D}/{kind}{piece}.npz'
    if os.path.exists(path): os.unlink(path)
    os.sync()
    piece = int(piece or 0)
    _zipstream.OVERLAP_BYTES = (1 << 20) if kind == 'thread' else (1 << 62)
    _zipstream.PIECE = piece if kind == 'inline' else 1 << 18
    def piecewise(self, data):
        data = memoryview(data).cast('B')
        for s in range(0, len(data), piece):
            original_write(self, data[s:s + piece])
    _zipstream.ZipWriter._write = piecewise if kind == 'thread' else original_write
    t = time.perf_counter()
    if kind == 'raw':
        with open(path, 'wb') as f:
            for a in model.values(): f.write(memoryview(numpy.ascontiguousarray(a)).cast('B'))
            if DURABLE:
                f.flush(); os.fsync(f.fileno())
        if DURABLE:
            fd = os.open(D, os.O_RDONLY); os.fsync(fd); os.close(fd)
    else:
        serializers.save_npz(path, model, compression=False, durable=DURABLE)
    res[mode].append(time.perf_counter() - t)
for r in range(ROUNDS):
    for k in (MODES if r % 2 == 0 else MODES[::-1]): run(k)
print('durable' if DURABLE else 'page cache')
for k, v in res.items():
    print(f'{k:16} median {statistics.median(v):.3f} min {min(v):.3f}', [round(x, 2) for x in v])
