#!/usr/bin/env bash
# On a CUDA machine (cupy, h5py, numpy, pytest, pytest-benchmark, torch and safetensors already
# installed; no network; isal and tqdm may be missing): the GPU tests, then the transfer and
# end-to-end benchmarks, the interleaved comparisons against the peers and the peak memory, with
# the package taken from this checkout (PYTHONPATH, no install). Logs and JSON go to $OUT (or
# ./gpu-results). Record what it printed in BENCHMARKS.md.
#
#   ci/gpu.sh quick           the lent-GPU check, under 8 minutes: the GPU tests, the README's
#                             GPU blocks, the 1 GiB comparisons (engine, peers), many small
#                             entries, asynchronous saves (blocked time, DCP beside), peak
#                             memory; nvidia-smi and the PCIe link recorded
#   ci/gpu.sh                 every stage
#   ci/gpu.sh tests compare   only these stages: tests, benchmarks (the GPU rows of benchmarks/),
#                             compare (= compare-npz compare-peers compare-compressed compare-cpu),
#                             small, async, peak, bench
#
# Wheels of packages the machine lacks (isal) go in .whl/ (ci/gpu-wheels.sh fetches them, here,
# where pip reaches PyPI); this script installs them into a private folder first.
#
# At 4 GiB each stage takes a few minutes: where one command may run at most 10 minutes, run
# the stages one or two per call (OUT kept), or lower GPUSERIAL_BENCH_BYTES.
#
# Sizes: GPUSERIAL_BENCH_BYTES (default 4GiB on the GPU), GPUSERIAL_BENCH_ROUNDS (pytest-benchmark
# rounds, default 3 here), COMPARE_ROUNDS (default 7). The exit status is non-zero when a stage
# failed; the stages after it still run.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x /opt/torch/.venv/bin/python3 ]]; then PYTHON=/opt/torch/.venv/bin/python3
  else PYTHON=python3; fi
fi
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
if compgen -G '.whl/*.whl' > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpuserial-site .whl/*.whl && export PYTHONPATH=/tmp/gpuserial-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPUSERIAL_BENCH_BYTES=${GPUSERIAL_BENCH_BYTES:-4GiB}
export GPUSERIAL_BENCH_ROUNDS=${GPUSERIAL_BENCH_ROUNDS:-3}
COMPARE_ROUNDS=${COMPARE_ROUNDS:-7}
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(tests benchmarks compare small async peak bench)
EXPANDED=()
for name in "${STAGES[@]}"; do
  if [[ $name == compare ]]; then EXPANDED+=(compare-npz compare-peers compare-compressed compare-cpu)
  elif [[ $name == quick ]]; then
    export GPUSERIAL_BENCH_BYTES=${QUICK_BYTES:-1GiB}
    COMPARE_ROUNDS=${QUICK_ROUNDS:-3}
    EXPANDED+=(smi tests readme compare-npz compare-peers small async peak)
  else EXPANDED+=("$name"); fi
done
STAGES=("${EXPANDED[@]}")
PYTEST=("$PYTHON" -m pytest -p no:cacheprovider -ra)
status=0

stage() {  # stage NAME COMMAND...: runs it, its output to the terminal and $OUT/NAME.log
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [[ $rc -eq 0 ]] || status=1
}

"$PYTHON" - <<'EOF' | tee "$OUT/machine.json"
import json, importlib.util
import gpuserial, gpuserial.serializers
from gpuserial.engine import devices
from gpuserial.tools import bench
info = bench.machine_info()
info['optional'] = {m: importlib.util.find_spec(m) is not None
                    for m in ('isal', 'tqdm', 'torch', 'safetensors', 'matplotlib')}
info['gpu_available'] = devices.gpu_available()
print(json.dumps(info, indent=2))
EOF
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo 'gpuserial does not import here'; exit 1; }

for name in "${STAGES[@]}"; do
  case $name in
    smi)
      stage nvidia-smi nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max --format=csv ;;
    tests)
      stage gpu-tests "${PYTEST[@]}" -m gpu tests ;;
    readme)
      stage readme "${PYTEST[@]}" tests/test_readme.py ;;
    small)
      stage small-entries "$PYTHON" benchmarks/small_entries.py --device cuda:0 \
        --json "$OUT/small-entries.json" ;;
    async)
      stage async-gpu "$PYTHON" benchmarks/async_save.py --device cuda:0 \
        --bytes "$GPUSERIAL_BENCH_BYTES" --rounds "$COMPARE_ROUNDS" --json "$OUT/async-gpu.json" ;;
    benchmarks)
      stage benchmarks "${PYTEST[@]}" -m gpu benchmarks --benchmark-enable \
        --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=min,median,max,rounds \
        --benchmark-sort=name ;;
    compare-npz)
      stage compare-gpu-npz "$PYTHON" benchmarks/compare.py --device cuda:0 \
        --rounds "$COMPARE_ROUNDS" --pairs npz --json "$OUT/compare-gpu-npz.json" ;;
    compare-peers)
      stage compare-gpu-peers "$PYTHON" benchmarks/compare.py --device cuda:0 \
        --rounds "$COMPARE_ROUNDS" --pairs peers whole --json "$OUT/compare-gpu-peers.json" ;;
    compare-compressed)
      stage compare-gpu-compressed "$PYTHON" benchmarks/compare.py --device cuda:0 \
        --bytes 256MiB --rounds "$COMPARE_ROUNDS" --pairs compressed \
        --json "$OUT/compare-gpu-compressed.json" ;;
    compare-cpu)
      stage compare-cpu "$PYTHON" benchmarks/compare.py --device cpu --bytes 1GiB \
        --rounds "$COMPARE_ROUNDS" --pairs npz hdf5 peers --json "$OUT/compare-cpu.json" ;;
    peak)
      stage peak-gpu "$PYTHON" benchmarks/peak_memory.py --device cuda:0 \
        --json "$OUT/peak-gpu.json" ;;
    bench)
      stage bench "$PYTHON" -c 'import sys; from gpuserial.tools import bench; sys.exit(bench.run())' ;;
    *)
      echo "unknown stage $name (quick smi tests readme benchmarks"\
        "compare[-npz|-peers|-compressed|-cpu] small async peak bench)"; status=1 ;;
  esac
done
echo "results in $OUT"
exit $status
