"""compare.py with the proposed core fixes monkeypatched in: a simulation, the core untouched.

Recorded with BENCHMARKS.md (2026-11-23) to show what the fixes are worth; run it from the
repository root as ``python benchmarks/results/2026-11-23-cpu/patched_simulation.py --bytes
1GiB --rounds 7 --pairs npz hdf5`` (``PATCH=none`` runs the core as it is).

1. save_npz: write into the mkstemp file opened ``'r+b'`` (no O_TRUNC, so no ext4
   auto_da_alloc flush when the file is closed).
2. save_hdf5: hand h5py a temporary name that does not exist yet (no O_TRUNC either).
3. ZipWriter: CRC (and deflate) then write in 256 KiB pieces, while the piece is in cache.
4. MemberReader.readinto: read then CRC in 256 KiB pieces, while the piece is in cache.
"""

import contextlib
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..')))

from gpuserial import _fileio, _zipstream, hdf5, npz  # noqa: E402

PIECE = 256 << 10


@contextlib.contextmanager
def atomic_output(file, *, durable=True):
    if not _fileio.is_path(file):
        yield file
        return
    with _fileio.atomic_path(file, durable=durable) as temp, open(temp, 'r+b') as out:
        yield out


@contextlib.contextmanager
def atomic_path_unlinked(path, *, durable=True):
    with _fileio.atomic_path(path, durable=durable) as temp:
        os.unlink(temp)
        yield temp


def pieces(chunks):
    for chunk in chunks:
        view = memoryview(chunk).cast('B')
        for start in range(0, len(view), PIECE):
            yield view[start:start + PIECE]


original_write_member = _zipstream.ZipWriter.write_member
original_readinto = _zipstream.MemberReader.readinto


def write_member(self, name, chunks):
    return original_write_member(self, name, pieces(chunks))


def readinto(self, buffer):
    view = memoryview(buffer).cast('B')
    for start in range(0, len(view), PIECE):
        original_readinto(self, view[start:start + PIECE])
    return len(view)


if os.environ.get('PATCH', 'all') != 'none':
    npz.atomic_output = atomic_output
    hdf5.atomic_path = atomic_path_unlinked
    _zipstream.ZipWriter.write_member = write_member
    _zipstream.MemberReader.readinto = readinto

from benchmarks import compare  # noqa: E402

if __name__ == '__main__':
    sys.exit(compare.main())
