"""gpuserial against each peer, interleaved round by round, on one set of arrays.

Writes are noisy, so a single pytest-benchmark table is not what to quote: this runs the two
sides of each pair back to back in every round (alternating which goes first), computes the
per-round ratio peer time / gpuserial time (above 1: gpuserial is faster), and reports the
median over the rounds against the issue's target.

    python benchmarks/compare.py --bytes 1GiB --rounds 7
    python benchmarks/compare.py --bytes 128MiB --pairs compressed --rounds 7
    python benchmarks/compare.py --device cuda:0 --bytes 4GiB --json out.json

Untimed, around every timing: a save's old file is removed (and, with ``--sync``, the page
cache's dirty pages are flushed, so that no save pays for the previous one's writeback); a
load's target is zeroed. Every save's file is read back and compared after the first and the
last round, every load's target after each round.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ''):  # run as a script: make `benchmarks` and `gpuserial` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _peers  # noqa: E402
from gpuserial.engine import devices  # noqa: E402
from gpuserial.tools import bench  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str
    group: str
    ours: str
    peer: str
    target: float | None  # the ratio the issue asks for (peer time / our time), None: reported
    max_size_ratio: float | None = None  # our file size / the peer's, at most (compressed)


CPU_PAIRS = [
    Pair('save_npz vs numpy.savez', 'npz', 'gpuserial.save_npz', 'numpy.savez (Chainer)', 2.0),
    Pair('save_npz vs raw write', 'npz', 'gpuserial.save_npz', 'raw write', 0.85),
    Pair('load_npz vs numpy.load+copyto', 'npz', 'gpuserial.load_npz',
         'numpy.load + copyto (Chainer)', 3.0),
    Pair('load_npz vs raw readinto', 'npz', 'gpuserial.load_npz', 'raw readinto', 0.6),
    Pair('save_hdf5 vs h5py create_dataset', 'hdf5', 'gpuserial.save_hdf5',
         'h5py create_dataset', 0.9),
    Pair('load_hdf5 vs h5py read_direct', 'hdf5', 'gpuserial.load_hdf5', 'h5py read_direct',
         0.9),
    Pair('save_npz(compression) vs numpy.savez_compressed', 'compressed',
         'gpuserial.save_npz compressed', 'numpy.savez_compressed (Chainer)', 10.0, 1.01),
    Pair('load_npz compressed vs numpy.load compressed', 'compressed',
         'gpuserial.load_npz compressed', 'numpy.load compressed (Chainer)', 1.3),
    Pair('save_hdf5 gzip vs h5py create_dataset gzip', 'compressed', 'gpuserial.save_hdf5 gzip',
         'h5py create_dataset gzip (Chainer)', None, 1.01),
    Pair('load_hdf5 gzip vs h5py read_direct gzip', 'compressed', 'gpuserial.load_hdf5 gzip',
         'h5py read_direct gzip (Chainer)', None),
    Pair("load_hdf5 gzip of Chainer's file vs h5py read_direct gzip", 'compressed',
         'gpuserial.load_hdf5 gzip (Chainer file)', 'h5py read_direct gzip (Chainer)', None),
    Pair('save_npz durable vs raw write+fsync', 'durable', 'gpuserial.save_npz +fsync',
         'raw write +fsync', None),
    Pair('save_hdf5 durable vs h5py+fsync', 'durable', 'gpuserial.save_hdf5 +fsync',
         'h5py create_dataset +fsync', None),
    Pair('save_npz vs torch.save', 'peers', 'gpuserial.save_npz', 'torch.save', None),
    Pair('save_npz vs safetensors', 'peers', 'gpuserial.save_npz', 'safetensors save_file',
         None),
    Pair('load_npz vs torch.load', 'peers', 'gpuserial.load_npz', 'torch.load', None),
    Pair('load_npz vs safetensors', 'peers', 'gpuserial.load_npz', 'safetensors load_file',
         None),
]

GPU_PAIRS = [
    Pair('save_npz vs Chainer (asnumpy+savez)', 'npz', 'gpuserial.save_npz',
         'numpy.savez (Chainer)', 2.0),
    Pair('load_npz vs Chainer (load+set)', 'npz', 'gpuserial.load_npz',
         'numpy.load + copyto (Chainer)', 2.0),
    Pair('save_npz vs save_npz of a host copy', 'npz', 'gpuserial.save_npz',
         'gpuserial.save_npz of a host copy', 0.9),
    Pair('save_npz vs torch.save', 'peers', 'gpuserial.save_npz', 'torch.save', 1.0),
    Pair('save_npz vs safetensors', 'peers', 'gpuserial.save_npz', 'safetensors save_file', 1.0),
    Pair('load_npz vs torch.load', 'peers', 'gpuserial.load_npz', 'torch.load', 1.0),
    Pair('load_npz vs safetensors', 'peers', 'gpuserial.load_npz', 'safetensors load_file', 1.0),
    Pair('save_npz(compression) vs numpy.savez_compressed', 'compressed',
         'gpuserial.save_npz compressed', 'numpy.savez_compressed (Chainer)', 10.0, 1.01),
    Pair("load_hdf5 gzip of Chainer's file vs Chainer's load_hdf5", 'compressed',
         'gpuserial.load_hdf5 gzip (Chainer file)', 'Chainer load_hdf5 gzip', None),
]

WHOLE_FILE_PAIRS = [  # issue 17: gpuserial.save / gpuserial.load, new arrays, any library
    Pair('save vs safetensors save_file (fsynced)', 'whole', 'gpuserial.save',
         'safetensors save_file +fsync', 1.0),
    Pair('save vs torch.save (fsynced)', 'whole', 'gpuserial.save', 'torch.save +fsync', 1.0),
    Pair('load vs safetensors load_file', 'whole', 'gpuserial.load',
         'safetensors load_file (new arrays)', 0.8),
    Pair('load vs torch.load', 'whole', 'gpuserial.load',
         'torch.load (new tensors)', 1.0),
]
CPU_PAIRS += WHOLE_FILE_PAIRS
GPU_PAIRS += WHOLE_FILE_PAIRS

DEFAULT_GROUPS = ('npz', 'hdf5', 'peers', 'whole')


class Runner:
    """Times operations on one context, with the untimed set-up and checks around them."""

    def __init__(self, ctx: _peers.Context, sync_writes: bool, device_sync):
        self.ctx = ctx
        self.sync_writes = sync_writes
        self.device_sync = device_sync
        self.prepared: set[str] = set()

    def path(self, op: _peers.Op) -> str:
        return self.ctx.path(_peers.file_name(op))

    def time(self, op: _peers.Op, check: bool) -> float:
        path = self.path(op)
        if op.kind == 'save':
            _peers.remove(path)
            if self.sync_writes:
                os.sync()
        else:
            if op.name not in self.prepared:
                op.prepare(self.ctx, path)
                self.prepared.add(op.name)
            self.ctx.clear_target()
        if self.device_sync:
            self.device_sync()
        gc.collect()  # neither side pays for the garbage the other left
        start = time.perf_counter()
        result = op.run(self.ctx, path)
        if self.device_sync:
            self.device_sync()
        seconds = time.perf_counter() - start
        if op.new_arrays:
            self.ctx.check_arrays(result)
        elif op.kind == 'load':
            self.ctx.check_target()
        elif check:
            op.check(self.ctx, path)
        return seconds

    def clean(self, *ops: _peers.Op) -> None:
        for op in ops:
            _peers.remove(self.path(op))
            self.prepared.discard(op.name)

    def file_size(self, op: _peers.Op) -> int:
        return os.path.getsize(self.path(op))


def compare(pairs: list[Pair], ctx: _peers.Context, rounds: int, *, sync_writes: bool = True,
            warmup: int = 1, device_sync=None, log=sys.stdout) -> list[dict]:
    """Runs every pair for ``rounds`` interleaved rounds; returns one result dict per pair."""
    runner = Runner(ctx, sync_writes, device_sync)
    results = []
    for pair in pairs:
        ours, peer = _peers.OPS[pair.ours], _peers.OPS[pair.peer]
        for _ in range(warmup):
            runner.time(ours, check=False)
            runner.time(peer, check=False)
        times: dict[str, list[float]] = {'ours': [], 'peer': []}
        for index in range(rounds):
            check = index in (0, rounds - 1)
            order = (('ours', ours), ('peer', peer))
            for side, op in (order if index % 2 == 0 else order[::-1]):
                times[side].append(runner.time(op, check))
        ratios = [p / o for o, p in zip(times['ours'], times['peer'], strict=True)]
        median = statistics.median(ratios)
        result = {'pair': pair.name, 'group': pair.group, 'ours': ours.name, 'peer': peer.name,
                  'bytes': ctx.nbytes, 'times_ours': times['ours'],
                  'times_peer': times['peer'], 'ratios': ratios, 'median_ratio': median,
                  'ours_gbps': ctx.nbytes / statistics.median(times['ours']) / 1e9,
                  'peer_gbps': ctx.nbytes / statistics.median(times['peer']) / 1e9,
                  'target': pair.target}
        passed = pair.target is None or median >= pair.target
        if pair.max_size_ratio is not None:
            size_ratio = runner.file_size(ours) / runner.file_size(peer)
            result.update(size_ratio=size_ratio, max_size_ratio=pair.max_size_ratio)
            passed = passed and size_ratio <= pair.max_size_ratio
        result['verdict'] = ('info' if pair.target is None
                             else 'PASS' if passed else 'FAIL')
        results.append(result)
        runner.clean(ours, peer)  # keeps the disk use to one pair's files
        print(_line(result), file=log, flush=True)
    return results


def _line(r: dict) -> str:
    ratios = ' '.join(f'{x:.2f}' for x in r['ratios'])
    target = f'>= {r["target"]:.2f}x' if r['target'] is not None else 'no target'
    size = (f'; size {r["size_ratio"]:.4f}x (<= {r["max_size_ratio"]})'
            if 'size_ratio' in r else '')
    return (f'{r["pair"]:<50} median {r["median_ratio"]:6.2f}x ({target}) {r["verdict"]:<4} '
            f'| ours {r["ours_gbps"]:6.2f} GB/s, peer {r["peer_gbps"]:6.2f} GB/s{size} '
            f'| rounds: {ratios}')


def _select(pairs: list[Pair], wanted: list[str], ctx: _peers.Context,
            log) -> list[Pair]:
    chosen = []
    for pair in pairs:
        if pair.group not in wanted and pair.name not in wanted:
            continue
        missing = [n for n in (pair.ours, pair.peer) if not _peers.OPS[n].available(ctx)]
        if missing:
            print(f'{pair.name:<50} skipped: {", ".join(missing)} not available here', file=log)
            continue
        chosen.append(pair)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda:N'")
    parser.add_argument('--bytes', default=os.environ.get('GPUSERIAL_BENCH_BYTES'),
                        help='model size (default $GPUSERIAL_BENCH_BYTES, else 1GiB on the '
                             'CPU and 4GiB on a GPU)')
    parser.add_argument('--rounds', type=int, default=7,
                        help='timed rounds of each pair, both sides alternating (default 7)')
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed rounds of each pair first (default 1)')
    parser.add_argument('--pairs', nargs='+', default=list(DEFAULT_GROUPS),
                        help='groups (npz, hdf5, compressed, durable, peers) or pair names')
    parser.add_argument('--dir', default=None, help='where the files go (a temporary '
                        'directory inside it; default the system temporary directory)')
    parser.add_argument('--no-sync', dest='sync', action='store_false',
                        help='do not flush dirty pages (os.sync) before each timed save')
    parser.add_argument('--json', default=None, help='also write the results to this file')
    args = parser.parse_args(argv)

    device = devices.get_device(args.device)
    on_gpu = not device.backend.is_host
    nbytes = bench.parse_size(args.bytes) if args.bytes else (4 if on_gpu else 1) * bench.GiB
    log = sys.stdout
    info = bench.machine_info()
    print(f'# {time.strftime("%Y-%m-%d %H:%M")}: {info["cpu"]} ({info["cores"]} cores), '
          f'GPU {info["gpu"]["name"] if info["gpu"] else "none"}, device {device.name}; '
          f'model {bench.format_size(nbytes)} float32; {args.rounds} rounds; ratio = peer '
          f'time / gpuserial time', file=log, flush=True)
    with tempfile.TemporaryDirectory(prefix='gpuserial-compare-', dir=args.dir) as directory:
        with device.use():
            ctx = _peers.Context(bench.make_model(nbytes, device=device), directory)
            pairs = _select(GPU_PAIRS if on_gpu else CPU_PAIRS, args.pairs, ctx, log)
            results = compare(pairs, ctx, args.rounds, sync_writes=args.sync,
                              warmup=args.warmup, device_sync=bench.device_sync(device),
                              log=log)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': info, 'date': time.strftime('%Y-%m-%d'), 'device': device.name,
                       'bytes': nbytes, 'rounds': args.rounds, 'sync_writes': args.sync,
                       'results': results}, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
