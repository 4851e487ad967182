#!/usr/bin/env python3
"""Mutation testing of gpuserial's core: plant one small bug at a time, see whether a test fails.

Each mutant changes one spot of one module (a comparison, an arithmetic or boolean operator, a
number, a ``not``, a call or ``raise`` statement dropped), in a private copy of the checkout,
and runs the tests that cover that module there (``pytest -x``). A mutant is *killed* when a
test fails, *survives* when all pass, and *times out* past ``--timeout`` (counted as killed: the
bug made the tests hang). Mutants judged equivalent (no test can tell them apart, for a reason
written down) are listed in ``ci/mutants-equivalent.txt`` by id and left out of the score. So
are, where no GPU is usable, the mutants of code only a real GPU runs (CuPy's backend,
``GPU_ONLY``): they are listed as needing one, and run and counted on a GPU machine.

    python ci/mutate.py                       # every mutant of every core module
    python ci/mutate.py --sample 40 --seed 1  # 40 mutants per module, drawn with seed 1
    python ci/mutate.py --modules gpuserial/formats/_npy.py --list   # only list the mutants
    python ci/mutate.py --lines gpuserial/formats/npz.py:320-340      # a change's lines only

It uses the interpreter it runs with (the test environment: ``.venv/bin/python``) and writes a
JSON report (``--json``). Exit status 0 when the score reaches ``--target`` (default 0.9).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / 'ci' / 'mutants-equivalent.txt'
# What the tests read: test_readme reads README.md and checks its links and ci/'s scripts
COPIED = ['gpuserial', 'tests', 'benchmarks', 'pyproject.toml', 'README.md',
          'BENCHMARKS.md', 'ci']
NOT_IN_THE_QUICK_RUN = 'not over_4_gib and not sigkill'  # minutes of tests that add no kills

# The core modules, the user-facing tools, and the tests that cover each.
MODULES = {
    'gpuserial/serializer.py': ['test_protocol', 'test_chainer_cases', 'test_formats',
                                'test_link', 'test_hostile'],
    'gpuserial/formats/loading.py': ['test_transactional', 'test_formats', 'test_protocol',
                                     'test_chainer_cases', 'test_hostile', 'test_none_pickles',
                                     'test_progress', 'test_engine_rules', 'test_access',
                                     'test_remote'],
    'gpuserial/formats/_npy.py': ['test_npz', 'test_zipread', 'test_hostile',
                                  'test_none_pickles', 'test_formats'],
    'gpuserial/formats/_zipstream.py': ['test_npz', 'test_zipread', 'test_hostile',
                                        'test_formats', 'test_atomic', 'test_io_failures'],
    'gpuserial/formats/_zipread.py': ['test_zipread', 'test_npz', 'test_hostile',
                                      'test_formats', 'test_remote'],
    'gpuserial/formats/npz.py': ['test_npz', 'test_zipread', 'test_formats', 'test_hostile',
                                 'test_transactional', 'test_chainer_cases', 'test_protocol',
                                 'test_engine_rules', 'test_progress', 'test_async',
                                 'test_access', 'test_remote'],
    'gpuserial/formats/hdf5.py': ['test_hdf5', 'test_formats', 'test_hostile',
                                  'test_transactional', 'test_chainer_cases', 'test_atomic',
                                  'test_progress', 'test_engine_rules', 'test_async',
                                  'test_access', 'test_io_failures'],
    'gpuserial/storage/_fileio.py': ['test_atomic', 'test_cli', 'test_async', 'test_io_failures',
                                     'test_access', 'test_remote'],
    'gpuserial/storage/_signals.py': ['test_atomic'],
    'gpuserial/engine/transfer.py': ['test_transfer', 'test_engine_rules', 'test_formats',
                                     'test_concurrency', 'test_async', 'test_access'],
    'gpuserial/engine/devices.py': ['test_devices', 'test_engine_rules', 'test_transfer',
                                    'test_formats', 'test_async', 'test_protocol',
                                    'test_access', 'test_hostile'],
    'gpuserial/engine/asyncsave.py': ['test_async', 'test_atomic', 'test_engine_rules'],
    'gpuserial/access.py': ['test_access', 'test_readme', 'test_remote'],
    'gpuserial/distributed/index.py': ['test_distributed', 'test_distributed_mpi',
                                       'test_remote_sharded'],
    'gpuserial/distributed/mpi.py': ['test_distributed', 'test_distributed_mpi',
                                     'test_remote_sharded'],
    'gpuserial/distributed/reading.py': ['test_distributed', 'test_distributed_mpi',
                                         'test_remote_sharded'],
    'gpuserial/storage/remote.py': ['test_remote', 'test_remote_sharded'],
    'gpuserial/storage/folders.py': ['test_remote_sharded', 'test_distributed', 'test_io_failures'],
    'gpuserial/checkpoints.py': ['test_remote_sharded', 'test_cli', 'test_io_failures'],
    'gpuserial/objects/link.py': ['test_link', 'test_optimizers', 'test_training',
                                  'test_chainer_cases', 'test_hostile', 'test_access',
                                  'test_distributed'],
    'gpuserial/objects/optimizers.py': ['test_optimizers', 'test_training', 'test_chainer_cases',
                                        'test_distributed', 'test_async'],
    'gpuserial/objects/training.py': ['test_training', 'test_async', 'test_distributed',
                                      'test_optimizers'],
    'gpuserial/engine/progress.py': ['test_progress', 'test_formats', 'test_hdf5',
                                     'test_remote', 'test_cli'],
    'gpuserial/distributed/extension.py': ['test_distributed', 'test_distributed_mpi',
                                           'test_remote_sharded'],
    'gpuserial/engine/workers.py': ['test_workers', 'test_zipread', 'test_hdf5'],
    'gpuserial/tools/cli.py': ['test_cli', 'test_distributed', 'test_demo', 'test_bench',
                               'test_readme', 'test_remote', 'test_remote_sharded'],
    'gpuserial/tools/inspection.py': ['test_cli', 'test_hostile', 'test_io_failures',
                                      'test_access', 'test_readme', 'test_remote', 'test_npz'],
    'gpuserial/tools/bench.py': ['test_bench', 'test_cli'],
}
# Code that only runs on a real GPU (CuPy's backend): its mutants are run, and counted, where a
# GPU is usable; elsewhere they are listed as needing one, outside the score.
GPU_ONLY = {'gpuserial/engine/devices.py': {'_CupyBackend', '_marker', '_cuda_device',
                                            '_jax_device'}}

SWAPS = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn,
    ast.NotIn: ast.In, ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd,
    ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.And: ast.Or, ast.Or: ast.And,
}


@dataclasses.dataclass(frozen=True)
class Mutant:
    module: str
    line: int
    end_line: int
    col: int
    end_col: int
    operator: str
    replacement: str  # source text for [line:col, end_line:end_col]
    original: str
    gpu_only: bool = False  # in code that only a real GPU runs (GPU_ONLY)

    @property
    def id(self) -> str:
        return f'{self.module}:{self.line}:{self.col}:{self.operator}'


def _messages(tree: ast.AST) -> set[int]:
    """Ids of nodes inside f-strings, docstrings, raise arguments (messages, not logic) and
    annotations (types, not code)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        inside: list[ast.AST] = []
        if isinstance(node, ast.JoinedStr):
            inside.append(node)
        if isinstance(node, ast.arg) and node.annotation is not None:
            inside.append(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            inside.append(node.returns)
        if isinstance(node, ast.AnnAssign):
            inside.append(node.annotation)
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            inside += node.exc.args + [k.value for k in node.exc.keywords]
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) and node.body \
                and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant):
            inside.append(node.body[0])
        for part in inside:
            skip.update(id(sub) for sub in ast.walk(part))
    return skip


def _replace(node: ast.AST, **changes) -> ast.AST:
    copy = type(node)(**{name: getattr(node, name) for name in node._fields})
    for name, value in changes.items():
        setattr(copy, name, value)
    return ast.fix_missing_locations(ast.copy_location(copy, node))


SOURCES: dict[str, str] = {}  # each module as it was when the run began


def source_of(module: str) -> str:
    if module not in SOURCES:
        SOURCES[module] = (ROOT / module).read_text()
    return SOURCES[module]


def mutants_of(module: str) -> list[Mutant]:
    """Every mutant of ``module`` (a path relative to the checkout)."""
    source = source_of(module)
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    skip = _messages(tree)
    found: list[Mutant] = []

    def add(node, operator: str, new: ast.AST | str):
        original = ast.get_source_segment(source, node)
        if original is None:
            return
        replacement = new if isinstance(new, str) else ast.unparse(new)
        if isinstance(new, ast.expr):
            replacement = f'({replacement})'
        found.append(Mutant(module, node.lineno, node.end_lineno, node.col_offset,
                            node.end_col_offset, operator, replacement, original,
                            node.lineno in gpu_lines))

    gpu_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) \
                and node.name in GPU_ONLY.get(module, ()):
            gpu_lines.update(range(node.lineno, node.end_lineno + 1))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAPS:
            new = SWAPS[type(node.ops[0])]()
            add(node, f'{type(node.ops[0]).__name__}->{type(new).__name__}',
                _replace(node, ops=[new]))
        elif isinstance(node, ast.BinOp) and type(node.op) in SWAPS:
            new = SWAPS[type(node.op)]()
            add(node, f'{type(node.op).__name__}->{type(new).__name__}', _replace(node, op=new))
        elif isinstance(node, ast.BoolOp):
            new = SWAPS[type(node.op)]()
            add(node, f'{type(node.op).__name__}->{type(new).__name__}', _replace(node, op=new))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(node, 'drop-not', node.operand)
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            add(node, 'int+1', ast.Constant(node.value + 1))
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            add(node, 'flip-bool', ast.Constant(not node.value))
        elif isinstance(node, (ast.Expr, ast.Raise)) and (
                isinstance(node, ast.Raise) or isinstance(node.value, ast.Call)):
            indent = lines[node.lineno - 1][:node.col_offset]
            if indent.strip():  # on one line with other statements: leave it
                continue
            add(node, 'drop-raise' if isinstance(node, ast.Raise) else 'drop-call', 'pass')
    return sorted(found, key=lambda m: (m.line, m.col, m.operator))


def apply(mutant: Mutant, directory: pathlib.Path) -> None:
    """Writes the mutated module into ``directory`` (a copy of the checkout)."""
    lines = source_of(mutant.module).splitlines(keepends=True)
    head = ''.join(lines[:mutant.line - 1]) + lines[mutant.line - 1][:mutant.col]
    tail = lines[mutant.end_line - 1][mutant.end_col:] + ''.join(lines[mutant.end_line:])
    (directory / mutant.module).write_text(head + mutant.replacement + tail)


def restore(mutant: Mutant, directory: pathlib.Path) -> None:
    (directory / mutant.module).write_text(source_of(mutant.module))


def _pytest(tests: list[str], directory: pathlib.Path, timeout: float, capture: bool = False
            ) -> tuple[int | None, str]:
    """Runs ``tests`` (names in tests/) in ``directory``: pytest's exit status (None past
    ``timeout``) and, with ``capture``, its output."""
    command = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider',
               '--benchmark-disable', '-k', NOT_IN_THE_QUICK_RUN,
               *[f'tests/{name}.py' for name in tests]]
    env = dict(os.environ, PYTHONPATH=str(directory), PYTHONDONTWRITEBYTECODE='1')
    output = subprocess.PIPE if capture else subprocess.DEVNULL
    # A session of its own: a mutant that hangs a forked child leaves nothing running after it
    with subprocess.Popen(command, cwd=directory, env=env, stdout=output,
                          stderr=subprocess.STDOUT, start_new_session=True, text=True) as process:
        try:
            out = process.communicate(timeout=timeout)[0] or ''
            returncode: int | None = process.returncode
        except subprocess.TimeoutExpired:
            out, returncode = '', None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return returncode, out


def run_tests(mutant: Mutant, directory: pathlib.Path, timeout: float) -> tuple[str, float]:
    start = time.monotonic()
    returncode, _ = _pytest(MODULES[mutant.module], directory, timeout)
    elapsed = time.monotonic() - start
    if returncode is None:
        return 'timeout', elapsed
    if returncode == 0:
        return 'survived', elapsed
    if returncode in (1, 2, 3):  # tests failed, an interrupt or internal error it caused
        return 'killed', elapsed
    return f'error (pytest exit {returncode})', elapsed


def _copy_checkout() -> pathlib.Path:
    """A private copy of the checkout, its core modules as they were when the run began."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix='gpuserial-mutants-'))
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, directory / name,
                            ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        else:
            shutil.copy(source, directory / name)
    for module in MODULES:
        (directory / module).write_text(source_of(module))
    return directory


def check_baseline(directory: pathlib.Path, modules: list[str], timeout: float) -> None:
    """Refuses to go on when the tests of ``modules`` fail in the copy before any mutation (a
    file they read that the copy lacks, say): every mutant would count as killed by it."""
    tests = sorted({name for module in modules for name in MODULES[module]})
    returncode, output = _pytest(tests, directory, timeout, capture=True)
    if returncode != 0:
        raise SystemExit(f'the tests fail in the copy {directory} with no mutant (pytest exit '
                         f'{returncode}), so every mutant would count as killed:\n'
                         f'{output[-3000:]}')


NEEDS_A_GPU = 'needs a GPU'


def _gpu_usable(directory: pathlib.Path) -> bool:
    """Whether the tests, run in ``directory``, have a usable GPU (CuPy's backend runs)."""
    found = subprocess.run(
        [sys.executable, '-c',
         'from gpuserial.engine import devices; print(devices.gpu_available())'],
        cwd=directory, env=dict(os.environ, PYTHONPATH=str(directory)), capture_output=True,
        text=True, check=True).stdout.strip()
    return found == 'True'


def equivalents() -> dict[str, str]:
    """Mutant ids judged equivalent, with the reason (``ID  reason`` per line)."""
    if not EQUIVALENT_FILE.exists():
        return {}
    found = {}
    for line in EQUIVALENT_FILE.read_text().splitlines():
        if line.strip() and not line.startswith('#'):
            mutant_id, _, reason = line.partition(' ')
            found[mutant_id] = reason.strip()
    return found


def _span(text: str) -> tuple[str, int, int]:
    """``MODULE:FIRST-LAST`` (or ``MODULE:LINE``) as (module, first, last)."""
    module, _, lines = text.rpartition(':')
    first, _, last = lines.partition('-')
    if module not in MODULES or not first.isdigit() or not (last or first).isdigit():
        raise SystemExit(f'--lines takes MODULE:FIRST-LAST of a core module, got {text!r}')
    return module, int(first), int(last or first)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--modules', nargs='+', default=list(MODULES), choices=list(MODULES))
    parser.add_argument('--sample', type=int, help='mutants per module, drawn at random')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workers', type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument('--timeout', type=float, default=300)
    parser.add_argument('--target', type=float, default=0.9)
    parser.add_argument('--json', help='write the report here')
    parser.add_argument('--list', action='store_true', help='list the mutants and stop')
    parser.add_argument('--lines', nargs='+', metavar='MODULE:FIRST-LAST',
                        help='only the mutants that start on these lines (a change\'s)')
    args = parser.parse_args(argv)
    spans = [_span(text) for text in args.lines or ()]
    if spans:
        args.modules = [module for module in args.modules
                        if any(module == span[0] for span in spans)]

    chosen: list[Mutant] = []
    for module in args.modules:
        every = mutants_of(module)
        if args.sample and len(every) > args.sample:
            # Seeded by the module's flat-layout path (gpuserial/NAME.py, as before the package
            # had folders), so a seed draws the same sample it drew then
            flat = f'gpuserial/{pathlib.PurePath(module).name}'
            every = sorted(random.Random(f'{args.seed}:{flat}').sample(every, args.sample),
                           key=lambda m: (m.line, m.col))
        chosen += [mutant for mutant in every if not spans or any(
            mutant.module == module and first <= mutant.line <= last
            for module, first, last in spans)]
    if args.list:
        for mutant in chosen:
            print(f'{mutant.id}: {mutant.original!r} -> {mutant.replacement!r}')
        print(f'{len(chosen)} mutants')
        return 0

    known = equivalents()
    copies = [_copy_checkout() for _ in range(args.workers)]
    for directory in copies:  # the tests must import the copy, not the checkout
        imported = subprocess.run(
            [sys.executable, '-c', 'import gpuserial; print(gpuserial.__file__)'], cwd=directory,
            env=dict(os.environ, PYTHONPATH=str(directory)), capture_output=True, text=True,
            check=True).stdout.strip()
        if not imported.startswith(str(directory)):
            raise SystemExit(f'the tests would import {imported}, not the copy in {directory}')
    try:
        check_baseline(copies[0], args.modules, args.timeout * len(args.modules))
    except SystemExit:
        for directory in copies:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    free = list(copies)
    results: dict[str, dict] = {}

    gpu = _gpu_usable(copies[0])

    def one(mutant: Mutant) -> tuple[Mutant, str, float]:
        if mutant.gpu_only and not gpu:
            return mutant, NEEDS_A_GPU, 0.0
        directory = free.pop()
        try:
            apply(mutant, directory)
            outcome, elapsed = run_tests(mutant, directory, args.timeout)
        finally:
            restore(mutant, directory)
            free.append(directory)
        return mutant, outcome, elapsed

    started = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            for done, (mutant, outcome, elapsed) in enumerate(pool.map(one, chosen), 1):
                if mutant.id in known:
                    outcome = f'equivalent ({outcome})'
                results[mutant.id] = {'outcome': outcome, 'seconds': round(elapsed, 1),
                                      'original': mutant.original,
                                      'replacement': mutant.replacement}
                print(f'[{done}/{len(chosen)}] {outcome:9} {mutant.id}: {mutant.original!r} -> '
                      f'{mutant.replacement!r}', flush=True)
    finally:
        for directory in copies:
            shutil.rmtree(directory, ignore_errors=True)

    summary = {}
    for module in args.modules:
        every = [r for key, r in results.items() if key.startswith(module + ':')]
        rows = [r for r in every if r['outcome'] != NEEDS_A_GPU]
        counted = [r for r in rows if not r['outcome'].startswith('equivalent')]
        killed = sum(r['outcome'] in ('killed', 'timeout') for r in counted)
        summary[module] = {'mutants': len(rows), 'equivalent': len(rows) - len(counted),
                           'killed': killed, 'survived': len(counted) - killed,
                           'needs_a_gpu': len(every) - len(rows)}
    counted = sum(s['mutants'] - s['equivalent'] for s in summary.values())
    killed = sum(s['killed'] for s in summary.values())
    score = killed / counted if counted else 1.0
    print()
    for module, row in summary.items():
        print(f'{module:33} {row["killed"]:4} killed of {row["mutants"] - row["equivalent"]:4}'
              f' ({row["equivalent"]} equivalent, {row["needs_a_gpu"]} need a GPU)')
    print(f'score: {killed}/{counted} = {score:.1%} in {time.monotonic() - started:.0f} s')
    survivors = [key for key, r in results.items() if r['outcome'] == 'survived']
    for key in survivors:
        print(f'survived: {key}: {results[key]["original"]!r} -> {results[key]["replacement"]!r}')
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {'score': score, 'summary': summary, 'mutants': results, 'seed': args.seed,
             'sample': args.sample}, indent=1))
    return 0 if score >= args.target else 1


if __name__ == '__main__':
    sys.exit(main())
