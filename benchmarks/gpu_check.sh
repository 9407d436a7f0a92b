#!/usr/bin/env bash
# The one prepared check for a GPU machine, inside five minutes: versions, the build of the
# compiled extensions, the test suite on CUDA, the optimizer-step benchmark (triton, cuda
# and foreach rows), the variant rows, then the end-to-end training-step benchmark in --quick
# mode. Installs nothing (the GPU machine has no network).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # results and logs land in $OUT
#
# Every part runs under `timeout`, sized from one overall deadline (CHECK_BUDGET seconds,
# default 285), so a hang in one part cannot eat the others' time. The parts before the
# end-to-end benchmark leave it E2E_RESERVE seconds (default 65); it gets what is left.
#
# Exactly eight files land in $OUT (the device tool brings back at most eight):
#   check.txt        versions, toolchain, extension builds, Triton prewarm, the README's
#                    markdown tables (benchmarks/report.py) and the summary
#   tests.log        pytest on CUDA
#   bench.txt        the step table, the variant table, the FSDP2 rows (one GPU)
#   bench.json       every step row, written after each row (a killed run keeps what finished)
#   bench_variants.json, bench_e2e.txt, bench_e2e.json
#   progress.log     the benchmarks' progress (stderr) and the extension build logs
# `python -m benchmarks.report $OUT` turns the three JSON files into the README's tables.
#
# Knobs: PYTHON, CHECK_BUDGET, EXT_TIMEOUT (default 150), TEST_TIMEOUT (default 75),
# TEST_WORKERS (pytest-xdist processes where xdist is installed; default 8; pytest-timeout,
# where installed, stops any one test after 60 s), BENCH_TIMEOUT
# (default 60), VARIANT_TIMEOUT (default 30), FSDP2_TIMEOUT (default 35), E2E_RESERVE (default 65), GPU_TESTS (the test
# paths), BENCH_ARGS (extra step-benchmark arguments; default "--quick"; BENCH_ARGS= for the
# full run), E2E_ARGS, LAUNCHES (a launch record from `bash scripts/test.sh`, default
# build/launches.json: when present, every kernel specialization the CPU suite ran is
# compiled up front on all cores, so the tests and benchmarks find Triton's cache warm).
set -u -o pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
OUT="${OUT:-/tmp/sam_fused_out}"
mkdir -p "$OUT"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export SAM_FUSED_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
unset TRITON_INTERPRET SAM_FUSED_BACKEND
check="$OUT/check.txt"
progress="$OUT/progress.log"
: >"$check"
: >"$progress"

start=$(date +%s)
deadline=$((start + ${CHECK_BUDGET:-285}))
left() { echo $((deadline - $(date +%s))); }
reserve=${E2E_RESERVE:-65}
cap() { # the smaller of a part's own limit and what the deadline leaves (minus kill grace
  # and, for the parts before it, the end-to-end benchmark's reserve: cap SECONDS RESERVE)
  local want=$1 room=$(($(left) - 15 - ${2:-0}))
  if [ "$room" -lt "$want" ]; then echo "$room"; else echo "$want"; fi
}
section() { echo; echo "=== $* (t = $(($(date +%s) - start)) s)"; }
summary=()

if [ -z "${PYTHON:-}" ]; then
  for candidate in python python3; do
    if command -v "$candidate" >/dev/null && timeout 60 "$candidate" -c "import torch" 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
if [ -z "${PYTHON:-}" ]; then
  echo "no python with torch found (set PYTHON=...)" | tee -a "$check"
  exit 2
fi

section "versions" | tee -a "$check"
{
  timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv ||
    echo "nvidia-smi failed or is missing"
  timeout 60 "$PYTHON" - <<'EOF'
import os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cpus", os.cpu_count())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: NOT importable:", exc)
for name in ("pytest", "hypothesis", "pytest_benchmark", "xdist", "numpy"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "available"))
    except ImportError:
        print(name, "missing")
EOF
  echo "ninja: $(command -v ninja || echo missing) | nvcc: $(command -v nvcc || echo 'missing from PATH')" \
    "| c++: $(command -v "${CXX:-c++}" || command -v g++ || echo missing) | CUDA_HOME: ${CUDA_HOME:-unset}"
} 2>&1 | tee -a "$check"

section "compiled extensions: cpp and cuda built side by side (JIT, cached)" | tee -a "$check"
# Built here, once, under their own timeout: otherwise the first test process to ask for a
# backend would build it inside the test timeout. Two processes, so the nvcc and g++ builds
# overlap; the JIT cache then serves every later process.
t=$(cap "${EXT_TIMEOUT:-150}" "$reserve")
if [ "$t" -lt 20 ]; then
  echo "SKIPPED: only $(left) s left" | tee -a "$check"
  summary+=("extensions: skipped (no time left)")
else
  for kind in cpu cuda; do
    timeout -k 10 "$t" "$PYTHON" -c "
import time
t0 = time.perf_counter()
from sam_fused._extension import ${kind}_extension
info = ${kind}_extension().info()
print('$kind:', 'available' if info else 'UNAVAILABLE', '(' + info.detail + ')', f'after {time.perf_counter() - t0:.0f} s')
" >"$OUT/.build_$kind" 2>&1 &
  done
  wait
  cat "$OUT/.build_cpu" "$OUT/.build_cuda" >>"$progress"
  grep -h -E "^(cpu|cuda):" "$OUT/.build_cpu" "$OUT/.build_cuda" | tee -a "$check"
  rm -f "$OUT/.build_cpu" "$OUT/.build_cuda"
  if grep -q "^cuda: available" "$check"; then
    summary+=("extensions: exit 0, cuda backend available")
  elif grep -q "^cuda: UNAVAILABLE" "$check" && ! grep -q "^cuda: UNAVAILABLE.*build failed" "$check"; then
    # no CUDA in this torch, no GPU, no nvcc...: an environment limitation, nothing to clean
    summary+=("extensions: cuda backend NOT available here (see check.txt)")
  else
    # a killed or failed build: drop torch's lock (a later process would wait on it for
    # good) and let the later parts run without compiled backends instead of rebuilding
    timeout 30 "$PYTHON" - <<'EOF' 2>&1 | tee -a "$check"
from pathlib import Path
from torch.utils import cpp_extension
for name in ("sam_fused_cpu", "sam_fused_cuda"):
    lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    if lock.exists():
        lock.unlink()
        print("removed the stale build lock", lock)
EOF
    export SAM_FUSED_NO_BUILD=1
    echo "later parts run with SAM_FUSED_NO_BUILD=1 (see progress.log for the build output)" | tee -a "$check"
    summary+=("extensions: cuda build FAILED or timed out (see check.txt / progress.log)")
  fi
fi

section "Triton prewarm (compile the recorded specializations on all cores)" | tee -a "$check"
launches="${LAUNCHES:-build/launches.json}"
if [ ! -f "$launches" ]; then
  echo "no launch record at $launches: kernels compile on first use instead" | tee -a "$check"
else
  t=$(cap 60 "$reserve")
  # a real GPU is here, but the compile-only driver gives the same target, hence the same
  # cache entries the JIT looks up; a failure here is reported, the tests say more
  timeout -k 5 "$t" "$PYTHON" tests/compile_kernels.py "$launches" --target cuda:90 \
    --jobs "$(nproc)" 2>>"$progress" | tee -a "$check"
  rc=$?
  [ "$rc" -ne 0 ] && summary+=("prewarm: exit $rc (see progress.log)")
fi

section "tests (SAM_FUSED_TEST_DEVICE=cuda)" | tee -a "$check"
if timeout 30 "$PYTHON" -c "import pytest" 2>/dev/null; then
  t=$(cap "${TEST_TIMEOUT:-75}" "$reserve")
  if [ "$t" -lt 20 ]; then
    echo "SKIPPED: only $(left) s left" | tee "$OUT/tests.log"
    summary+=("tests: skipped (no time left)")
  else
    extra=()
    if timeout 30 "$PYTHON" -c "import xdist" 2>/dev/null; then
      extra+=(-n "${TEST_WORKERS:-8}")
    fi
    if timeout 30 "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
      extra+=(--timeout 60)  # one hung test must not take the whole part's time
    fi
    # --maxfail, not -x: the cuda backend's first run on a GPU (tests/test_backend_ops.py, which
    # runs every fused backend there) must not hide the rest of the suite behind its first failure. Without
    # xdist, what only a GPU can check runs first (CUDA graphs, the cuda backend, fp16
    # scaling on CUDA, Inductor), then the rest while time lasts (pytest drops repeated paths)
    # -vv (pyproject adds -q): one line per test as it finishes, so a run killed at its limit
    # still names what failed
    # shellcheck disable=SC2086  # GPU_TESTS is a list of paths on purpose
    timeout -k 10 "$t" "$PYTHON" -m pytest "${extra[@]}" ${GPU_TESTS:-tests/test_graph.py \
      tests/test_backend_ops.py tests/test_amp.py tests/test_compile.py tests/test_api.py tests} \
      -vv -rs --maxfail=20 -k "not slow" -p no:cacheprovider 2>&1 |
      tee "$OUT/tests.log" | tail -n 25
    rc=$?
    [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s" | tee -a "$OUT/tests.log"
    tail -n 3 "$OUT/tests.log" >>"$check"
    summary+=("tests: exit $rc")
  fi
else
  echo "SKIPPED: pytest is not installed in this environment, and nothing can be installed" \
    "without network; the benchmark's own agreement check still compares the backends" | tee "$OUT/tests.log"
  summary+=("tests: skipped (no pytest)")
fi

section "benchmark (optimizer step; triton, cuda and foreach rows)"
t=$(cap "${BENCH_TIMEOUT:-60}" "$reserve")
if [ "$t" -lt 30 ]; then
  echo "SKIPPED: only $(left) s left" | tee "$OUT/bench.txt"
  summary+=("benchmark: skipped (no time left)")
else
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
  timeout -k 10 "$t" "$PYTHON" -m benchmarks.bench_sam_step --json "$OUT/bench.json" \
    --impls baseline,reference,foreach,triton,triton_noskip,cuda,cuda_noskip ${BENCH_ARGS---quick} \
    2>>"$progress" | tee "$OUT/bench.txt"
  rc=$?
  [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s (bench.json holds the rows that finished)" | tee -a "$OUT/bench.txt"
  summary+=("benchmark: exit $rc")
fi

section "variant rows (triton, sgd; own byte counts)"
t=$(cap "${VARIANT_TIMEOUT:-30}" "$reserve")
echo >>"$OUT/bench.txt"
if [ "$t" -lt 20 ]; then
  echo "variant rows SKIPPED: only $(left) s left" | tee -a "$OUT/bench.txt"
  summary+=("variants: skipped (no time left)")
else
  timeout -k 10 "$t" "$PYTHON" -m benchmarks.bench_sam_step --quick --no-check --base sgd \
    --sets resnet50,2000x4096 --impls triton --variants all --json "$OUT/bench_variants.json" \
    2>>"$progress" | tee -a "$OUT/bench.txt"
  rc=$?
  [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s (bench_variants.json holds the rows that finished)" | tee -a "$OUT/bench.txt"
  summary+=("variants: exit $rc")
fi

section "FSDP2 on one GPU: the table layout beside the flat one (bench_fsdp2)"
t=$(cap "${FSDP2_TIMEOUT:-35}" "$reserve")
echo >>"$OUT/bench.txt"
if [ "$t" -lt 20 ]; then
  echo "FSDP2 rows SKIPPED: only $(left) s left" | tee -a "$OUT/bench.txt"
  summary+=("fsdp2: skipped (no time left)")
else
  timeout -k 10 "$t" "$PYTHON" -m benchmarks.bench_fsdp2 --device cuda --base sgd --reps 5 \
    --sets resnet50,2000x4096 2>>"$progress" | tee -a "$OUT/bench.txt"
  rc=$?
  [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s" | tee -a "$OUT/bench.txt"
  summary+=("fsdp2: exit $rc")
fi

section "end-to-end training step (bench_e2e --quick)"
t=$(cap 600)  # whatever the deadline leaves
if [ "$t" -lt 30 ]; then
  echo "SKIPPED: only $(left) s left" | tee "$OUT/bench_e2e.txt"
  summary+=("e2e: skipped (no time left)")
else
  # --time-limit stops starting rows 20 s before the timeout, so the table and the target
  # lines still get printed; each finished row is on stdout and in the JSON already
  # shellcheck disable=SC2086  # E2E_ARGS is a list of words on purpose
  timeout -k 10 "$t" "$PYTHON" -m benchmarks.bench_e2e --quick --time-limit $((t - 20)) \
    --json "$OUT/bench_e2e.json" ${E2E_ARGS:-} 2>>"$progress" | tee "$OUT/bench_e2e.txt"
  rc=$?
  [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s (bench_e2e.json holds the rows that finished)" | tee -a "$OUT/bench_e2e.txt"
  summary+=("e2e: exit $rc")
fi

section "README tables (python -m benchmarks.report)" >>"$check"
timeout 30 "$PYTHON" -m benchmarks.report "$OUT" >>"$check" 2>&1

section "summary" | tee -a "$check"
{
  printf '%s\n' "${summary[@]}"
  echo "total $(($(date +%s) - start)) s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} | tee -a "$check"
for line in "${summary[@]}"; do
  case "$line" in *"exit 0"* | *skipped* | *available) ;; *) exit 1 ;; esac
done
exit 0
