"""Write the Chainer reference files of this directory.

Run with the Chainer venv's python (see README.md):

    /work/chainer-venv/bin/python tests/data/chainer/make_reference.py

It (re)writes, next to itself, the reference NPZ/HDF5 files written by
chainer.serializers.save_npz/save_hdf5, a plain numpy.savez file,
expected.json (what each file holds, read back from disk) and meta.json
(versions and format details).  Values are deterministic: reruns give
identical arrays (the zip members' timestamps do differ).
"""

import io
import json
import os
import platform
import sys
import zipfile

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))

# Chainer keeps a link's parameter/persistent names in sets, so the order of
# the NPZ members and HDF5 datasets follows str hashing: fix the hash seed
# (re-exec) so that reruns write the same order.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)
sys.path.insert(0, HERE)

import chainer
import chainer_models as cm
import h5py
from chainer import serializers

# --------------------------------------------------------------- writing

# Loadable by check_gpuserial_files.py but not shipped as references, to
# keep this directory small (Chainer's HDF5 files are 5-35 KB each).
NOT_WRITTEN = {"trainer_snapshot.h5"}


def write_references(outdir):
    written = []
    for stem, case in cm.CASES.items():
        obj = case.build()
        if "npz" in case.formats:
            path = os.path.join(outdir, stem + ".npz")
            serializers.save_npz(path, obj)
            written.append(path)
            if stem == "linear":
                path = os.path.join(outdir, "linear_uncompressed.npz")
                serializers.save_npz(path, obj, compression=False)
                written.append(path)
        if "h5" in case.formats and stem + ".h5" not in NOT_WRITTEN:
            path = os.path.join(outdir, stem + ".h5")
            serializers.save_hdf5(path, obj)
            written.append(path)
    path = os.path.join(outdir, "numpy_plain.npz")
    write_numpy_plain(path)
    written.append(path)
    return written


def write_numpy_plain(path):
    rs = numpy.random.RandomState(900)
    arrays = {
        "bool": rs.randint(0, 2, size=(2, 3)).astype(numpy.bool_),
        "int8": rs.randint(-128, 128, size=(5,)).astype(numpy.int8),
        "uint16": rs.randint(0, 65536, size=(2, 2)).astype(numpy.uint16),
        "int32": rs.randint(-1000, 1000, size=(3, 2)).astype(numpy.int32),
        "int64": rs.randint(-(10**6), 10**6, size=(4,)).astype(numpy.int64),
        "float16": rs.uniform(-4, 4, size=(3,)).astype(numpy.float16),
        "float32": rs.uniform(-1, 1, size=(2, 3, 2)).astype(numpy.float32),
        "float64": rs.uniform(-1, 1, size=(4, 1)).astype(numpy.float64),
        "complex64": (
            rs.uniform(-1, 1, size=(3,)) + 1j * rs.uniform(-1, 1, size=(3,))
        ).astype(numpy.complex64),
        "scalar0d": numpy.asarray(3.5, dtype=numpy.float32),
        "empty": numpy.zeros((0, 3), dtype=numpy.float32),
        "fortran": numpy.asfortranarray(
            rs.uniform(-1, 1, size=(2, 3)).astype(numpy.float32)
        ),
    }
    numpy.savez(path, **arrays)


# --------------------------------------------------------------- reading


def _npy_header(raw):
    """(version, header dict, data offset) of a .npy member's bytes."""
    f = io.BytesIO(raw)
    version = numpy.lib.format.read_magic(f)
    if version == (1, 0):
        _, fortran, _ = numpy.lib.format.read_array_header_1_0(f)
    else:
        _, fortran, _ = numpy.lib.format.read_array_header_2_0(f)
    return version, fortran, f.tell()


def _describe_array(arr, with_values=False):
    arr = numpy.asarray(arr)
    is_none = arr.dtype == object and arr.shape == () and arr[()] is None
    entry = {
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "sum": cm.value_sum(arr),
        "is_none": bool(is_none),
    }
    if arr.dtype.kind == "c":
        entry["sum_imag"] = float(arr.astype(numpy.complex128).sum().imag)
    if arr.ndim == 0:
        entry["value"] = None if is_none else arr[()].item()
    elif with_values and arr.dtype.kind in "biu" and arr.size <= 64:
        entry["values"] = arr.tolist()
    return entry


def describe_npz(path, with_values=False):
    entries = {}
    details = {}
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        for info in infos:
            raw = zf.read(info.filename)
            version, fortran, offset = _npy_header(raw)
            key = info.filename.removesuffix(".npy")
            arr = numpy.load(io.BytesIO(raw), allow_pickle=True)
            entry = _describe_array(arr, with_values=with_values)
            entry["zip_compress_type"] = info.compress_type
            entries[key] = entry
            d = {"npy_version": list(version), "header_len": offset}
            if fortran:
                d["fortran_order"] = True
            if arr.dtype == object:
                pickled = raw[offset:]
                d["pickle_protocol"] = pickled[1] if pickled[:1] == b"\x80" else 0
                d["pickle_bytes_hex"] = pickled.hex()
            details[key] = d
    return entries, {"members": [i.filename for i in infos], "arrays": details}


def describe_h5(path, with_values=False):
    entries = {}
    details = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Group):
            details.setdefault("_groups", []).append(name)
            return
        if obj.shape is None:  # h5py.Empty: Chainer's None
            entry = {
                "shape": None,
                "dtype": str(obj.dtype),
                "sum": None,
                "is_none": True,
            }
        else:
            entry = _describe_array(obj[()], with_values=with_values)
            # h5py reads a scalar dataset as a numpy scalar; keep the
            # dataset's own shape/dtype.
            entry["shape"] = list(obj.shape)
            entry["dtype"] = str(obj.dtype)
        entry["h5_compression"] = obj.compression
        entry["h5_compression_opts"] = obj.compression_opts
        entries[name] = entry
        # Chunk shape and HDF5 type class of the datasets: only the ones
        # that are not the common case (float/int, chunked when size > 1).
        h5_type = type(obj.id.get_type()).__name__
        chunks = list(obj.chunks) if obj.chunks else None
        d = {}
        if h5_type not in ("TypeFloatID", "TypeIntegerID"):
            d["h5_type"] = h5_type
        if obj.shape is None or obj.size <= 1 or chunks != list(obj.shape):
            d["chunks"] = chunks
        if obj.attrs:
            d["attrs"] = dict(obj.attrs)
        if d:
            details[name] = d

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return entries, details


def dump_expected(expected):
    """JSON with one line per array (floats keep full repr precision)."""
    lines = ["{"]
    files = list(expected.items())
    for fi, (fname, entries) in enumerate(files):
        lines.append(f" {json.dumps(fname)}: {{")
        items = list(entries.items())
        for ki, (key, entry) in enumerate(items):
            lines.append(
                "  {}: {}{}".format(
                    json.dumps(key),
                    json.dumps(entry),
                    "," if ki < len(items) - 1 else "",
                )
            )
        lines.append(" }%s" % ("," if fi < len(files) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main


def main():
    outdir = HERE
    written = write_references(outdir)
    expected = {}
    meta = {
        "versions": {
            "python": platform.python_version(),
            "chainer": chainer.__version__,
            "numpy": numpy.__version__,
            "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version,
        },
        "trainer_elapsed_time_written": cm.TRAINER_ELAPSED_TIME,
        "files": {},
    }
    for path in written:
        name = os.path.basename(path)
        with_values = name.startswith("trainer_snapshot")
        if name.endswith(".npz"):
            entries, details = describe_npz(path, with_values)
        else:
            entries, details = describe_h5(path, with_values)
        expected[name] = entries
        meta["files"][name] = details

    with open(os.path.join(outdir, "expected.json"), "w") as f:
        f.write(dump_expected(expected))
    with open(os.path.join(outdir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=None, separators=(",", ":"), default=str)
        f.write("\n")

    print(
        f"chainer {chainer.__version__}, numpy {numpy.__version__}, h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})"
    )
    total = 0
    for path in written + [
        os.path.join(outdir, "expected.json"),
        os.path.join(outdir, "meta.json"),
    ]:
        size = os.path.getsize(path)
        total += size
        name = os.path.basename(path)
        keys = expected.get(name)
        print(
            f"{name:<28} {size:7d} bytes",
            "" if keys is None else f"{len(keys)} keys",
        )
        if keys:
            for key, e in keys.items():
                extra = ""
                if "value" in e:
                    extra = " value={!r}".format(e["value"])
                elif "values" in e:
                    extra = " values={!r}".format(e["values"])
                print(
                    f"    {key:<52} {e['shape']!s:<10} {e['dtype']:<9}"
                    f" sum={e['sum']!r}{extra}"
                )
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
