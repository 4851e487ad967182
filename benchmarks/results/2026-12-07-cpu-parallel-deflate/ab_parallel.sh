# Alternating fresh processes: the commit before the change (checked out in BASE) and this
# tree; prints the medians over the pairs of a compressed 128 MiB save and of a load of the
# same file, written by this tree (ab_parallel.py). Usage: bash ab_parallel.sh BASE PAIRS
BASE=${1:?the base tree}; PAIRS=${2:-6}
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../../.." && pwd)
FILE=$(mktemp --suffix=.npz)
python -c "
import sys; sys.path.insert(0, '$ROOT')
import numpy; from gpuserial import serializers
rng = numpy.random.default_rng(0)
serializers.save_npz('$FILE', {f'w{i}': rng.standard_normal(2 << 20).astype(numpy.float32)
                              for i in range(16)}, compression=True)"
for i in $(seq "$PAIRS"); do
  echo "$(python "$HERE/ab_parallel.py" "$BASE" "$FILE") $(python "$HERE/ab_parallel.py" "$ROOT" "$FILE")"
done | python -c '
import statistics, sys
rows = [list(map(float, line.split())) for line in sys.stdin]
m = [statistics.median(c) for c in zip(*rows)]
for i, name in enumerate(["save_npz compressed", "load_npz compressed"]):
    print(f"{name} 128 MiB: base {m[i]:.3f} s  new {m[i + 2]:.3f} s  base/new {m[i] / m[i + 2]:.2f}x")'
rm -f "$FILE"
