"""Saves and loads to S3 (moto's server on loopback), gpuserial against its peers.

gpuserial.save / gpuserial.load of a model to ``s3://`` against ``torch.save`` into
``fs.open(..., 'wb')`` / ``torch.load`` from ``fs.open(..., 'rb')``, and safetensors'
``save`` bytes + ``fs.pipe`` / ``fs.cat`` + ``load``. On loopback the network costs little,
so the ratios measure each client's own overhead (serialization, copies, request pattern):
the part gpuserial controls. Also: the requests a save makes (no CopyObject; bytes uploaded
against the payload) and, in a fresh process, the peak resident memory a save adds (VmHWM).

    python -m benchmarks.remote --bytes 1GiB --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import time

import numpy

import gpuserial
from gpuserial.distributed import load_sharded, save_sharded
from gpuserial.storage import remote
from gpuserial.tools import bench

CREDENTIALS = {'AWS_DEFAULT_REGION': 'us-east-1', 'AWS_ACCESS_KEY_ID': 'bench',
               'AWS_SECRET_ACCESS_KEY': 'bench'}
PEAK_SLACK = 32 << 20  # the bound: pool + upload buffers + 32 MiB


def _server():
    os.environ.update(CREDENTIALS)
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, {'client_kwargs': {'endpoint_url': f'http://{host}:{port}'}}


def _filesystem(options: dict):
    import s3fs
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir('bench')
    return fs


def _cases(fs, options: dict, model: dict) -> dict:
    """name -> (save, load, check of the loaded value)."""
    first = next(iter(model))

    def ours_save():
        gpuserial.save('s3://bench/ours.npz', model, storage_options=options)

    def ours_load():
        return gpuserial.load('s3://bench/ours.npz', storage_options=options)[first]

    cases = {'gpuserial': (ours_save, ours_load)}
    try:
        import torch
        tensors = {key: torch.from_numpy(value) for key, value in model.items()}

        def torch_save():
            with fs.open('bench/torch.pt', 'wb') as f:
                torch.save(tensors, f)

        def torch_load():
            with fs.open('bench/torch.pt', 'rb') as f:
                return torch.load(f, weights_only=True)[first].numpy()

        cases['torch.save + fs.open'] = (torch_save, torch_load)
    except ImportError:
        pass
    try:
        import safetensors.numpy

        def safetensors_save():
            fs.pipe('bench/model.safetensors', safetensors.numpy.save(model))

        def safetensors_load():
            return safetensors.numpy.load(fs.cat('bench/model.safetensors'))[first]

        cases['safetensors + fs.pipe'] = (safetensors_save, safetensors_load)
    except ImportError:
        pass
    return cases


def _modelled_store(latency: float, rate: float):
    """An in-memory store whose every request costs a round trip (``latency`` seconds) plus
    its bytes at one connection's ``rate`` (bytes/s), as sleeps, which release the GIL, so
    that requests in flight overlap as on a real object store. Reads through ``open`` fetch
    blocks of 50 MiB ahead, as s3fs does by default; ``cache_type='none'`` reads what is
    asked for."""
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.spec import AbstractBufferedFile

    def cost(nbytes: int) -> None:
        time.sleep(latency + nbytes / rate)

    class Ranged(AbstractBufferedFile):
        def _fetch_range(self, start, end):
            data = self.fs.store[self.path].getbuffer()[start:end].tobytes()
            cost(len(data))
            return data

    class ModelledStore(MemoryFileSystem):
        protocol = 'modelled'
        store: dict = {}  # its own, not memory://'s
        pseudo_dirs = ['']

        def cat_file(self, path, start=None, end=None, **kwargs):
            data = super().cat_file(path, start, end, **kwargs)
            cost(len(data))
            return data

        def _open(self, path, mode='rb', block_size=None, autocommit=True,
                  cache_options=None, cache_type='readahead', **kwargs):
            if 'r' not in mode:
                return super()._open(path, mode, block_size, autocommit, cache_options, **kwargs)
            path = self._strip_protocol(path)
            if path not in self.store:
                raise FileNotFoundError(path)
            return Ranged(self, path, mode, block_size or 50 << 20, cache_type=cache_type,
                          size=self.store[path].getbuffer().nbytes)

    return ModelledStore()


def _modelled_loads(model: dict, rounds: int, latency: float, rate: float) -> dict:
    """Loads through :func:`_modelled_store`: gpuserial with its fetches in flight, and with
    one at a time, against torch.load from fs.open and safetensors from fs.cat; medians."""
    import fsspec.core
    fs = _modelled_store(latency, rate)
    first = next(iter(model))
    ours_file = fsspec.core.OpenFile(fs, 'bench/ours.npz')
    gpuserial.save(ours_file, model)
    cases = {}

    def ours():
        return gpuserial.load(ours_file)[first]

    def ours_serial():
        in_flight = remote.FETCHES_IN_FLIGHT, remote.SMALL_FETCHES_IN_FLIGHT
        remote.FETCHES_IN_FLIGHT = remote.SMALL_FETCHES_IN_FLIGHT = 1
        try:
            return ours()
        finally:
            remote.FETCHES_IN_FLIGHT, remote.SMALL_FETCHES_IN_FLIGHT = in_flight

    cases['gpuserial'] = ours
    cases['gpuserial, one GET at a time'] = ours_serial
    sharded = 'modelled://bench/sharded'
    fsspec.register_implementation('modelled', type(fs), clobber=True)
    save_sharded(sharded, model, _OneRank(), durable=False)

    def ours_sharded():  # one rank's file, loaded by one rank
        target = {key: numpy.empty_like(value) for key, value in model.items()}
        load_sharded(sharded, target, _OneRank())
        return target[first]

    cases['gpuserial load_sharded'] = ours_sharded
    try:
        import torch
        buffer = io.BytesIO()
        torch.save({key: torch.from_numpy(value) for key, value in model.items()}, buffer)
        fs.pipe('bench/torch.pt', buffer.getvalue())
        del buffer

        def torch_load():
            with fs.open('bench/torch.pt', 'rb') as f:
                return torch.load(f, weights_only=True)[first].numpy()

        cases['torch.load from fs.open'] = torch_load
    except ImportError:
        pass
    try:
        import safetensors.numpy
        fs.pipe('bench/model.safetensors', safetensors.numpy.save(model))
        cases['safetensors from fs.cat'] = (
            lambda: safetensors.numpy.load(fs.cat('bench/model.safetensors'))[first])
    except ImportError:
        pass
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, load in cases.items():
            took, value = _timed(load)
            assert numpy.asarray(value).tobytes() == model[first].tobytes(), name
            seconds[name].append(took)
            del value
    fs.store.clear()
    return {name: statistics.median(times) for name, times in seconds.items()}


class _OneRank:
    """A communicator of one rank (no MPI needed)."""

    rank, size = 0, 1

    def allgather(self, obj):
        return [obj]

    def bcast(self, obj, root=0):
        return obj


def _timed(function) -> tuple[float, object]:
    gc.collect()
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def _requests(fs, options: dict, model: dict) -> dict:
    """The S3 operations and uploaded bytes of one gpuserial save."""
    calls: list[tuple[str, int]] = []

    def record(params, model, **_):
        body = params.get('Body')
        size = body.getbuffer().nbytes if isinstance(body, io.BytesIO) else len(body or b'')
        calls.append((model.name, size))

    fs.connect()
    fs.s3.meta.events.register('before-parameter-build.s3', record)
    gpuserial.save('s3://bench/requests.npz', model, storage_options=options)
    fs.s3.meta.events.unregister('before-parameter-build.s3', record)
    operations: dict[str, int] = {}
    for name, _ in calls:
        operations[name] = operations.get(name, 0) + 1
    payload = bench.model_nbytes(model)
    uploaded = sum(size for _, size in calls)
    return {'operations': operations, 'payload': payload, 'uploaded': uploaded,
            'uploaded_ratio': uploaded / payload if payload else None,
            'copy_requests': operations.get('CopyObject', 0) + operations.get('UploadPartCopy', 0)}


def _status(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_child(nbytes: int, endpoint: str) -> dict:
    """In this (fresh) process, against the parent's server: the resident high-water mark one
    save adds to the model's."""
    os.environ.update(CREDENTIALS)
    options = {'client_kwargs': {'endpoint_url': endpoint}}
    model = bench.make_model(nbytes)
    gpuserial.save('s3://bench/warm.npz', {'w': numpy.ones(4)}, storage_options=options)
    gc.collect()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current resident set
    baseline = _status('VmRSS')
    gpuserial.save('s3://bench/peak.npz', model, storage_options=options)
    extra = _status('VmHWM') - baseline
    block = remote.upload_block(nbytes)
    # NumPy arrays: no pinned pool. The upload buffer is s3fs's: its block, and the copy of it
    # it takes to send as a part (BytesIO.read), so two blocks.
    bound = 2 * block + PEAK_SLACK
    return {'bytes': nbytes, 'extra': extra, 'upload_block': block, 'bound': bound,
            'verdict': 'PASS' if extra <= bound else 'FAIL'}


REAL_MODELS = ('resnet50+adam', 'gpt2-small+adam', '10000x4KiB')


def real_model_shapes(name: str) -> dict[str, tuple]:
    """The shapes of a real model's entries, with Adam's state (benchmarks/small_entries.py),
    at full size."""
    from benchmarks.small_entries import MODELS
    return MODELS[name](1.0)


def _report_modelled(args) -> int:
    latency_ms, rate = args.modelled
    if args.model == 'uniform':
        model = bench.make_model(args.bytes)
    else:
        rng = numpy.random.default_rng(0)
        model = {key: numpy.asarray(rng.standard_normal(shape, dtype=numpy.float32))
                 for key, shape in real_model_shapes(args.model).items()}
    size = sum(value.nbytes for value in model.values())
    medians = _modelled_loads(model, args.rounds, latency_ms / 1000, rate * 1e6)
    ours = medians['gpuserial']
    print(f'{bench.format_size(size)} in {len(model)} arrays ({args.model}) loaded from a '
          f'modelled store ({latency_ms:g} ms a request, {rate:g} MB/s a connection), median '
          f'of {args.rounds}:')
    for name, took in medians.items():
        print(f'  {name:30s} {took:7.2f} s   gpuserial time / this: {ours / took:.2f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': bench.machine_info(), 'bytes': size, 'model': args.model,
                       'rounds': args.rounds, 'latency_ms': latency_ms, 'mb_per_s': rate,
                       'medians': medians}, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--bytes', type=bench.parse_size, default=bench.parse_size('256MiB'))
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--peak', action='store_true',
                        help='also measure the peak memory of a save, in a fresh process')
    parser.add_argument('--json', help='write the results here')
    parser.add_argument('--modelled', nargs=2, type=float, metavar=('LATENCY_MS', 'MB_PER_S'),
                        help='instead of moto, loads from an in-memory store whose requests '
                             'each cost a round trip and their bytes at one connection\'s rate')
    parser.add_argument('--model', default='uniform',
                        choices=['uniform', *REAL_MODELS],
                        help='with --modelled: 16 arrays of --bytes in all, or a real model\'s '
                             'shapes')
    parser.add_argument('--child-peak', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_peak is not None:
        print(json.dumps(_peak_child(int(args.child_peak[0]), args.child_peak[1])))
        return 0
    if args.modelled is not None:
        return _report_modelled(args)
    server, options = _server()
    try:
        fs = _filesystem(options)
        model = bench.make_model(args.bytes)
        first = next(iter(model))
        cases = _cases(fs, options, model)
        seconds: dict[str, dict[str, list[float]]] = {
            name: {'save': [], 'load': []} for name in cases}
        for _ in range(args.rounds):  # interleaved: drifts of the machine hit every case
            for name, (save, load) in cases.items():
                seconds[name]['save'].append(_timed(save)[0])
                took, value = _timed(load)
                assert numpy.asarray(value).tobytes() == model[first].tobytes(), name
                seconds[name]['load'].append(took)
                del value
        requests = _requests(fs, options, model)
        del model
        fs.rm('bench', recursive=True)
        fs.mkdir('bench')
        if args.peak:  # the server stays in this process: the child counts only its own
            out = subprocess.run([sys.executable, '-m', 'benchmarks.remote', '--child-peak',
                                  str(args.bytes), options['client_kwargs']['endpoint_url']],
                                 capture_output=True, text=True, check=True)
            peak = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    medians = {name: {way: statistics.median(times) for way, times in ways.items()}
               for name, ways in seconds.items()}
    ours = medians['gpuserial']
    ratios = {name: {way: ours[way] / took for way, took in ways.items()}
              for name, ways in medians.items() if name != 'gpuserial'}
    report = {'machine': bench.machine_info(), 'bytes': args.bytes, 'rounds': args.rounds,
              'seconds': seconds, 'medians': medians,
              'ratios (gpuserial time / peer time)': ratios, 'requests': requests}
    gib = args.bytes / (1 << 30)
    print(f'{bench.format_size(args.bytes)} to moto on loopback, median of {args.rounds}:')
    for name, ways in medians.items():
        print(f'  {name:24s} save {ways["save"]:7.2f} s ({gib / ways["save"]:.2f} GiB/s)   '
              f'load {ways["load"]:7.2f} s ({gib / ways["load"]:.2f} GiB/s)')
    for name, ways in ratios.items():
        print(f'  gpuserial / {name}: save {ways["save"]:.2f}, load {ways["load"]:.2f}')
    print(f'  requests of a save: {requests["operations"]}, uploaded '
          f'{requests["uploaded_ratio"]:.4f} x payload, {requests["copy_requests"]} copies')
    if args.peak:
        report['peak'] = peak
        print(f'  peak memory a save adds: {bench.format_size(peak["extra"])} (bound '
              f'{bench.format_size(peak["bound"])}: 2 upload blocks + 32 MiB): {peak["verdict"]}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
