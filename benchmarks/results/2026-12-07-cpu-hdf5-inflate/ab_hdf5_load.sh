# Alternating fresh processes: the commit before the change (checked out in BASE) and this
# tree; prints the medians over the pairs of a gzip-4 load_hdf5 of 256 MiB (ab_hdf5_load.py)
# from gpuserial's own file and from Chainer's (h5py's chunks).
# Usage: bash ab_hdf5_load.sh BASE PAIRS
BASE=${1:?the base tree}; PAIRS=${2:-5}
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../../.." && pwd)
for writer in gpuserial chainer; do
  for i in $(seq "$PAIRS"); do
    echo "$(python "$HERE/ab_hdf5_load.py" "$BASE" $writer) $(python "$HERE/ab_hdf5_load.py" "$ROOT" $writer)"
  done | WRITER=$writer python -c '
import os, statistics, sys
base, new = (statistics.median(c) for c in zip(*(map(float, l.split()) for l in sys.stdin)))
writer = os.environ["WRITER"]
print(f"load_hdf5 gzip 4, 256 MiB, {writer}-written: base {base:.3f} s  new {new:.3f} s  base/new {base / new:.2f}x")'
done
