# Alternating fresh processes: the commit before this session (checked out in BASE) and this
# tree, 10,000 float32 arrays of 4 KiB, best of 7 saves and loads each (ab_small.py), in us an
# entry; prints the medians over the pairs. Usage: bash ab_small.sh BASE PAIRS
BASE=${1:?the base tree}; PAIRS=${2:-12}
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../../.." && pwd)
for i in $(seq "$PAIRS"); do
  echo "$(python "$HERE/ab_small.py" "$BASE") $(python "$HERE/ab_small.py" "$ROOT")"
done | python -c '
import statistics, sys
rows = [list(map(float, line.split())) for line in sys.stdin]
base_save, base_load, save, load = (statistics.median(c) for c in zip(*rows))
print(f"save base {base_save:.3f} new {save:.3f} | load base {base_load:.3f} new {load:.3f}")'
