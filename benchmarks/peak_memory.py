"""Peak extra host memory of each save and load, each measured in a fresh process.

    python benchmarks/peak_memory.py --bytes 1GiB
    python benchmarks/peak_memory.py --device cuda:0 --bytes 4GiB --json peak.json

One process prepares the files that the loads read. Then, for every case, a new process
imports what it needs, builds the model (and, for loads, a zeroed target of the same arrays,
its pages touched), and takes its resident set size as the baseline. It resets the kernel's
high-water mark (``/proc/self/clear_refs``, where the kernel allows it; else it samples the RSS
every millisecond from a thread), runs the operation once, and reports the high-water mark less
the baseline: host memory the operation needed beyond the model itself (file pages in the page
cache are not counted: they are not the process's). A load into new arrays on the host is
charged beyond the arrays it returns. On a GPU it also reports how much CuPy's
memory pool grew (the issue asks for none on a load).

The issue's target: under 32 MiB extra for a 1 GiB model on the CPU; on a GPU, no more than
the staging pool plus 32 MiB for a 4 GiB model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

if __package__ in (None, ''):  # run as a script: make `benchmarks` and `gpuserial` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _peers  # noqa: E402
from gpuserial.engine import devices, transfer  # noqa: E402
from gpuserial.tools import bench  # noqa: E402

MiB = bench.MiB
TARGET_EXTRA = 32 * MiB
DEFAULT_CASES = [
    'gpuserial.save_npz', 'gpuserial.save_npz compressed', 'gpuserial.save_hdf5',
    'gpuserial.load_npz', 'gpuserial.load_npz compressed', 'gpuserial.load_hdf5',
    'numpy.savez (Chainer)', 'numpy.load + copyto (Chainer)', 'raw write', 'raw readinto',
    'h5py create_dataset', 'h5py read_direct', 'torch.save', 'torch.load',
    'safetensors save_file', 'safetensors load_file',
    'gpuserial.load', 'safetensors load_file (new arrays)', 'torch.load (new tensors)',
]
OURS = 'gpuserial.'


def _status() -> dict[str, int]:
    values = {}
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(('VmRSS:', 'VmHWM:')):
                key, value = line.split(':')
                values[key] = int(value.split()[0]) * 1024
    return values


def _reset_high_water() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """The RSS's maximum, sampled every millisecond (where the high-water mark cannot reset)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _status()['VmRSS'])
            time.sleep(0.001)


def _context(args) -> _peers.Context:
    device = devices.get_device(args.device)
    model = bench.make_model(args.bytes, device=device)
    return _peers.Context(model, args.dir)


def _pool_bytes(device) -> int | None:
    if device.backend.is_host:
        return None
    return device.xp.get_default_memory_pool().total_bytes()


def child(args) -> dict:
    """Measures one case in this (fresh) process."""
    op = _peers.OPS[args.child]
    if op.needs:
        __import__(op.needs)
    device = devices.get_device(args.device)
    with device.use():
        ctx = _context(args)
        path = ctx.path(_peers.file_name(op))
        if op.kind == 'load':
            ctx.clear_target()  # the target's pages are resident, as a model's are
        else:
            _peers.remove(path)
        sync = bench.device_sync(device)
        if sync:
            sync()
        gc.collect()
        pool_before = _pool_bytes(device)
        baseline = _status()['VmRSS']
        sampler = None
        if not _reset_high_water():
            sampler = _Sampler()
            sampler.start()
        start = time.perf_counter()
        result = op.run(ctx, path)
        if sync:
            sync()
        seconds = time.perf_counter() - start
        if sampler is not None:
            sampler.stop.set()
            sampler.join()
            peak = max(sampler.peak, _status()['VmRSS'])
        else:
            peak = _status()['VmHWM']
        pool_after = _pool_bytes(device)
        returned = 0  # a load into new arrays: their bytes, on the host, are not extra
        if op.new_arrays:
            ctx.check_arrays(result)
            returned = ctx.nbytes if device.backend.is_host else 0
        elif op.kind == 'load':
            ctx.check_target()
        else:
            op.check(ctx, path)
        return {'case': op.name, 'kind': op.kind, 'bytes': ctx.nbytes, 'seconds': seconds,
                'baseline_rss': baseline, 'peak_rss': peak,
                'extra': peak - baseline - returned, 'returned': returned,
                'method': 'VmHWM reset' if sampler is None else 'sampled VmRSS',
                'device_pool_growth': (None if pool_before is None
                                       else pool_after - pool_before),
                'staging_pool_bytes': (transfer.settings().chunk_bytes
                                       * transfer.settings().buffers)}


def prepare(args) -> None:
    """Writes the files the load cases read."""
    device = devices.get_device(args.device)
    with device.use():
        ctx = _context(args)
        for name in args.cases:
            op = _peers.OPS[name]
            if op.kind == 'load' and op.available(ctx):
                op.prepare(ctx, ctx.path(_peers.file_name(op)))


def _run_child(args, extra: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, os.path.abspath(__file__), '--bytes', str(args.bytes),
               '--device', args.device, '--dir', args.dir, *extra]
    environment = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment['PYTHONPATH'] = os.pathsep.join(
        p for p in (root, environment.get('PYTHONPATH')) if p)
    return subprocess.run(command, capture_output=True, text=True, env=environment)


def _verdict(result: dict, on_gpu: bool) -> str:
    if not result['case'].startswith(OURS):
        return 'info'
    allowed = TARGET_EXTRA + (result['staging_pool_bytes'] if on_gpu else 0)
    ok = result['extra'] < allowed
    if on_gpu and result['kind'] == 'load':
        ok = ok and not result['device_pool_growth']
    return 'PASS' if ok else 'FAIL'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda:N'")
    parser.add_argument('--bytes', default=os.environ.get('GPUSERIAL_BENCH_BYTES'),
                        help='model size (default $GPUSERIAL_BENCH_BYTES, else 1GiB on the '
                             'CPU and 4GiB on a GPU)')
    parser.add_argument('--cases', nargs='+', default=DEFAULT_CASES, metavar='CASE',
                        help='the operations to measure, each in a fresh process (default: '
                             'all of them: ' + ', '.join(repr(c) for c in DEFAULT_CASES) + ')')
    parser.add_argument('--dir', default=None, help='where the files go (default: a '
                        'temporary directory)')
    parser.add_argument('--json', default=None, help='also write the results to this file')
    parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--prepare', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    on_gpu = not devices.get_device(args.device).backend.is_host
    args.bytes = (bench.parse_size(args.bytes) if args.bytes
                  else (4 if on_gpu else 1) * bench.GiB)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.prepare:
        prepare(args)
        return 0

    info = bench.machine_info()
    print(f'# {time.strftime("%Y-%m-%d %H:%M")}: peak extra host memory, fresh process per '
          f'case; {info["cpu"]}, GPU {info["gpu"]["name"] if info["gpu"] else "none"}, device '
          f'{args.device}; model {bench.format_size(args.bytes)}; target < 32 MiB'
          f'{" + staging pool" if on_gpu else ""}', flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix='gpuserial-peak-', dir=args.dir) as directory:
        args.dir = directory
        probe = _peers.Context({'x': devices.get_device(args.device).send(
            __import__('numpy').zeros(1, 'f4'))}, directory)
        cases = []
        for name in args.cases:
            op = _peers.OPS[name]
            if not op.available(probe):
                print(f'{name:<36} skipped: not available here')
            else:
                cases.append(name)
        args.cases = cases
        done = _run_child(args, ['--prepare', '--cases', *cases])
        if done.returncode:
            print(done.stdout + done.stderr, file=sys.stderr)
            return 1
        for name in cases:
            done = _run_child(args, ['--child', name])
            if done.returncode:
                print(f'{name:<36} FAILED:\n{done.stderr}', flush=True)
                results.append({'case': name, 'error': done.stderr[-2000:]})
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result['verdict'] = _verdict(result, on_gpu)
            results.append(result)
            pool = (f', device pool +{result["device_pool_growth"] / MiB:.1f} MiB'
                    if result['device_pool_growth'] is not None else '')
            print(f'{name:<36} extra {result["extra"] / MiB:8.1f} MiB  {result["verdict"]:<4} '
                  f'({result["kind"]}, {result["seconds"]:.2f} s, baseline '
                  f'{result["baseline_rss"] / MiB:.0f} MiB, {result["method"]}{pool})',
                  flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': info, 'date': time.strftime('%Y-%m-%d'),
                       'device': args.device, 'bytes': args.bytes, 'results': results}, f,
                      indent=2)
    return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
