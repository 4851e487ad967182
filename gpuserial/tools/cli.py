"""The ``gpuserial`` command: demo, inspect, convert, consolidate, diff, bench and clean.

Errors are one line on stderr (``gpuserial: error: ...``) with exit status 2; ``-v`` shows the
traceback. ``diff`` exits 0 when the files are equal and 1 when they differ, as ``diff`` does.
A reader that goes away (``gpuserial diff a b | head -1``) does not change the exit status: the
rest of the output is dropped and the command finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Sequence

from gpuserial.checkpoints import CLEAN_AGE
from gpuserial.storage import remote
from gpuserial.tools import inspection

__all__ = ['build_parser', 'main']

PROG = 'gpuserial'
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
RATIO_MIN_BYTES = 64 << 10  # inspect shows stored/raw from this much raw data on


def parse_size(text: str) -> int:
    """Bytes from ``'4096'``, ``'16MiB'``, ``'1GiB'`` (as ``gpuserial.tools.bench.parse_size``)."""
    from gpuserial.tools.bench import parse_size as parse

    try:
        return parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_compression(text: str) -> int:
    """``none`` -> 0, ``deflate``/``gzip`` -> the format's default level (-1), or ``0``-``9``."""
    named = {'none': 0, 'stored': 0, 'deflate': -1, 'gzip': -1, 'default': -1}
    if text.lower() in named:
        return named[text.lower()]
    if text.isdigit() and 0 <= int(text) <= 9:
        return int(text)
    raise argparse.ArgumentTypeError(f'unknown compression {text!r}: expected none, deflate, '
                                     f'gzip or a level 0-9')


def parse_device(text: str):
    """A device spec: ``'0'`` and ``'-1'`` become the ints they name, the rest stays text."""
    try:
        return int(text)
    except ValueError:
        return text


def parse_storage_options(text: str) -> dict:
    try:
        options = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f'not JSON: {text!r} ({error})') from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f'not a JSON object: {text!r}')
    return options


def format_bytes(nbytes: int) -> str:
    """``'512 B'``, ``'1.5 KiB'``, ``'256.0 MiB'``, ``'1.00 GiB'``."""
    if nbytes < 1024:
        return f'{nbytes} B'
    for unit, size in (('GiB', 1 << 30), ('MiB', 1 << 20), ('KiB', 1 << 10)):
        if nbytes >= size:
            return f'{nbytes / size:.1f} {unit}'
    raise AssertionError('unreachable')


# ---------------------------------------------------------------------------------------------
# Subcommands


def cmd_demo(args: argparse.Namespace) -> int:
    from gpuserial.tools import demo

    return demo.run(args.size, args.device, args.dir, compress=args.compress)


def _shape_text(entry: inspection.EntryInfo) -> str:
    if entry.kind == 'none':
        return 'None'
    if entry.shape is None:
        return '-'
    return '(' + ', '.join(map(str, entry.shape)) + (',)' if len(entry.shape) == 1 else ')')


def inspect_lines(info: inspection.FileInfo) -> list[str]:
    """The tree of ``info``'s keys, one row per group and entry, then the totals."""
    rows = [('key', 'shape', 'dtype', 'stored', 'raw', 'compression')]
    shown: tuple[str, ...] = ()
    for entry in sorted(info.entries, key=lambda e: e.key.split('/')):
        *groups, name = entry.key.split('/')
        common = 0
        while common < min(len(groups), len(shown)) and groups[common] == shown[common]:
            common += 1
        for depth in range(common, len(groups)):
            rows.append(('  ' * depth + groups[depth] + '/', '', '', '', '', ''))
        shown = tuple(groups)
        kind = {'object': ' (pickled: refused)', 'other': ' (not .npy)'}.get(entry.kind, '')
        rows.append(('  ' * len(groups) + name, _shape_text(entry), (entry.dtype or '') + kind,
                     format_bytes(entry.stored_bytes), format_bytes(entry.nbytes),
                     entry.compression))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = [f'{info.path}: {info.format.upper()}, {format_bytes(info.file_size)}']
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]),
                 row[3].rjust(widths[3]), row[4].rjust(widths[4]), row[5]]
        lines.append('  '.join(cells).rstrip())
    ratio = (f', {info.stored_bytes / info.nbytes:.0%} of raw' if info.nbytes >= RATIO_MIN_BYTES
             else '')  # below that, headers dominate and the ratio says nothing
    lines.append(f'total: {len(info.entries)} entries ({info.none_count} None), '
                 f'{format_bytes(info.nbytes)} raw, {format_bytes(info.stored_bytes)} stored'
                 f'{ratio}')
    return lines


def cmd_inspect(args: argparse.Namespace) -> int:
    if remote.is_url(args.file) or os.path.isdir(args.file):  # a sharded checkpoint?
        from gpuserial.distributed import reading

        if reading.is_checkpoint(args.file, args.storage_options):
            if args.json:
                print(json.dumps(reading.describe(args.file, args.storage_options), indent=2))
            else:
                print('\n'.join(reading.describe_lines(args.file, args.storage_options)))
            return 0
        if not remote.is_url(args.file):
            raise IsADirectoryError(f'{args.file!r}: is a directory, not an NPZ or HDF5 file, '
                                    f'nor a sharded checkpoint (no index.json in it)')
    info = inspection.inspect_file(args.file, storage_options=args.storage_options)
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
    else:
        print('\n'.join(inspect_lines(info)))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    format = inspection.format_for_path(args.dst, args.format)
    compression = None if args.compression in (None, -1) else args.compression
    result = inspection.convert(args.src, args.dst, format=format, compression=compression,
                                progress=False if args.no_progress else None,
                                storage_options=args.storage_options)
    how = {('npz', 0): 'stored', ('hdf5', 0): 'uncompressed'}.get(
        (result.format, result.compression),
        'deflate' if result.format == 'npz' else f'gzip {result.compression}')
    print(f'{args.src} -> {args.dst}: {result.entries} entries, {format_bytes(result.nbytes)}, '
          f'{result.format.upper()} ({how})')
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from gpuserial.distributed import reading

    result = reading.consolidate(args.dir, args.out, rank=args.rank,
                                 compression=args.compression not in (None, 0),
                                 storage_options=args.storage_options)
    print(f'{args.dir} -> {args.out}: {result.entries} entries, {format_bytes(result.nbytes)}, '
          f'NPZ ({"deflate" if args.compression not in (None, 0) else "stored"})')
    return 0


def _diff_value(change: inspection.KeyDiff) -> str:
    if change.max_abs is None:
        return 'values differ' if change.count else 'values equal'
    return (f'{change.count} element(s) differ, max abs diff {change.max_abs:.6g}, '
            f'max rel diff {change.max_rel:.6g}')


def diff_lines(result: inspection.DiffResult, a: str, b: str, rtol: float = 0.0,
               atol: float = 0.0) -> list[str]:
    """One line per difference, then a summary."""
    lines = [f'only in {a}: {key}' for key in result.only_a]
    lines += [f'only in {b}: {key}' for key in result.only_b]
    for change in result.changed:
        if change.what in ('none', 'shape'):
            lines.append(f'{change.what} differs: {change.key}: {change.a} -> {change.b}')
        elif change.what == 'dtype':
            lines.append(f'dtype differs: {change.key}: {change.a} -> {change.b}; '
                         f'{_diff_value(change)}')
        else:
            lines.append(f'values differ: {change.key} {change.a}: {_diff_value(change)}')
    equal = result.compared - len(result.changed)
    lines.append(f'{"equal" if result.equal else "different"}: {result.compared} common keys '
                 f'({equal} equal, {len(result.changed)} differ), {len(result.only_a)} only in '
                 f'{a}, {len(result.only_b)} only in {b}'
                 + (f'; equal means within rtol={rtol:g}, atol={atol:g}' if rtol or atol else ''))
    return lines


def cmd_diff(args: argparse.Namespace) -> int:
    result = inspection.diff_files(args.a, args.b, rtol=args.rtol, atol=args.atol,
                                   storage_options=args.storage_options)
    print('\n'.join(diff_lines(result, args.a, args.b, args.rtol, args.atol)))
    return 0 if result.equal else 1


def cmd_clean(args: argparse.Namespace) -> int:
    from gpuserial import checkpoints

    removed = kept = freed = 0
    verb = 'would remove' if args.dry_run else 'removed'
    for prefix in args.prefixes:
        for leftover in checkpoints.clean(prefix, older_than=args.older_than,
                                          dry_run=args.dry_run,
                                          storage_options=args.storage_options):
            detail = (leftover.why if leftover.size is None
                      else f'{format_bytes(leftover.size)}, {leftover.why}')
            if leftover.removable:
                removed += 1
                freed += leftover.size or 0
                print(f'{verb} {leftover.path} ({detail})')
            else:
                kept += 1
                print(f'kept {leftover.path} ({detail})')
    print(f'{verb} {removed} leftover(s) ({format_bytes(freed)}); kept {kept}')
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from gpuserial.tools import bench

    options = {'json': args.json, 'plot': args.plot, 'out': sys.stdout}  # the current stdout
    if args.sizes:
        options['sizes'] = args.sizes
    if args.repeat is not None:
        options['repeat'] = args.repeat
    return bench.run(**options)


# ---------------------------------------------------------------------------------------------
# Parser and entry point


def _version() -> str:
    import gpuserial  # imported already: this module is in its package
    return gpuserial.__version__


def build_parser() -> argparse.ArgumentParser:
    """The ``gpuserial`` argument parser, one subparser per command."""
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument('-v', '--verbose', action='store_true', default=argparse.SUPPRESS,
                         help='show the traceback of an error')
    remote_options = argparse.ArgumentParser(add_help=False)
    remote_options.add_argument(
        '--storage-options', type=parse_storage_options, metavar='JSON',
        help='for URLs (s3://bucket/key, gs://, ...): the options of their fsspec filesystem, '
        'as a JSON object (e.g. \'{"client_kwargs": {"endpoint_url": '
        '"http://127.0.0.1:9000"}}\')')
    parser = argparse.ArgumentParser(
        prog=PROG, description='Save, load, inspect and compare checkpoints of GPU-resident '
        'models (Chainer-compatible NPZ and HDF5).')
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='show the traceback of an error')
    parser.add_argument('--version', action='version', version=f'{PROG} {_version()}')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    demo = commands.add_parser(
        'demo', parents=[verbose], help='save and load a model in NPZ and HDF5, check, time',
        description='Build a model of float32 arrays (on the GPU when one is usable), save it '
        'as NPZ and HDF5, load each back into a fresh model, check every value bit for bit, and '
        'print the file sizes, times and throughput. Exits 1 if a check fails.')
    demo.add_argument('--size', type=parse_size, default='256MiB',
                      help='total size of the model (default 256MiB; e.g. 4MiB, 1GiB)')
    demo.add_argument('--device', type=parse_device, help='cpu, cuda, cuda:N, or an int (-1 '
                      'is the CPU, N is GPU N; default: GPU 0 if usable, else the CPU)')
    demo.add_argument('--dir', help='keep the files in this directory (default: a temporary '
                      'directory, removed afterwards)')
    demo.add_argument('--compress', action='store_true', help="save with Chainer's default "
                      'compression (NPZ deflate, HDF5 gzip 4) instead of uncompressed')
    demo.set_defaults(func=cmd_demo)

    inspect = commands.add_parser(
        'inspect', parents=[verbose, remote_options],
        help='list the keys of an NPZ or HDF5 file, or of a sharded checkpoint',
        description='Show the tree of keys of an NPZ (gpuserial, NumPy, Chainer) or HDF5 file '
        'with shape, dtype, stored and raw size, compression and None entries, plus totals. '
        'For a sharded checkpoint directory: each key\'s kind, global shape, dtype and chunks '
        'per file. Reads metadata only: no data is loaded and nothing is unpickled.')
    inspect.add_argument('file', help='an NPZ or HDF5 file, a URL, or a sharded checkpoint '
                         'directory')
    inspect.add_argument('--json', action='store_true', help='print JSON for scripts')
    inspect.set_defaults(func=cmd_inspect)

    convert = commands.add_parser(
        'convert', parents=[verbose, remote_options],
        help='convert between NPZ and HDF5, or recompress',
        description='Write the entries of SRC into DST, entry by entry (memory bounded by the '
        'largest entry); DST is replaced atomically once complete. Stored None entries stay '
        'None.')
    convert.add_argument('src', help='an NPZ or HDF5 file (recognised by its content)')
    convert.add_argument('dst', help='the file to write (.npz, .h5 or .hdf5)')
    convert.add_argument('--format', choices=inspection.FORMATS,
                         help="DST's format (default: from its extension)")
    convert.add_argument('--compression', type=parse_compression, metavar='{none,deflate,0-9}',
                         help='none, deflate/gzip (the default: NPZ deflate, HDF5 gzip 4), or a '
                         'gzip level 0-9 (for NPZ any level above 0 means deflate)')
    convert.add_argument('--no-progress', action='store_true',
                         help='no progress bar (shown by default on a terminal for large files)')
    convert.set_defaults(func=cmd_convert)

    consolidate = commands.add_parser(
        'consolidate', parents=[verbose, remote_options], help='write a sharded checkpoint as '
        'one NPZ',
        description='Write the sharded checkpoint in DIR (gpuserial.distributed) as one '
        "ordinary NPZ that numpy.load and Chainer's load_npz read: every key as its whole "
        'global array, per-rank keys as one rank\'s value. One array is in memory at a time; '
        'OUT is replaced atomically once complete.')
    consolidate.add_argument('dir', help='the checkpoint directory (holding index.json), or '
                             'its URL')
    consolidate.add_argument('out', help='the NPZ file (or URL) to write')
    consolidate.add_argument('--rank', type=int, default=0,
                             help='whose value of per-rank keys to keep (default 0)')
    consolidate.add_argument('--compression', type=parse_compression,
                             metavar='{none,deflate,0-9}', help='none (the default) or deflate')
    consolidate.set_defaults(func=cmd_consolidate)

    diff = commands.add_parser(
        'diff', parents=[verbose, remote_options], help='compare two checkpoints',
        description='Compare two NPZ/HDF5 files key by key: keys only in one, shape and dtype '
        'changes, and the largest absolute and relative differences (relative to B). Values '
        'are equal when |a - b| <= atol + rtol * |b| (exact by default; NaN equals NaN). Exit '
        'status 0 when equal, 1 when different, 2 on error.')
    diff.add_argument('a', help='the first file')
    diff.add_argument('b', help='the second file')
    diff.add_argument('--rtol', type=float, default=0.0, help='relative tolerance (default 0)')
    diff.add_argument('--atol', type=float, default=0.0, help='absolute tolerance (default 0)')
    diff.set_defaults(func=cmd_diff)

    bench = commands.add_parser(
        'bench', parents=[verbose], help='transfer and save/load throughput on this machine',
        description='Time the staging engine (host<->device) and save/load in NPZ and HDF5 at '
        'several array sizes, on the CPU and on GPU 0 when one is usable, and print a table.')
    bench.add_argument('--json', action='store_true', help='print JSON instead of the table')
    bench.add_argument('--plot', metavar='FILE.png', help='also plot throughput against array '
                       "size (needs matplotlib: pip install matplotlib)")
    bench.add_argument('--sizes', type=lambda t: [parse_size(s) for s in t.split(',')],
                       metavar='SIZES', help='comma-separated array sizes (e.g. 1MiB,16MiB)')
    bench.add_argument('--repeat', type=int, help='timings per operation; the best is shown')
    bench.set_defaults(func=cmd_bench)

    clean = commands.add_parser(
        'clean', parents=[verbose, remote_options],
        help='remove what killed saves left behind',
        description='Lists and removes what saves that never committed left in PREFIX (a '
        'directory or a URL) and in the directories directly in it: temporary files of local '
        'saves (.NAME.PID-HOST-TOKEN.gpuserial-tmp) whose process, on this host, is gone, or '
        "another host's older than --older-than; temporary keys of saves to object stores "
        'without transactions, data files of sharded checkpoints that no index names, and '
        '(S3) incomplete multipart uploads, older than --older-than. Never anything a '
        'committed checkpoint uses, never a running save\'s temporary file.')
    clean.add_argument('prefixes', nargs='*', default=['.'], metavar='PREFIX',
                       help='directories or URLs to clean (default: the current directory)')
    clean.add_argument('-n', '--dry-run', action='store_true',
                       help='only list what would be removed')
    clean.add_argument('--older-than', type=float, default=CLEAN_AGE, metavar='SECONDS',
                       help='leave younger leftovers alone: a save in flight may be writing '
                       f'them (default {CLEAN_AGE:.0f}, an hour); must exceed the longest save')
    clean.set_defaults(func=cmd_clean)
    return parser


def _one_line(error: BaseException) -> str:
    text = ' '.join(str(error).split())
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f'{os.fsdecode(error.filename)!r}: {error.strerror}'
    from gpuserial.errors import GpuserialError

    known = (GpuserialError, OSError, ValueError, ImportError)
    if not text or not isinstance(error, known):
        text = f'{type(error).__name__}: {text}' if text else type(error).__name__
    return text


class _ReaderMayLeave:
    """stdout that, once its reader has gone (``| head``), drops the rest of the output."""

    def __init__(self, stream):
        self.stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._drop_the_rest()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop_the_rest()

    def _drop_the_rest(self) -> None:
        self.reader_gone = True
        try:  # so that the interpreter's last flush of stdout does not fail either
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture)
            pass

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _flush_what_was_printed() -> None:
    """Before a failed command's error: its output so far goes out first (or is dropped, its
    reader gone), so that the interpreter's last flush cannot fail on it and change the exit
    status; a failure to write it is not the error being reported."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``gpuserial`` command line; returns the exit status.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    stdout = sys.stdout
    sys.stdout = _ReaderMayLeave(stdout)
    try:
        status = args.func(args)
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        _flush_what_was_printed()
        print(f'{PROG}: interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        _flush_what_was_printed()
        if args.verbose:
            traceback.print_exc()
        print(f'{PROG}: error: {_one_line(error)}', file=sys.stderr)
        return EXIT_ERROR
    finally:
        sys.stdout = stdout
