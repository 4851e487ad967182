# Alternating fresh processes: the commit before this session (checked out in BASE) and this
# tree; prints the medians over the pairs of save and load, stored then deflated, in us an
# entry (ab_deflated.py). Usage: bash ab_deflated.sh BASE PAIRS
BASE=${1:?the base tree}; PAIRS=${2:-8}
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../../.." && pwd)
for i in $(seq "$PAIRS"); do
  echo "$(python "$HERE/ab_deflated.py" "$BASE") $(python "$HERE/ab_deflated.py" "$ROOT")"
done | python -c '
import statistics, sys
rows = [list(map(float, line.split())) for line in sys.stdin]
m = [statistics.median(c) for c in zip(*rows)]
names = ["save stored", "load stored", "save deflated", "load deflated"]
for i, name in enumerate(names):
    print(f"{name:14s} base {m[i]:7.2f}  new {m[i + 4]:7.2f}  new/base {m[i + 4] / m[i]:.2f}")'
