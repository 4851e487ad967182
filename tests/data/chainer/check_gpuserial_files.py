"""Load files written by gpuserial with real Chainer and print their values.

Run with the Chainer venv's python (see README.md):

    /work/chainer-venv/bin/python tests/data/chainer/check_gpuserial_files.py DIR
        [--compare] [--files NAME ...]

Every file of DIR named like a reference file of this directory
(linear.npz, linear_uncompressed.npz, chain.h5, bn.npz, momentum_sgd.npz,
adam_model.h5, trainer_snapshot.npz, ...; see chainer_models.CASES) is
loaded with chainer.serializers.load_npz / load_hdf5 (strict) into a freshly
built matching Chainer object, which is then serialized again with Chainer's
DictionarySerializer.  Printed on stdout, as JSON:

    {filename: {key: float64 sum or null (a stored None)}}

A file Chainer fails to load gives {"__error__": "ExceptionType: message"}.
Other files of DIR are ignored.

--compare also checks each file's sums against expected.json of this
directory (same file name, else the same stem in the other format) and
exits 1, listing differences on stderr, if
any key or sum differs.
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import chainer_models as cm
from chainer import serializers


def load_file(path):
    """{key: sum} of the Chainer object loaded from ``path``."""
    case, fmt = cm.case_for_filename(os.path.basename(path))
    obj = case.fresh()
    if fmt == "npz":
        serializers.load_npz(path, obj)
    else:
        serializers.load_hdf5(path, obj)
    state = cm.flat_state(obj)
    return {key: cm.value_sum(value) for key, value in state.items()}


def compare(results, expected):
    problems = []
    for fname, sums in results.items():
        if "__error__" in sums:
            problems.append("{}: {}".format(fname, sums["__error__"]))
            continue
        exp = expected.get(fname)
        if exp is None:
            # Same values in either format (e.g. trainer_snapshot.h5, which
            # is not shipped, against trainer_snapshot.npz).
            stem = os.path.splitext(fname)[0]
            exp = expected.get(stem + ".npz") or expected.get(stem + ".h5")
        if exp is None:
            problems.append(f"{fname}: not in expected.json")
            continue
        if set(sums) != set(exp):
            problems.append(
                f"{fname}: keys differ: missing {sorted(set(exp) - set(sums))}, extra {sorted(set(sums) - set(exp))}"
            )
        for key in sorted(set(sums) & set(exp)):
            got, want = sums[key], exp[key]["sum"]
            if (got is None) != (want is None) or (
                got is not None
                and not math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-12)
            ):
                problems.append(f"{fname}: {key}: sum {got!r}, expected {want!r}")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory")
    parser.add_argument(
        "--files", nargs="*", help="only these file names (default: all known)"
    )
    parser.add_argument(
        "--compare", action="store_true", help="compare the sums with expected.json"
    )
    args = parser.parse_args(argv)

    names = args.files if args.files else sorted(os.listdir(args.directory))
    results = {}
    for name in names:
        if cm.case_for_filename(name)[0] is None:
            if args.files:
                parser.error(f"unknown reference file name: {name}")
            continue
        path = os.path.join(args.directory, name)
        try:
            results[name] = load_file(path)
        except Exception as e:  # noqa: BLE001 - report it, go on with the others
            results[name] = {"__error__": f"{type(e).__name__}: {e}"}

    json.dump(results, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")

    if args.compare:
        with open(os.path.join(HERE, "expected.json")) as f:
            expected = json.load(f)
        problems = compare(results, expected)
        for p in problems:
            sys.stderr.write(p + "\n")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
