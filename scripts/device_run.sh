#!/usr/bin/env bash
# One call on a lent GPU machine (no network): install the project, run the tests on the
# GPU backend, then the benchmarks; results land in $OUT (or ./device_out).
#   bash scripts/device_run.sh
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -x tests/quant -k "not sharded" -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest.txt"
python3 scripts/bench_quantize.py --sklearn-rows 1024 --jobs 16 --out "$OUT" 2>&1 | tee "$OUT/bench_quantize.txt"
