#!/usr/bin/env bash
# One call on a lent GPU machine (no network): install the project, run the GPU tests, tune
# and benchmark the kernels, then the quantization benchmark; results land in $OUT
# (or ./device_out). Budget: well under the 10-minute per-command limit.
#   bash scripts/device_run.sh            # everything
#   STEPS="tests bench" bash scripts/device_run.sh
set -uo pipefail
OUT=${OUT:-device_out}
STEPS=${STEPS:-"tests tune bench model quantize"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# builds the CUDA FFI library through CMake against this machine's jaxlib
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" \
  | tail -5 | tee "$OUT/install.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
if ! python3 -c "from any4_jax.kernels.cuda_ffi import _load; lib, why = _load(); print(why or \
    'CUDA library ok'); raise SystemExit(lib is None)" 2>&1 | tee "$OUT/build_cuda.txt"; then
  # fallback: nvcc directly (any4_jax/_lib/libany4_cuda.so in the source tree)
  python3 -m any4_jax.kernels.build_cuda 2>&1 | tail -3 | tee -a "$OUT/build_cuda.txt"
fi
for step in $STEPS; do
  case $step in
    tests)
      python3 -m pytest -q -x tests/quant tests/kernels -k "not sharded" -m "not slow" \
        -p no:cacheprovider 2>&1 | tail -20 | tee "$OUT/pytest.txt" ;;
    tune)
      python3 scripts/tune_pallas.py --write --reps 5 2>&1 | tail -40 | tee "$OUT/tune.txt"
      cp any4_jax/kernels/tuning.json "$OUT/" 2>/dev/null ;;
    bench)
      python3 scripts/bench_kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench_kernels.txt" ;;
    model)
      python3 scripts/bench_model_quant.py --model llama3-8b --out "$OUT" 2>&1 \
        | tail -5 | tee "$OUT/bench_model_quant.txt" ;;
    quantize)
      python3 scripts/bench_quantize.py --sklearn-rows 1024 --jobs 16 --out "$OUT" 2>&1 \
        | tee "$OUT/bench_quantize.txt" ;;
  esac
done
