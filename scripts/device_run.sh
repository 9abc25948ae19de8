#!/usr/bin/env bash
# One prepared call on a lent GPU machine (no network): install the project (building the CUDA
# library), then the checks and timings in priority order, all inside one deadline.
#
#   bash scripts/device_run.sh            # on the device: run(command=..., timeout_s=570)
#   DRY_RUN=1 bash scripts/device_run.sh  # on a CPU machine: every step's command, short caps
#
# A lent GPU comes for ~15 minutes of device time, its start included, so everything is one
# command of at most ~9 minutes: DEADLINE seconds (default 540) from the start, each step under
# its own cap T_<step>, cut to what is left of the deadline and skipped when under MIN_STEP s
# remain. Each step runs in its own process group and is killed whole when it runs over
# (pytest-xdist workers that outlived a killed pytest once held a pipe open and hung a call).
# Every result is written as it is measured: logs and JSON go to $W (default /tmp/any4_out)
# and are packed into $OUT/results.tgz after every step, so a cut-off call keeps what it did.
#
# STEPS (default, in priority order; each may also be named alone):
#   install   pip install --no-build-isolation --no-deps -e . (CMake builds the CUDA library,
#             Hopper only, 16 jobs); versions and the GPU name. Meanwhile, in the background,
#             nvcc builds the standalone program ffi_kernels/bench/lut_gemm_bench.cu
#   gpucheck  tests/kernels/test_gpu_matrix.py in NPROC processes (each CUDA kernel, each
#             Pallas variant; per-test lines in the log as they finish). Meanwhile, on the same
#             GPU: the standalone program's host-reference check of the library entry, then
#             compute-sanitizer memcheck on `check lib quick` (racecheck if time is left)
#   bench     scripts/kernel_bench.py bench: Llama-3-8B qkv, o, gate_up, down at M 1, 4, 16
#             (dense bf16, reference, Pallas and its variants, CUDA and its three kernels)
#   decode    scripts/bench_decode.py: Llama-3-8B-shaped, batch 1, bf16 vs any4 g128 through
#             the default CUDA kernel and Pallas
#   model     scripts/bench_model_quant.py --model llama3-8b (if time is left)
# Variables: DEADLINE, MIN_STEP, T_<step> (caps), NPROC, PY, GPUCHECK_K (pytest -k for
# gpucheck), BENCH_ARGS, DECODE_ARGS, DECODE_CUDA_KERNELS (also decode with each named CUDA
# kernel, one process each), MODEL_ARGS, BENCH_BIN (a standalone program built earlier).
# Also available: cudabench (the standalone timing table and SASS), tune, overhead (the CUDA
# call with and without the command-buffer trait, and without XLA's command buffers), quantize.
#
# Seen on the H100 of this workplace (2026-11-23, jax 0.11.2): compute-sanitizer and Nsight
# Compute segfault when they inject into a JAX process, so both run on the standalone program.
set -uo pipefail
OUT=${OUT:-device_out}
W=${W:-/tmp/any4_out}
DEADLINE=${DEADLINE:-540}
MIN_STEP=${MIN_STEP:-20}
STEPS=${STEPS:-"install gpucheck bench decode model"}
NPROC=${NPROC:-12}
PY=${PY:-python3}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
T0=$SECONDS
pack() { tar czf "$OUT/results.tgz" -C "$W" . 2>/dev/null; }
left() { echo $((DEADLINE - (SECONDS - T0))); }
log() { echo "[$(printf '%3d' $((SECONDS - T0))) s] $*" | tee -a "$W/steps.txt"; }
if [ -n "${DRY_RUN:-}" ]; then  # a CPU machine: short caps; the GPU steps decline or skip
  DEADLINE=${DRY_DEADLINE:-240}
fi

# run NAME CAP LOG CMD...: CMD in a new session under min(CAP, time left) seconds, output to
# LOG; returns CMD's status (124 when it was cut off, 125 when skipped for lack of time)
run() {
  local name=$1 cap=$2 log=$3; shift 3
  local t=$(( $(left) < cap ? $(left) : cap )) t0=$SECONDS
  if [ "$t" -lt "$MIN_STEP" ]; then
    log "$name: skipped, ${t} s left of the deadline"
    return 125
  fi
  setsid "$@" > "$log" 2>&1 &
  local pid=$!
  ( sleep "$t"; kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null
  ) > /dev/null 2>&1 &
  local watch=$!
  wait "$pid"
  local rc=$?
  kill "$watch" 2>/dev/null
  wait "$watch" 2>/dev/null
  kill -KILL -- "-$pid" 2>/dev/null  # anything the step left behind
  [ $((SECONDS - t0)) -ge "$t" ] && rc=124
  log "$name: rc=$rc, $((SECONDS - t0)) s of ${t} s; log $(basename "$log")"
  return $rc
}

# a program built on an earlier device machine may be carried in (BENCH_BIN=.devbin/...)
BENCH_BIN=${BENCH_BIN:-$W/lut_gemm_bench}
build_bench() {  # the standalone CUDA program (no JAX): checks, sanitizers, timing table
  nvcc -std=c++17 -O3 -lineinfo -gencode arch=compute_90a,code=sm_90a -I ffi_kernels \
    ffi_kernels/bench/lut_gemm_bench.cu -o "$BENCH_BIN"
}

# the standalone program's check, then memcheck (and racecheck) on the library entry; runs
# beside gpucheck and stops at the deadline DEADLINE_BG (seconds since start)
standalone_checks() {
  local end=${DEADLINE_BG:-$DEADLINE}
  # the build started by install (a sibling process: wait in the main shell cannot be used here)
  while [ ! -x "$BENCH_BIN" ] && kill -0 "${BENCH_PID:-none}" 2>/dev/null; do sleep 2; done
  [ -x "$BENCH_BIN" ] || { log "standalone program not built: $W/nvcc_bench.txt"; return 1; }
  DEADLINE=$end run cudacheck 60 "$W/cudacheck.txt" "$BENCH_BIN" check
  DEADLINE=$end run memcheck 90 "$W/sanitize_memcheck.txt" compute-sanitizer --tool memcheck \
    --error-exitcode 1 "$BENCH_BIN" check lib quick
  DEADLINE=$end run racecheck 90 "$W/sanitize_racecheck.txt" compute-sanitizer --tool racecheck \
    --error-exitcode 1 "$BENCH_BIN" check lib quick
}
wait_bench() {  # the background build, if one was started
  [ -n "${BENCH_PID:-}" ] && wait "$BENCH_PID" 2>/dev/null
  BENCH_PID=
  [ -x "$BENCH_BIN" ] || { log "standalone program not built: $W/nvcc_bench.txt"; return 1; }
}

log "start: steps '$STEPS', deadline ${DEADLINE} s, host $(hostname), $(nproc) CPUs"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  > "$W/gpu.txt" 2>&1
for step in $STEPS; do
  case $step in
    install)
      if command -v nvcc > /dev/null && [ ! -x "$BENCH_BIN" ]; then
        ( build_bench > "$W/nvcc_bench.txt" 2>&1 ) &
        BENCH_PID=$!
      fi
      # Hopper only: sm_80 would double the compile for a GPU this machine does not have
      CMAKE_BUILD_PARALLEL_LEVEL=16 run install "${T_install:-150}" "$W/install.txt" \
        "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
        -Ccmake.define.ANY4_JAX_CUDA_ARCHS=90a-real
      tail -3 "$W/install.txt"
      # an install that failed (e.g. an older scikit-build-core there) must not stop the checks
      "$PY" -c "import any4_jax" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
      "$PY" -c "import sys, jax, jaxlib, flax; print(sys.version.split()[0], 'jax', jax.__version__,
'jaxlib', jaxlib.__version__, 'flax', flax.__version__, jax.devices())" >> "$W/gpu.txt" 2>&1
      if ! "$PY" -c "from any4_jax.native.loader import load_cuda; lib = load_cuda(); \
          print(lib.reason or 'CUDA library ok'); raise SystemExit(lib.lib is None)" \
          > "$W/build_cuda.txt" 2>&1 && [ -z "${DRY_RUN:-}" ]; then
        # fallback: nvcc directly (any4_jax/_lib/libany4_cuda.so in the source tree)
        run build_cuda 90 "$W/build_cuda2.txt" "$PY" -m any4_jax.native.build_cuda
        cat "$W/build_cuda2.txt" >> "$W/build_cuda.txt"
      fi
      cat "$W/gpu.txt" "$W/build_cuda.txt" ;;
    gpucheck)
      # the standalone checks beside the tests, stopping when the tests' cap does
      cap=${T_gpucheck:-170}
      if command -v compute-sanitizer > /dev/null && [ -z "${DRY_RUN:-}" ]; then
        DEADLINE_BG=$(( SECONDS - T0 + cap )) standalone_checks &
        BG=$!
      fi
      to=""
      "$PY" -c "import pytest_timeout" 2>/dev/null && to="--timeout=120"
      run gpucheck "$cap" "$W/pytest_gpucheck.txt" "$PY" -m pytest -v -rfE -n "$NPROC" \
        -p no:cacheprovider $to --junitxml="$W/pytest_gpucheck.xml" \
        tests/kernels/test_gpu_matrix.py ${GPUCHECK_K:+-k "$GPUCHECK_K"}
      [ -n "${BG:-}" ] && wait "$BG"
      BG=
      grep -E "^(FAILED|ERROR)|passed|failed" "$W/pytest_gpucheck.txt" | tail -25
      for f in cudacheck sanitize_memcheck sanitize_racecheck; do
        [ -f "$W/$f.txt" ] && { echo "--- $f"; tail -4 "$W/$f.txt"; }
      done ;;
    bench)
      wait_bench > /dev/null 2>&1  # no compile beside the timings
      run bench "${T_bench:-130}" "$W/bench_kernels.txt" "$PY" scripts/kernel_bench.py bench \
        --out "$W" ${BENCH_ARGS:---shapes llama3-8b/gate_up,llama3-8b/down,llama3-8b/qkv,llama3-8b/o --ms 1,4,16}
      grep -E "^\||warning|device|failed" "$W/bench_kernels.txt" ;;
    decode)
      run decode "${T_decode:-110}" "$W/bench_decode.txt" "$PY" scripts/bench_decode.py \
        --out "$W" ${DECODE_ARGS:---model llama3-8b --kernels dense,cuda,pallas --tokens 64 --runs 3}
      grep -E "^\||device|failed" "$W/bench_decode.txt"
      for kern in ${DECODE_CUDA_KERNELS:-}; do  # one process per kernel (traced once)
        run decode "${T_decode:-110}" "$W/bench_decode_$kern.txt" "$PY" \
          scripts/bench_decode.py --out "$W" --model llama3-8b --kernels cuda --tokens 64 \
          --cuda-kernel "$kern"
        grep -E "^\||failed" "$W/bench_decode_$kern.txt"
      done ;;
    model)
      run model "${T_model:-120}" "$W/bench_model_quant.txt" "$PY" scripts/bench_model_quant.py \
        --out "$W" ${MODEL_ARGS:---model llama3-8b}
      tail -5 "$W/bench_model_quant.txt" ;;
    cudabench)  # the standalone timing table and what ptxas made of each variant
      wait_bench || continue
      run cudabench "${T_cudabench:-240}" "$W/cudabench.txt" "$BENCH_BIN"
      cuobjdump -sass "$BENCH_BIN" > "$W/sass.txt" 2>&1
      grep -E "^\||bandwidth" "$W/cudabench.txt" | head -80 ;;
    tune)
      run tune "${T_tune:-300}" "$W/tune.txt" "$PY" scripts/kernel_bench.py tune --write \
        --reps 5 --budget-s "${TUNE_BUDGET:-240}"
      tail -30 "$W/tune.txt"
      cp any4_jax/kernels/tuning.json "$W/" 2>/dev/null ;;
    overhead)
      # the cost per CUDA call three ways, each its own process: the handler with the
      # command-buffer trait (default), without it, and XLA's command buffers off
      declare -A OVERHEAD_ENV=([default]="" [no_trait]="ANY4_JAX_CUDA_COMMAND_BUFFER=0"
                               [no_cmdbuf]="XLA_FLAGS=--xla_gpu_enable_command_buffer=")
      for d in default no_trait no_cmdbuf; do
        mkdir -p "$W/overhead_$d"
        # shellcheck disable=SC2086  # the setting is one word or none
        run overhead "${T_overhead:-60}" "$W/overhead_$d/bench.txt" env ${OVERHEAD_ENV[$d]} \
          "$PY" scripts/kernel_bench.py bench --out "$W/overhead_$d" ${OVERHEAD_ARGS:---shapes \
          4096x4096,llama3-8b/gate_up --ms 1,16 --reps 5 --no-pallas-variants --no-cuda-variants}
        echo "--- $d"; grep -E "^\|" "$W/overhead_$d/bench.txt" | head -8
      done ;;
    quantize)
      run quantize "${T_quantize:-200}" "$W/bench_quantize.txt" "$PY" scripts/bench_quantize.py \
        --sklearn-rows 1024 --jobs 16 --out "$W"
      tail -15 "$W/bench_quantize.txt" ;;
    *) log "unknown step $step" ;;
  esac
  pack
done
[ -n "${BENCH_PID:-}" ] && kill "$BENCH_PID" 2>/dev/null
# the short summary last: the device tool returns the end of the output
echo "=== summary"
cat "$W/steps.txt"
grep -hE "^\|" "$W/bench_kernels.txt" "$W/bench_decode.txt" 2>/dev/null | head -40
grep -hE "passed|failed" "$W/pytest_gpucheck.txt" 2>/dev/null | tail -1
pack
