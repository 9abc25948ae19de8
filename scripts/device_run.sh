#!/usr/bin/env bash
# On a lent GPU machine (no network): install the project (building the CUDA library), then
# the steps; results land in $OUT (or ./device_out). One command may run 10 minutes, so a
# session runs it in four calls, most important first:
#   STEPS="tests sanitize" bash scripts/device_run.sh   # correctness (GPU tests, memcheck)
#   STEPS="bench decode" bash scripts/device_run.sh     # kernel table, end-to-end decode
#   STEPS="tune" bash scripts/device_run.sh             # then copy $OUT/tuning.json into
#                                                       # any4_jax/kernels/ and commit it
#   STEPS="model quantize" bash scripts/device_run.sh   # quantization speed
set -uo pipefail
OUT=${OUT:-device_out}
STEPS=${STEPS:-"tests sanitize bench decode tune model quantize"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# builds the CUDA FFI library through CMake against this machine's jaxlib
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" \
  | tail -5 | tee "$OUT/install.txt"
# an install that failed (e.g. an older scikit-build-core there) must not stop the checks
python3 -c "import any4_jax" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
if ! python3 -c "from any4_jax.kernels.cuda_ffi import _load; lib, why = _load(); print(why or \
    'CUDA library ok'); raise SystemExit(lib is None)" 2>&1 | tee "$OUT/build_cuda.txt"; then
  # fallback: nvcc directly (any4_jax/_lib/libany4_cuda.so in the source tree)
  python3 -m any4_jax.kernels.build_cuda 2>&1 | tail -3 | tee -a "$OUT/build_cuda.txt"
fi
for step in $STEPS; do
  case $step in
    tests)
      # the kernel tests and the layers that call them; at most 10 failures (a broken kernel
      # fails every case)
      python3 -m pytest -q -rfE --maxfail=10 tests/kernels tests/quant/test_prepare.py \
        tests/quant/test_model_quant.py -p no:cacheprovider 2>&1 \
        | tee "$OUT/pytest_full.txt" | tail -40 | tee "$OUT/pytest.txt" ;;
    quanttests)
      # the whole quantization suite on the GPU backend (a session with time to spare)
      python3 -m pytest -q -rfE tests/quant -k "not sharded" -m "not slow" \
        -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/pytest_quant.txt" ;;
    sanitize)
      for tool in memcheck racecheck; do
        XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool $tool \
          --kernel-name kns=lut_gemm --error-exitcode 1 python3 scripts/sanitize_cuda.py 2>&1 \
          | tail -15 | tee "$OUT/sanitize_$tool.txt"
      done ;;
    decode)
      python3 scripts/bench_decode.py --model llama3-8b --out "$OUT" 2>&1 \
        | tee "$OUT/bench_decode.txt" ;;
    tune)
      python3 scripts/tune_pallas.py --write --reps 5 --budget-s 360 2>&1 | tail -40 \
        | tee "$OUT/tune.txt"
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
