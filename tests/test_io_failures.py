"""A disk whose reads or writes fail. Every load says so (a ReadFailedError naming the file),
never that a key is missing or the file corrupt, and never loads part of the file without a word.
Every save raises the write's error naming the file, leaves the old file as it was and no
temporary file, and the process goes on.

Real libhdf5 and real files: a small preloaded library (``tests/failing_io.c``, built here) makes
the reads or writes of one file fail from a given offset on, in a child process.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy
import pytest

import gpuserial
from gpuserial import serializers
from gpuserial.errors import KeyNotFoundError, ReadFailedError
from gpuserial.formats import hdf5

SHIM_SOURCE = os.path.join(os.path.dirname(__file__), 'failing_io.c')

# Loads of one file in a child, reads failing from each offset given in turn: what each gave
CHILD = '''
import json, os, sys
import numpy
import gpuserial
from gpuserial import serializers
from gpuserial.formats import hdf5
from gpuserial.tools import inspection

if os.environ.get('INFLATE_ALL'):  # every gzip dataset's chunks read and inflated by gpuserial
    hdf5.INFLATE_MIN_BYTES = 0
path, offsets = sys.argv[1], [int(a) for a in sys.argv[2:]]
load = serializers.load_hdf5 if path.endswith('.h5') else serializers.load_npz
outcomes = []
for offset in offsets:
    os.environ['FAIL_READS_FROM'] = str(offset)
    for strict in (True, False):
        target = {'a': {'w': numpy.zeros(1000), 'b': numpy.zeros(10)}, 'c': numpy.zeros(5000)}
        try:
            load(path, target, strict=strict)
            whole = (target['a']['w'] == numpy.arange(1000)).all() and (
                target['a']['b'] == 1).all() and (target['c'] == numpy.arange(5000)).all()
            outcome = 'loaded' if whole else 'loaded in part'
        except Exception as error:
            outcome = f'{type(error).__name__}: {error}'
        outcomes.append([offset, strict, outcome])
    for name, call in (('gpuserial.load', lambda: gpuserial.load(path)),
                       ('inspect', lambda: inspection.inspect_file(path))):
        try:
            call()
            outcomes.append([offset, name, 'loaded'])
        except Exception as error:
            outcomes.append([offset, name, f'{type(error).__name__}: {error}'])
print(json.dumps(outcomes))
'''


@pytest.fixture(scope='module')
def shim(tmp_path_factory) -> str:
    if not sys.platform.startswith('linux'):
        pytest.skip('the shim is preloaded with LD_PRELOAD and finds paths in /proc')
    compiler = shutil.which('cc') or shutil.which('gcc')
    if compiler is None:
        pytest.skip('no C compiler to build tests/failing_io.c')
    library = tmp_path_factory.mktemp('shim') / 'failing_io.so'
    subprocess.run([compiler, '-shared', '-fPIC', '-o', str(library), SHIM_SOURCE, '-ldl'],
                   check=True)
    return str(library)


def _model() -> dict:
    return {'a': {'w': numpy.arange(1000.0), 'b': numpy.ones(10)}, 'c': numpy.arange(5000.0)}


def _outcomes(shim: str, path, offsets, **environ) -> list:
    env = dict(os.environ, LD_PRELOAD=shim, FAIL_NAME=os.path.basename(path), **environ)
    run = subprocess.run([sys.executable, '-c', CHILD, str(path), *map(str, offsets)],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(run.stdout)


@pytest.mark.parametrize('save, name, environ', [
    (serializers.save_hdf5, 'failing.h5', {}),
    (serializers.save_hdf5, 'failing.h5', {'INFLATE_ALL': '1'}),  # chunks read with os.pread
    (serializers.save_npz, 'failing.npz', {})], ids=['hdf5', 'hdf5-inflated', 'npz'])
def test_reads_that_fail_anywhere_in_the_file_fail_the_load_and_say_so(tmp_path, shim, save,
                                                                       name, environ):
    path = tmp_path / name
    save(path, _model())
    size = os.path.getsize(path)
    offsets = sorted({0, 100, *range(512, size, 512)})
    outcomes = _outcomes(shim, path, offsets, **environ)
    assert len(outcomes) == 4 * len(offsets)
    failed = [outcome for *_, outcome in outcomes if outcome != 'loaded']
    for outcome in failed:
        assert outcome.startswith(f"ReadFailedError: {str(path)!r}"), outcome
        assert 'Input/output error' in outcome, outcome
    assert len(failed) > len(offsets)  # from the start of the file, and in its metadata


def test_the_first_bytes_of_a_file_that_cannot_be_read_fail_the_format_check(tmp_path, shim):
    path = tmp_path / 'failing.npz'
    serializers.save_npz(path, _model())
    env = dict(os.environ, LD_PRELOAD=shim, FAIL_NAME='failing.npz', FAIL_READS_FROM='0',
               FAIL_READS_UNTIL='1')  # only the read of its first bytes
    load = 'import sys, gpuserial; gpuserial.load(sys.argv[1])'
    run = subprocess.run([sys.executable, '-c', load, str(path)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1
    assert (f"gpuserial.errors.ReadFailedError: {str(path)!r}: reading failed: [Errno 5] "
            f"Input/output error") in run.stderr


# The failure as h5py reports it, without the shim: a KeyError while opening an object, whose
# text carries libhdf5's message from its file driver (from the run of the test above)
FAILED_OPEN = ("Unable to synchronously open object (file read failed: time = Mon Dec  7 "
               "07:17:12 2026\n, filename = 'm.h5', file descriptor = 3, errno = 5, error "
               "message = 'Input/output error', buf = 0x55f0977f2c40, total read size = 328, "
               "bytes this sub-read = 328, offset = 1072)")


def test_libhdf5s_failed_read_is_found_in_any_language():
    french = FAILED_OPEN.replace("'Input/output error'", "'Erreur d'entr\u00e9e/sortie'")
    assert hdf5._failed_read(french) == (5, "Erreur d'entr\u00e9e/sortie", 1072)
    assert hdf5._failed_read(FAILED_OPEN) == (5, 'Input/output error', 1072)
    assert hdf5._failed_read("Unable to synchronously open object (object 'file read failed: "
                             "errno = 5' doesn't exist)") is None


@pytest.mark.parametrize('strict', [True, False])
def test_an_object_that_cannot_be_opened_for_a_failed_read_is_not_a_missing_key(
        tmp_path, monkeypatch, strict):
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, _model())

    def failing_open(group, name, *args, **kwargs):
        raise KeyError(FAILED_OPEN)

    monkeypatch.setattr(h5py.h5o, 'open', failing_open)
    target = {'c': numpy.zeros(5000)}
    failed = (f"{str(path)!r}, key 'c': reading failed: [Errno 5] Input/output error "
              f"(libhdf5: Unable to synchronously open object, at offset 1072)")
    with pytest.raises(ReadFailedError, match=re.escape(failed)) as raised:
        serializers.load_hdf5(path, target, strict=strict)
    assert raised.value.errno == 5
    assert (target['c'] == 0).all()


@pytest.mark.parametrize('key', ['d', 'file read failed: errno = 5'])
def test_an_object_that_is_not_there_is_still_a_missing_key(tmp_path, key):
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, _model())
    target = {key: numpy.zeros(3)}
    missing = f"{str(path)!r}, key {key!r}: not in the file"
    with pytest.raises(KeyNotFoundError, match=re.escape(missing)):
        serializers.load_hdf5(path, target)
    serializers.load_hdf5(path, target, strict=False)
    assert (target[key] == 0).all()


# Saves of one file in a child, writes failing from each offset given in turn: what each gave,
# and whether the old file and no temporary file were left. HDF5 saves run with the disk nearly
# full (statvfs says so): libhdf5 (2.0) crashes the process when a write fails as it closes a
# file, which is why a save that might fill the disk writes through Python (hdf5._roomy), and
# only there can a failed write be survived.
SAVING_CHILD = '''
import glob, json, os, sys
import numpy
import gpuserial
from gpuserial import serializers

path, offsets = sys.argv[1], [int(a) for a in sys.argv[2:]]
model = {'a': {'w': numpy.arange(1000.0), 'b': numpy.ones(10)}, 'c': numpy.arange(5000.0)}
save = ((lambda durable: serializers.save_hdf5(path, model, compression=0, durable=durable))
        if path.endswith('.h5') else
        (lambda durable: serializers.save_npz(path, model, compression=False, durable=durable)))
saves = {'serializers': save,
         'gpuserial.save': lambda durable: gpuserial.save(path, model, durable=durable)}
outcomes = []
for offset in offsets:
    for name, save in saves.items():
        for durable in (True, False):
            with open(path, 'wb') as f:
                f.write(b'the old file')
            os.environ['FAIL_WRITES_FROM'] = str(offset)
            try:
                save(durable)
                outcome = 'saved'
            except Exception as error:
                outcome = f'{type(error).__name__}: {error}'
            del os.environ['FAIL_WRITES_FROM']
            with open(path, 'rb') as f:
                old = f.read() == b'the old file'
            left = glob.glob(os.path.join(os.path.dirname(path), '.*gpuserial-tmp'))
            outcomes.append([offset, name, durable, outcome, old, left])
print(json.dumps(outcomes))
'''


@pytest.mark.parametrize('name', ['failing.npz', 'failing.h5'])
@pytest.mark.parametrize('code, text', [(28, 'No space left on device'),
                                        (122, 'Disk quota exceeded'),
                                        (5, 'Input/output error')],
                         ids=['enospc', 'edquot', 'eio'])
def test_writes_that_fail_anywhere_in_the_file_fail_the_save_and_keep_the_old_file(
        tmp_path, shim, name, code, text):
    path = tmp_path / name
    gpuserial.save(path, _model())
    size = os.path.getsize(path)  # of the file gpuserial.save writes; the other's, about that
    offsets = [0, 30, *range(1024, size - 1024, 4096)]
    env = dict(os.environ, LD_PRELOAD=shim, FAIL_NAME=name, FAIL_WRITES_ERRNO=str(code))
    if name.endswith('.h5'):
        env['FAIL_FREE_BYTES'] = str(1 << 20)
    run = subprocess.run([sys.executable, '-c', SAVING_CHILD, str(path), *map(str, offsets)],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    outcomes = json.loads(run.stdout)
    assert len(outcomes) == 4 * len(offsets)
    for offset, save, durable, outcome, old, left in outcomes:  # every offset is in the file
        assert outcome == f'OSError: [Errno {code}] {text} (writing the file): {str(path)!r}', (
            offset, save, durable)
        assert old and left == [], (offset, save, durable)


def test_a_listing_that_fails_to_read_is_a_read_failure(tmp_path, monkeypatch):
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, _model())

    def failing_visit(group, visit):
        raise RuntimeError(FAILED_OPEN.replace('Unable to synchronously open object',
                                               'Object visitation failed'))

    monkeypatch.setattr(h5py.Group, 'visititems', failing_visit)
    with pytest.raises(ReadFailedError, match=re.escape(
            f"{str(path)!r}: reading failed: [Errno 5] Input/output error (libhdf5: Object "
            f"visitation failed, at offset 1072)")):
        gpuserial.open(path).keys()


# A sharded checkpoint in a child: its save with the data file's writes failing from each offset
# (the previous checkpoint must stay whole), then its load with the data file's reads failing
SHARDED_CHILD = '''
import json, os, sys
import numpy
from gpuserial.distributed.mpi import load_sharded, save_sharded
from tests.fakecomm import SoloComm

directory, offsets = sys.argv[1], [int(a) for a in sys.argv[2:]]
model = {'a': {'w': numpy.arange(100000.0), 'b': numpy.ones(10)}, 'c': numpy.arange(5000.0)}
outcomes = []
for variable in ('FAIL_WRITES_FROM', 'FAIL_READS_FROM'):
    for offset in offsets:
        os.environ[variable] = str(offset)
        target = {'a': {'w': numpy.zeros(100000), 'b': numpy.zeros(10)}, 'c': numpy.zeros(5000)}
        try:
            if variable == 'FAIL_WRITES_FROM':
                save_sharded(directory, {'a': {'w': -model['a']['w']}}, SoloComm())
            else:
                load_sharded(directory, target, SoloComm())
            outcome = 'done'
        except Exception as error:
            outcome = f'{type(error).__name__}: {error}'
        del os.environ[variable]
        load_sharded(directory, target, SoloComm())  # the checkpoint there, read in full
        whole = (target['a']['w'] == model['a']['w']).all() and (target['c'] == model['c']).all()
        outcomes.append([variable, offset, outcome, bool(whole), sorted(os.listdir(directory))])
print(json.dumps(outcomes))
'''


def test_a_sharded_checkpoint_on_a_failing_disk(tmp_path, shim):
    from gpuserial.distributed.mpi import save_sharded
    from tests.fakecomm import SoloComm
    directory = tmp_path / 'ckpt'
    save_sharded(directory, _model() | {'a': {'w': numpy.arange(100000.0), 'b': numpy.ones(10)}},
                 SoloComm())
    files = sorted(os.listdir(directory))
    offsets = [0, 100, 5000, 400000, 800000]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for tests.fakecomm
    env = dict(os.environ, LD_PRELOAD=shim, FAIL_NAME='rank-', PYTHONPATH=root)
    run = subprocess.run([sys.executable, '-c', SHARDED_CHILD, str(directory),
                          *map(str, offsets)], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    outcomes = json.loads(run.stdout)
    assert len(outcomes) == 2 * len(offsets)
    for variable, offset, outcome, whole, listed in outcomes:
        assert whole and listed == files, (variable, offset)  # the old checkpoint, whole
        if variable == 'FAIL_WRITES_FROM':
            assert re.fullmatch(r"OSError: \[Errno 28\] No space left on device \(writing the "
                                rf"file\): '{re.escape(str(directory))}/rank-00000-\w+\.npz'",
                                outcome), (offset, outcome)
        else:
            assert re.match(rf"ReadFailedError: '{re.escape(str(directory))}/rank-00000-\w+\."
                            r"npz', key '[\w/]+' \(member '[\w/]+'\): reading failed: \[Errno 5\] "
                            r"Input/output error", outcome), (offset, outcome)


def test_a_checkpoints_first_bytes_or_index_that_cannot_be_read_say_so(tmp_path, shim):
    """latest() reads each file's first bytes, a sharded load its index: a failed read there is
    a ReadFailedError naming the file, never a bare OSError (nor a checkpoint skipped)."""
    from gpuserial.distributed.mpi import save_sharded
    from tests.fakecomm import SoloComm
    gpuserial.save(tmp_path / 'snapshot_1.npz', _model())
    save_sharded(tmp_path / 'sharded_3', _model(), SoloComm())
    gpuserial.save(tmp_path / 'snapshot_4.npz', _model())  # the newest
    child = ('import sys, gpuserial\nfrom gpuserial.distributed.mpi import load_sharded\n'
             'from tests.fakecomm import SoloComm\n'
             'call = sys.argv[1]\n'
             'try:\n'
             "    if call == 'latest':\n"
             '        gpuserial.latest(sys.argv[2])\n'
             '    else:\n'
             "        load_sharded(sys.argv[2], {'c': None}, SoloComm(), strict=False)\n"
             "    print('done')\n"
             'except Exception as error:\n'
             "    print(f'{type(error).__name__}: {error}')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for tests.fakecomm
    for call, failing, where in (('latest', 'snapshot_4.npz', tmp_path),
                                 ('load', 'index.json', tmp_path / 'sharded_3')):
        env = dict(os.environ, LD_PRELOAD=shim, FAIL_NAME=failing, FAIL_READS_FROM='0',
                   PYTHONPATH=root)
        run = subprocess.run([sys.executable, '-c', child, call, str(where)], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
        assert run.stdout.strip() == (f"ReadFailedError: {str(where / failing)!r}: reading "
                                      f"failed: [Errno 5] Input/output error"), call
