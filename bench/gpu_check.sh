#!/usr/bin/env bash
# The prepared GPU check (README, "Benchmarks"): environment, CUDA tests, the every-config check,
# the host overhead per call (launches stubbed, CUDA tensors), the goal benchmark rows. Budget:
# 8 minutes on an H200, each stage under its own `timeout`; a failed or timed-out stage is
# reported and the next one still runs; the exit status is non-zero if any stage failed. Writes
# gpu_check.log, bench-warm.log, every_config.json, host-overhead.json, the bench JSON and pytest's
# JUnit XML (7 files: the device tool brings back at most 8) under $OUT when set, else bench/results/.
#
#   bash bench/gpu_check.sh          # on the GPU machine
#   bash bench/gpu_check.sh --dry    # the same stages on CPU, tiny sizes, Triton interpreter
#
# Peer libraries (the reference tests' comparisons, the baselines) travel as wheels in .whl/, made
# by bench/peer_wheels.sh and carried with the run (installed to /tmp/site).
# Environment: PYTHON (default python3), JOBS (parallel every-config shards / pytest workers,
# default 12), WARM_JOBS (background compile processes for the bench stage, default 8), STAGES
# (default "install cuda-tests kernel-tests every-config host-overhead bench"), and per-stage
# limits in seconds: T_INSTALL, T_CUDA_TESTS, T_KERNEL_TESTS, T_EVERY_CONFIG,
# T_HOST, T_BENCH, T_WARM (each warm process, from the start of the tests).
set -uo pipefail

DRY=0
case "${1:-}" in
  --dry) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"

main() {
export TSPLINE_AUTOTUNE=quick PYTHONUNBUFFERED=1
JOBS=${JOBS:-12} WARM_JOBS=${WARM_JOBS:-8}
if [ "$DRY" = 1 ]; then
  # interpreter, tiny sizes; the pytest stages only collect (CI runs those tests itself)
  export TRITON_INTERPRET=1
  JOBS=2
  PYTEST_EXTRA=(--collect-only -q)
  EVERY=(--dtype fp32 --case lowrank --limit 2 --rows 40 --mode sequence)
  WARM_JOBS=2
  BENCH=(--goal --tiny)
  HOST=(--layers "lowrank r16" --min-run-time 0.01)
else
  # -v: each outcome is logged as it happens, so a stage cut at its limit still names its failures
  PYTEST_EXTRA=(-v -rfE)
  EVERY=(--dtype bf16)
  BENCH=(--goal)
  HOST=(--min-run-time 0.05)
fi
# measured on the H200 (2026-11-30): install 3 s, cuda-tests 83 s, kernel-tests over 90 s, the
# every-config check 333 configs in 110 s; the host overhead about 30 s on this CPU (not yet run
# there); worst case with every stage at its limit: about 8 minutes
T_INSTALL=${T_INSTALL:-30} T_CUDA_TESTS=${T_CUDA_TESTS:-100} T_KERNEL_TESTS=${T_KERNEL_TESTS:-120}
T_EVERY_CONFIG=${T_EVERY_CONFIG:-40} T_HOST=${T_HOST:-45} T_BENCH=${T_BENCH:-120} T_WARM=${T_WARM:-240}

FAILED=()
START=$SECONDS
STAGES=" ${STAGES:-install cuda-tests kernel-tests every-config host-overhead bench} "
stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, record a failure, go on
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if [[ "$STAGES" != *" $name "* ]]; then
    echo "=== [$name] skipped (not in STAGES)"
    return
  fi
  echo
  echo "=== [$name] (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    FAILED+=("$name: timed out after ${limit}s")
  elif [ "$rc" != 0 ]; then
    FAILED+=("$name: exit status $rc")
  fi
  echo "=== [$name] exit $rc after $((SECONDS - t0))s (total $((SECONDS - START))s)"
}

echo "=== environment ($(date -u +%Y-%m-%dT%H:%M:%SZ), dry=$DRY)"
command -v nvidia-smi >/dev/null && nvidia-smi
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
"$PY" - <<'EOF'
import platform, torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
EOF

if [ "$DRY" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  # peer libraries for the baselines (tltorch, ndlinear, ...), carried as wheels: no network there
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if ! "$PY" -c "import tspline_kernels.bench.every_config" 2>/dev/null; then
  stage install "$T_INSTALL" "$PY" -m pip install --no-deps --no-build-isolation -e .
fi

# Compiling the goal rows' kernels (and torch.compile baselines) one after another took most of the
# bench stage's time on the H200: WARM_JOBS background processes (`tspline bench --warm K/N`)
# compile and autotune every case once while the test stages run, filling Triton's and Inductor's
# on-disk caches; the bench stage waits for them (each under T_WARM), then times from the cache.
WARM_PIDS=()
if [[ "$STAGES" == *" bench "* ]]; then
  echo "=== [bench-warm] $WARM_JOBS processes in the background (limit ${T_WARM}s each)"
  # one log for all of them ($OUT brings back at most 8 files), each line tagged with its process;
  # pipefail: the subshell's status is the warm process's
  for ((k = 0; k < WARM_JOBS; k++)); do
    ( timeout --kill-after=10 "$T_WARM" nice -n 5 "$PY" -m tspline_kernels.cli bench "${BENCH[@]}" --warm "$k/$WARM_JOBS" 2>&1 \
        | sed -u "s|^|[warm $k/$WARM_JOBS] |" >>"$DEST/bench-warm.log" ) &
    WARM_PIDS+=($!)
  done
fi
if [ "$DRY" = 0 ] && [[ "$STAGES" == *" every-config "* ]]; then
  # the every-config check compiles each case's first configs in one process before its shards
  # start, inside its deadline (run 1: about 70 of 110 s went before the shards' first results);
  # done here, in the background, it finds them in Triton's cache. Not waited for.
  ( timeout --kill-after=10 "$T_WARM" nice -n 5 "$PY" -m tspline_kernels.bench.every_config "${EVERY[@]}" --warm-only 2>&1 \
      | sed -u "s|^|[every-config warm] |" >>"$DEST/bench-warm.log" ) &
fi

PYTEST_GPU=()
if [ "$DRY" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
  PYTEST_GPU=(-n "$JOBS")
fi
if [ "$DRY" = 0 ] && "$PY" -c "import pytest_timeout" 2>/dev/null; then
  PYTEST_GPU+=(--timeout 60)  # a hung test fails alone instead of using up its stage
fi
session_timeout() {  # pytest-timeout >= 2.3 ends the session between tests and still reports
  if [ "$DRY" = 0 ] && "$PY" -c "import pytest_timeout as p; assert hasattr(p, 'SESSION_TIMEOUT_DESC')" 2>/dev/null; then
    echo "--session-timeout=$(($1 - 25))"
  fi
}
stage cuda-tests "$T_CUDA_TESTS" "$PY" -m pytest "${PYTEST_EXTRA[@]}" "${PYTEST_GPU[@]}" $(session_timeout "$T_CUDA_TESTS") -m cuda tests \
  --junitxml="$DEST/pytest-cuda.xml"
# the kernel tests: every test module that runs the Triton kernels on the `kernel_device` fixture
mapfile -t KERNEL_TESTS < <(grep -l kernel_device tests/test_*.py)
stage kernel-tests "$T_KERNEL_TESTS" "$PY" -m pytest "${PYTEST_EXTRA[@]}" "${PYTEST_GPU[@]}" $(session_timeout "$T_KERNEL_TESTS") "${KERNEL_TESTS[@]}" \
  --junitxml="$DEST/pytest-kernels.xml"
stage every-config "$((T_EVERY_CONFIG + 20))" "$PY" -m tspline_kernels.bench.every_config "${EVERY[@]}" \
  --jobs "$JOBS" --deadline "$T_EVERY_CONFIG" --json "$DEST/every_config.json"
# the host time per call of every layer at M=16 on CUDA tensors (the issue's goal is for a GPU host)
stage host-overhead "$T_HOST" "$PY" -m tspline_kernels.bench.host_overhead "${HOST[@]}" --out "$DEST/host-overhead.json"
if [ "${#WARM_PIDS[@]}" -gt 0 ]; then
  t0=$SECONDS warm_failed=0
  for pid in "${WARM_PIDS[@]}"; do wait "$pid" || warm_failed=$((warm_failed + 1)); done
  echo "=== [bench-warm] done $((SECONDS - t0))s after the tests; $warm_failed of $WARM_JOBS failed or timed out (bench-warm.log)"
  [ "$warm_failed" = 0 ] || FAILED+=("bench-warm: $warm_failed of $WARM_JOBS processes failed or timed out")
fi
# rows start until 40 s before the limit (the slowest H200 row so far took about a minute)
stage bench "$T_BENCH" "$PY" -m tspline_kernels.cli bench "${BENCH[@]}" --deadline "$((T_BENCH - 40))" --out "$DEST/"

echo
echo "=== done in $((SECONDS - START))s; results in $DEST"
if [ -n "${OUT:-}" ] && [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  FAILED+=("more than 8 files under \$OUT: the device tool brings back at most 8")
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  return 1
fi
echo "all stages passed"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
