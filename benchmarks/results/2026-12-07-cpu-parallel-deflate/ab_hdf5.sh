# Alternating fresh processes: the commit before the change (checked out in BASE) and this
# tree; prints the medians over the pairs of a gzip-4 save_hdf5 of 32 MiB (ab_hdf5.py).
# Usage: bash ab_hdf5.sh BASE PAIRS
BASE=${1:?the base tree}; PAIRS=${2:-5}
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../../.." && pwd)
for i in $(seq "$PAIRS"); do
  echo "$(python "$HERE/ab_hdf5.py" "$BASE") $(python "$HERE/ab_hdf5.py" "$ROOT")"
done | python -c '
import statistics, sys
base, new = (statistics.median(c) for c in zip(*(map(float, l.split()) for l in sys.stdin)))
print(f"save_hdf5 gzip 4, 32 MiB: base {base:.3f} s  new {new:.3f} s  base/new {base / new:.2f}x")'
