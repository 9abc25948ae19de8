#!/usr/bin/env bash
# On a lent GPU machine (no network): install the project (building the CUDA library), then
# the steps. Logs and JSON go to $W (default /tmp/any4_out) and are packed into
# $OUT/results.tgz after every step (the device tool returns at most 8 files; a call cut off by
# its limit keeps what earlier steps wrote). Each step runs in its own process group under a
# time limit ($T_<step> seconds, default 300) and is killed whole when it runs over: pytest-xdist
# workers that outlive a killed pytest once held a pipe open and hung a call until its limit.
# No step pipes its output: each writes a log, whose tail is printed after it.
#
# A 30-minute GPU session, most important first (each line one call of at most ~9 minutes;
# the machine goes back 30 s after a call, so each call pays ~30 s of start):
#   SKIP_INSTALL=1 STEPS="cudacheck cudabench" bash scripts/device_run.sh
#       # every CUDA configuration and each of the library's three kernels (scaled, unit_pair,
#       # unit_lane) against the host reference, compute-sanitizer, the variants' timing
#       # table, Nsight Compute, SASS (~6-8 min; no JAX)
#   STEPS="gputests bench decode" bash scripts/device_run.sh
#       # the JAX GPU tests (the default kernel on every shape, each of the three on a subset),
#       # the kernel table (dense, reference, Pallas and its lookups, CUDA and its three
#       # kernels), decode tok/s with the default CUDA kernel (DECODE_CUDA_KERNELS="scaled
#       # unit_pair": also with those, CUDA only). The library's kernel is a runtime choice
#       # (tuning.DEFAULT_CUDA_KERNEL, $ANY4_JAX_CUDA_KERNEL): no rebuild between calls; if
#       # the default fails its tests, ANY4_JAX_CUDA_KERNEL=scaled for the later steps
#   STEPS="tune model" bash scripts/device_run.sh
#       # then copy tuning.json into any4_jax/kernels/ and commit it
#   STEPS="overhead" bash scripts/device_run.sh
#       # if time is left (~5 min): the JAX-level cost per CUDA call with and without CUDA
#       # graphs (command buffers); if the trait costs time, drop it or make 0 the default
# SKIP_INSTALL=1 skips the install for steps that need no JAX (cudacheck, cudabench).
#
# Seen on the H100 of this workplace (2026-11-23, jax 0.11.2): compute-sanitizer and Nsight
# Compute segfault when they inject into a JAX process, so both run on the standalone CUDA
# program (ffi_kernels/bench/lut_gemm_bench.cu) instead.
set -uo pipefail
OUT=${OUT:-device_out}
W=${W:-/tmp/any4_out}
STEPS=${STEPS:-"cudacheck gputests bench decode"}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
pack() { tar czf "$OUT/results.tgz" -C "$W" . ; }

# run STEP LOG CMD...: CMD in a new session (process group) under ${T_STEP:-300} s, output to LOG
run() {
  local var="T_$1" log="$2"; shift 2
  local t=${!var:-300} t0=$SECONDS
  setsid "$@" > "$log" 2>&1 &
  local pid=$!
  ( sleep "$t"; kill -TERM -- "-$pid" 2>/dev/null; sleep 10; kill -KILL -- "-$pid" 2>/dev/null ) &
  local watch=$!
  wait "$pid"
  local rc=$?
  kill "$watch" 2>/dev/null
  wait "$watch" 2>/dev/null
  kill -KILL -- "-$pid" 2>/dev/null  # anything the step left behind
  echo "[$var: rc=$rc, $((SECONDS - t0)) s of ${t} s; log $log]"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  > "$W/gpu.txt" 2>&1
cat "$W/gpu.txt"
if [ -z "${SKIP_INSTALL:-}" ]; then
  # builds the CUDA FFI library through CMake against this machine's jaxlib
  T_install=${T_install:-240} run install "$W/install.txt" \
    python3 -m pip install -q --no-build-isolation --no-deps -e .
  tail -3 "$W/install.txt"
  # an install that failed (e.g. an older scikit-build-core there) must not stop the checks
  python3 -c "import any4_jax" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$W/gpu.txt" 2>&1
  if ! python3 -c "from any4_jax.native.loader import load_cuda; lib = load_cuda(); \
      print(lib.reason or 'CUDA library ok'); raise SystemExit(lib.lib is None)" \
      > "$W/build_cuda.txt" 2>&1
  then
    # fallback: nvcc directly (any4_jax/_lib/libany4_cuda.so in the source tree)
    python3 -m any4_jax.native.build_cuda >> "$W/build_cuda.txt" 2>&1
  fi
  cat "$W/build_cuda.txt"
fi
pack

BENCH_BIN=/tmp/lut_gemm_bench
build_bench() {
  [ -x "$BENCH_BIN" ] || nvcc -std=c++17 -O3 -lineinfo -gencode arch=compute_90a,code=sm_90a \
    -I ffi_kernels ffi_kernels/bench/lut_gemm_bench.cu -o "$BENCH_BIN" > "$W/nvcc_bench.txt" 2>&1
  grep -i error "$W/nvcc_bench.txt"
}

for step in $STEPS; do
  echo "=== $step"
  case $step in
    cudacheck)
      # the library's kernel entry and every configuration the timing table compares, on
      # awkward small cases against a host reference; then the entry under compute-sanitizer
      # memcheck and racecheck
      build_bench
      run cudacheck "$W/cudacheck.txt" "$BENCH_BIN" check
      tail -5 "$W/cudacheck.txt"
      for tool in memcheck racecheck; do
        T_cudacheck=${T_sanitize:-180} run cudacheck "$W/sanitize_$tool.txt" \
          compute-sanitizer --tool "$tool" --error-exitcode 1 "$BENCH_BIN" check lib
        tail -4 "$W/sanitize_$tool.txt"
      done ;;
    cudabench)
      # the CUDA kernel variants alone (CUDA events over graphs; no JAX), then Nsight Compute
      # on each variant at gate_up M = 1 and 16
      build_bench
      run cudabench "$W/cudabench.txt" "$BENCH_BIN"
      cuobjdump -sass "$BENCH_BIN" > "$W/sass.txt" 2>&1  # what ptxas made of each variant
      grep -E "^\||bandwidth" "$W/cudabench.txt" | head -80
      run ncu "$W/ncu_cuda.txt" ncu --clock-control none -k regex:lut_gemm \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis \
        --section ComputeWorkloadAnalysis --section InstructionStats "$BENCH_BIN" profile
      grep -E "lut_gemm_kernel|Duration|DRAM Throughput|Achieved Occupancy|Issue Slots Busy|L1/TEX Cache Throughput|Executed Instructions  " \
        "$W/ncu_cuda.txt" | sed -E 's/\(const .*//' | head -120 ;;
    gputests)
      # the GPU-marked kernel tests, in parallel processes; at most 10 failures (a broken
      # kernel fails every case)
      XLA_PYTHON_CLIENT_PREALLOCATE=false run gputests "$W/pytest_gpu.txt" \
        python3 -m pytest -q -rfE -n "${NPROC:-6}" --durations=15 --maxfail=10 -m gpu \
        tests/kernels -p no:cacheprovider
      tail -40 "$W/pytest_gpu.txt" ;;
    tests)
      # everything in tests/kernels and the layers that call them, on the GPU backend
      XLA_PYTHON_CLIENT_PREALLOCATE=false run tests "$W/pytest_full.txt" \
        python3 -m pytest -q -rfE -n "${NPROC:-6}" --maxfail=10 tests/kernels \
        tests/quant/test_prepare.py tests/quant/test_model_quant.py -p no:cacheprovider
      tail -40 "$W/pytest_full.txt" ;;
    quanttests)
      run quanttests "$W/pytest_quant.txt" python3 -m pytest -q -rfE tests/quant \
        -k "not sharded" -m "not slow" -p no:cacheprovider
      tail -20 "$W/pytest_quant.txt" ;;
    bench)
      # the goal shapes first (Llama-3-8B; every row is saved as it is measured):
      # each row compiles ~11 programs, 5 of them Triton kernels, so all ten shapes need more
      # than one step (BENCH_ARGS="--shapes llama3-70b/qkv_o,... --out $W/bench2" for the rest:
      # a later --out wins, and the JSON keeps its name)
      B8="--shapes llama3-8b/gate_up,llama3-8b/down,llama3-8b/qkv,llama3-8b/o"
      run bench "$W/bench_kernels.txt" python3 scripts/kernel_bench.py bench --out "$W" \
        ${BENCH_ARGS:-$B8}
      grep -E "^\||warning|device" "$W/bench_kernels.txt" ;;
    overhead)
      # where the JAX-level CUDA time above the standalone one comes from (13-19 us per call
      # once): the same small kernel table three ways, each its own process -- the handler
      # command-buffer compatible (default), the handler without that trait
      # (ANY4_JAX_CUDA_COMMAND_BUFFER=0: launched from the host), and XLA's command buffers off
      # altogether; a small shape (per-call cost dominates) and gate_up. With
      # DECODE_OVERHEAD=1 also decode tok/s with the CUDA kernel and the trait off.
      OA=${OVERHEAD_ARGS:-"--shapes 4096x4096,llama3-8b/gate_up --ms 1,16 --reps 5 --no-pallas-variants --no-cuda-variants"}
      declare -A OVERHEAD_ENV=([default]="" [no_trait]="ANY4_JAX_CUDA_COMMAND_BUFFER=0"
                               [no_cmdbuf]="XLA_FLAGS=--xla_gpu_enable_command_buffer=")
      for d in default no_trait no_cmdbuf; do
        mkdir -p "$W/overhead_$d"
        # shellcheck disable=SC2086  # the setting is one word or none
        T_overhead=${T_overhead:-150} run overhead "$W/overhead_$d/bench.txt" \
          env ${OVERHEAD_ENV[$d]} python3 scripts/kernel_bench.py bench --out "$W/overhead_$d" \
          $OA
        echo "--- $d"; grep -E "^\||rror" "$W/overhead_$d/bench.txt" | head -12
      done
      if [ "${DECODE_OVERHEAD:-0}" = 1 ]; then
        ANY4_JAX_CUDA_COMMAND_BUFFER=0 run decode "$W/overhead_no_trait/decode.txt" \
          python3 scripts/bench_decode.py --model llama3-8b --kernels cuda \
          --out "$W/overhead_no_trait" ${DECODE_ARGS:-}
        tail -6 "$W/overhead_no_trait/decode.txt"
      fi ;;
    decode)
      run decode "$W/bench_decode.txt" python3 scripts/bench_decode.py --model llama3-8b \
        --out "$W" ${DECODE_ARGS:-}
      tail -15 "$W/bench_decode.txt"
      for kern in ${DECODE_CUDA_KERNELS:-}; do  # one process per kernel (traced once)
        run decode "$W/bench_decode_$kern.txt" python3 scripts/bench_decode.py \
          --model llama3-8b --out "$W" ${DECODE_ARGS:-} --kernels cuda --cuda-kernel "$kern"
        tail -4 "$W/bench_decode_$kern.txt"
      done ;;
    tune)
      run tune "$W/tune.txt" python3 scripts/kernel_bench.py tune --write --reps 5 \
        --budget-s "${TUNE_BUDGET:-300}"
      tail -30 "$W/tune.txt"
      cp any4_jax/kernels/tuning.json "$W/" 2>/dev/null ;;
    model)
      run model "$W/bench_model_quant.txt" python3 scripts/bench_model_quant.py \
        --model llama3-8b --out "$W"
      tail -5 "$W/bench_model_quant.txt" ;;
    quantize)
      run quantize "$W/bench_quantize.txt" python3 scripts/bench_quantize.py \
        --sklearn-rows 1024 --jobs 16 --out "$W"
      tail -15 "$W/bench_quantize.txt" ;;
    profile)
      # Nsight Compute on the JAX kernels (segfaulted under JAX on this workplace's H100)
      run profile "$W/ncu.txt" ncu --profile-from-start off --clock-control none \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python3 scripts/kernel_bench.py profile ${PROFILE_ARGS:-}
      grep -E "Duration|DRAM Throughput" "$W/ncu.txt" | head -60 ;;
    *) echo "unknown step $step" ;;
  esac
  pack
done
