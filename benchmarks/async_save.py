"""Asynchronous saves in a training-shaped loop: how long the caller is blocked per save.

    python benchmarks/async_save.py                           # CPU, 1 GiB, host staging
    python benchmarks/async_save.py --device cuda:0 --json out.json

Every round saves the same model in turn, alternating the order: a synchronous durable
``save_npz`` (the caller blocked for the whole save), ``save_async`` (durable; blocked while it
stages, then the loop computes in the main thread, matrix products of ``--compute-ms`` each,
until the save commits), one plain host copy of the state (new arrays: what any host snapshot
costs) and, on the CPU, a copy into arrays touched before (as the staging memory kept from one
save to the next is). Where torch is installed, ``torch.distributed.checkpoint.async_save`` of
the same state runs beside them. It reports the medians of the blocked times and of the
per-round ratios. Last, in one more round, the peak extra host memory of an asynchronous save
with ``--peak-budget`` as its budget (the kernel's high-water mark, reset first).

Targets (issue 14): on the CPU, blocked <= 10% of the synchronous durable save, or <= 1.25x
the plain copy; on a GPU (device staging), <= 2% of the synchronous save and <= DCP's blocked
time. Peak extra host memory <= ``max_host_bytes`` + one chunk (host staging).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import numpy

if __package__ in (None, ''):  # run as a script: make `benchmarks` and `gpuserial` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpuserial  # noqa: E402
from gpuserial.engine import devices, transfer  # noqa: E402
from gpuserial.tools import bench  # noqa: E402

CPU_TARGETS = {'async / sync': 0.10, 'async / copy': 1.25}  # either passes, on the CPU
GPU_TARGETS = {'async / sync': 0.02, 'async / dcp': 1.0}  # both, on a GPU


def _compute(milliseconds: float) -> None:
    """A training step's work in the main thread: matrix products for about ``milliseconds``."""
    a = numpy.ones((256, 256), numpy.float32)
    end = time.perf_counter() + milliseconds / 1000
    while time.perf_counter() < end:
        a = (a @ a) * (1 / 256)


def _host_copy(model: dict) -> list:
    return [devices.to_host(a).copy() if devices.backend_of(a).is_host else devices.to_host(a)
            for a in model.values()]


class _Dcp:
    """torch.distributed.checkpoint.async_save, one process group of one rank (gloo)."""

    def __init__(self, model: dict, directory: str):
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(('127.0.0.1', 0))
                port = s.getsockname()[1]
            dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0,
                                    world_size=1)
        self.dcp = dcp
        self.state = {key: torch.from_dlpack(value) if not devices.backend_of(value).is_host
                      else torch.from_numpy(value) for key, value in model.items()}
        self.directory = directory
        self.count = 0

    def save(self) -> float:
        self.count += 1
        target = os.path.join(self.directory, f'dcp{self.count % 2}')
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        future = self.dcp.async_save(self.state, checkpoint_id=target)
        blocked = time.perf_counter() - start
        future.result()
        return blocked


def run(args) -> dict:
    device = devices.get_device(args.device)
    on_gpu = not device.backend.is_host
    model = bench.make_model(args.bytes, device=device)
    sync_device = bench.device_sync(device) or (lambda: None)
    directory = args.dir or tempfile.mkdtemp(prefix='gpuserial-async-')
    staging = 'device' if on_gpu else 'host'
    dcp = None
    dcp_why = 'torch is not installed'
    try:
        dcp = _Dcp(model, directory)
        dcp.save()  # a warm-up, and a failure here is reported instead of the rows
    except Exception as error:  # noqa: BLE001 - reported, not fatal
        dcp = None
        dcp_why = f'{type(error).__name__}: {error}'
    times: dict[str, list[float]] = {'sync': [], 'async': [], 'copy': [], 'commit': []}
    if dcp:
        times['dcp'] = []

    def sync_save():
        start = time.perf_counter()
        gpuserial.save_npz(os.path.join(directory, 'sync.npz'), model, compression=False)
        times['sync'].append(time.perf_counter() - start)

    def async_save():
        start = time.perf_counter()
        handle = gpuserial.save_async(os.path.join(directory, 'async.npz'), model,
                                      compression=False, staging=staging,
                                      max_host_bytes=args.max_host_bytes or args.bytes * 2)
        times['async'].append(time.perf_counter() - start)
        while not handle.done():  # training goes on while it writes
            _compute(args.compute_ms)
        handle.result()
        times['commit'].append(time.perf_counter() - start)

    def plain_copy():
        start = time.perf_counter()
        copies = _host_copy(model)
        times['copy'].append(time.perf_counter() - start)
        del copies

    ways = [sync_save, async_save, plain_copy]
    if not on_gpu:  # the floor: a copy into memory touched before (as the staging arena is)
        kept = [numpy.empty_like(a) for a in model.values()]
        times['copyto'] = []

        def copy_into_kept():
            start = time.perf_counter()
            for out, array in zip(kept, model.values(), strict=True):
                numpy.copyto(out, array)
            times['copyto'].append(time.perf_counter() - start)
        ways.append(copy_into_kept)
    if dcp:
        ways.append(lambda: times['dcp'].append(dcp.save()))
    for index in range(args.rounds):
        order = ways if index % 2 == 0 else ways[::-1]
        for way in order:
            sync_device()
            gc.collect()
            os.sync()
            way()
    medians = {key: statistics.median(values) for key, values in times.items() if values}
    ratios = {name: statistics.median(a / b for a, b in zip(times['async'], times[peer],
                                                             strict=True))
              for name, peer in [('async / sync', 'sync'), ('async / copy', 'copy'),
                                 ('async / copyto', 'copyto'), ('async / dcp', 'dcp')]
              if times.get(peer)}
    targets = GPU_TARGETS if on_gpu else CPU_TARGETS
    checked = {name: (ratios[name], bound) for name, bound in targets.items() if name in ratios}
    passed = ([value <= bound for value, bound in checked.values()])
    verdict = 'PASS' if passed and (any(passed) if not on_gpu else all(passed)) else 'FAIL'
    peak = _peak_extra(model, directory, staging, args.peak_budget)
    chunk = transfer.settings().chunk_bytes
    peak['verdict'] = ('PASS' if peak['extra'] is not None
                       and peak['extra'] <= peak['budget'] + chunk else 'FAIL')
    if not args.dir:
        shutil.rmtree(directory, ignore_errors=True)
    return {'machine': bench.machine_info(), 'device': args.device, 'bytes': args.bytes,
            'staging': staging, 'rounds': args.rounds, 'seconds': times, 'medians': medians,
            'ratios': ratios, 'targets': targets, 'verdict': verdict,
            'dcp': None if dcp else dcp_why, 'peak': peak}


def _peak_extra(model: dict, directory: str, staging: str, budget: int) -> dict:
    """The high-water mark of the resident set during one asynchronous save, less before."""
    gc.collect()
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        return {'budget': budget, 'extra': None, 'why': 'cannot reset the high-water mark'}
    baseline = _status('VmRSS')
    gpuserial.save_async(os.path.join(directory, 'peak.npz'), model, compression=False,
                         staging=staging, max_host_bytes=budget).result()
    return {'budget': budget, 'extra': _status('VmHWM') - baseline}


def _status(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu', help="where the model lives: 'cpu' "
                        "(default) or 'cuda:N'")
    parser.add_argument('--bytes', default='1GiB', help='model size (default 1GiB)')
    parser.add_argument('--rounds', type=int, default=7,
                        help='timed rounds per case (default 7)')
    parser.add_argument('--compute-ms', type=float, default=20.0,
                        help='the training step each save overlaps, in ms (default 20)')
    parser.add_argument('--max-host-bytes', default=None,
                        help='the staging budget of the timed rounds (default: the model)')
    parser.add_argument('--peak-budget', default='256MiB',
                        help='the staging budget of the peak-memory round')
    parser.add_argument('--dir', default=None, help='where the files go (default: a '
                        'temporary directory)')
    parser.add_argument('--json', default=None, help='also write the results to this file')
    args = parser.parse_args(argv)
    args.bytes = bench.parse_size(args.bytes)
    args.max_host_bytes = bench.parse_size(args.max_host_bytes) if args.max_host_bytes else None
    args.peak_budget = bench.parse_size(args.peak_budget)
    report = run(args)
    info = report['machine']
    print(f'# {time.strftime("%Y-%m-%d %H:%M")}: {info["cpu"]}, GPU '
          f'{info["gpu"]["name"] if info["gpu"] else "none"}, device {args.device}; model '
          f'{bench.format_size(args.bytes)}; {args.rounds} rounds; {report["staging"]} staging')
    for key, value in report['medians'].items():
        print(f'{key:8s} median {value:8.4f} s  (rounds: '
              f'{" ".join(f"{s:.4f}" for s in report["seconds"][key])})')
    if report['dcp']:
        print(f'dcp      skipped: {report["dcp"]}')
    for name, value in report['ratios'].items():
        bound = report['targets'].get(name)
        print(f'{name:14s} {value:7.3f}' + (f'  (<= {bound})' if bound else '  (info)'))
    print(f'blocked time: {report["verdict"]} '
          f'({"either target" if not info["gpu"] else "both targets"})')
    peak = report['peak']
    extra = 'n/a' if peak['extra'] is None else f'{peak["extra"] / bench.MiB:.1f} MiB'
    print(f'peak extra host memory, budget {bench.format_size(peak["budget"])}: {extra} '
          f'(<= budget + one chunk) {peak["verdict"]}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
