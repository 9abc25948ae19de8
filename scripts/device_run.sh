#!/usr/bin/env bash
# On a lent GPU machine (no network): install the project (building the CUDA library), then
# the steps. Logs and JSON go to $W (default /tmp/any4_out) and are packed into
# $OUT/results.tgz after every step (the device tool returns at most 8 files; a step cut off by
# the call's limit keeps what earlier steps wrote). Each step runs under `timeout`
# ($T_<step> seconds) so one slow step cannot eat the whole call. A session runs it in a few
# calls, most important first:
#   STEPS="gputests bench sanitize" bash scripts/device_run.sh  # correctness + kernel table
#   STEPS="decode tune" bash scripts/device_run.sh               # then copy tuning.json into
#                                                               # any4_jax/kernels/ and commit
#   STEPS="model quantize tests" bash scripts/device_run.sh     # quantization speed
set -uo pipefail
OUT=${OUT:-device_out}
W=${W:-/tmp/any4_out}
STEPS=${STEPS:-"gputests bench sanitize decode tune model quantize"}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
pack() { tar czf "$OUT/results.tgz" -C "$W" . ; }
run() {  # run STEP CMD...: under timeout ${T_STEP:-300}
  local var="T_$1"; shift
  local t=${!var:-300}
  local t0=$SECONDS
  timeout -k 10 "$t" "$@"
  local rc=$?
  echo "[$var: rc=$rc, $((SECONDS - t0)) s]"
  return $rc
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  | tee "$W/gpu.txt"
if [ -z "${SKIP_INSTALL:-}" ]; then  # (SKIP_INSTALL=1: steps that need no JAX, e.g. cudabench)
# builds the CUDA FFI library through CMake against this machine's jaxlib
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" \
  | tail -5 | tee "$W/install.txt"
# an install that failed (e.g. an older scikit-build-core there) must not stop the checks
python3 -c "import any4_jax" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$W/gpu.txt"
if ! python3 -c "from any4_jax.kernels.cuda_ffi import _load; lib, why = _load(); print(why or \
    'CUDA library ok'); raise SystemExit(lib is None)" 2>&1 | tee "$W/build_cuda.txt"; then
  # fallback: nvcc directly (any4_jax/_lib/libany4_cuda.so in the source tree)
  python3 -m any4_jax.kernels.build_cuda 2>&1 | tail -3 | tee -a "$W/build_cuda.txt"
fi
fi
pack
for step in $STEPS; do
  echo "=== $step"
  case $step in
    gputests)
      # the GPU-marked kernel tests, four processes (compilation dominates); at most 10
      # failures (a broken kernel fails every case)
      XLA_PYTHON_CLIENT_PREALLOCATE=false run gputests python3 -m pytest -q -rfE -n ${NPROC:-8} --durations=15 \
        --maxfail=10 -m gpu tests/kernels -p no:cacheprovider 2>&1 \
        | tee "$W/pytest_gpu_full.txt" | tail -40 ;;
    tests)
      # everything in tests/kernels and the layers that call them, on the GPU backend
      XLA_PYTHON_CLIENT_PREALLOCATE=false run tests python3 -m pytest -q -rfE -n 4 \
        --maxfail=10 tests/kernels tests/quant/test_prepare.py tests/quant/test_model_quant.py \
        -p no:cacheprovider 2>&1 | tee "$W/pytest_full.txt" | tail -40 ;;
    quanttests)
      # the whole quantization suite on the GPU backend (a session with time to spare)
      run quanttests python3 -m pytest -q -rfE tests/quant -k "not sharded" -m "not slow" \
        -p no:cacheprovider 2>&1 | tail -40 | tee "$W/pytest_quant.txt" ;;
    sanitize)
      for tool in memcheck racecheck; do
        XLA_PYTHON_CLIENT_ALLOCATOR=platform run sanitize compute-sanitizer --tool $tool \
          --kernel-name kns=lut_gemm --error-exitcode 1 python3 scripts/sanitize_cuda.py 2>&1 \
          | tail -15 | tee "$W/sanitize_$tool.txt"
      done ;;
    decode)
      run decode python3 scripts/bench_decode.py --model llama3-8b --out "$W" \
        ${DECODE_ARGS:-} 2>&1 | tee "$W/bench_decode.txt" ;;
    tune)
      run tune python3 scripts/tune_pallas.py --write --reps 5 --budget-s ${TUNE_BUDGET:-300} \
        2>&1 | tail -40 | tee "$W/tune.txt"
      cp any4_jax/kernels/tuning.json "$W/" 2>/dev/null ;;
    bench)
      run bench python3 scripts/bench_kernels.py --out "$W" ${BENCH_ARGS:-} 2>&1 \
        | tee "$W/bench_kernels.txt" ;;
    model)
      run model python3 scripts/bench_model_quant.py --model llama3-8b --out "$W" 2>&1 \
        | tail -5 | tee "$W/bench_model_quant.txt" ;;
    quantize)
      run quantize python3 scripts/bench_quantize.py --sklearn-rows 1024 --jobs 16 --out "$W" \
        2>&1 | tee "$W/bench_quantize.txt" ;;
    cudabench)
      # the CUDA kernel variants alone (CUDA events over graphs; no JAX), then Nsight Compute
      # on each variant at gate_up M = 1 and 16
      nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I ffi_kernels \
        ffi_kernels/bench/lut_gemm_bench.cu -o /tmp/lut_gemm_bench 2>&1 | grep -i error
      run cudabench /tmp/lut_gemm_bench 2>&1 | tee "$W/cudabench.txt"
      run ncu ncu --clock-control none -k regex:lut_gemm --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section InstructionStats /tmp/lut_gemm_bench profile > "$W/ncu_cuda.txt" 2>&1
      grep -E "lut_gemm_kernel|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|L1/TEX Cache Throughput|Executed Instructions  " \
        "$W/ncu_cuda.txt" | sed -E 's/\(const .*//' | head -120 ;;
    profile)
      # Nsight Compute: exact device time, speed-of-light and stall reasons of each kernel
      run profile ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        python3 scripts/profile_kernels.py ${PROFILE_ARGS:-} > "$W/ncu.txt" 2>&1
      grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occ" \
        "$W/ncu.txt" | head -150 ;;
    *) echo "unknown step $step" ;;
  esac
  pack
done
