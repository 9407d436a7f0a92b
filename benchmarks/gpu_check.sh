#!/usr/bin/env bash
# The one prepared check for a GPU machine, inside five minutes: versions, the build of the
# compiled extensions, the test suite on CUDA, the optimizer-step benchmark (triton and
# cuda rows), the variant rows, then the end-to-end training-step benchmark in --quick
# mode. Installs nothing (the GPU machine has no network).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # results and logs land in $OUT
#
# Every part runs under `timeout`, sized from one overall deadline (CHECK_BUDGET seconds,
# default 285), so a hang in one part cannot eat the others' time. The parts before the
# end-to-end benchmark leave it E2E_RESERVE seconds (default 65); it gets what is left.
# Files written to $OUT: versions.txt, extension.txt (toolchain and the build result),
# tests.log, bench.txt (the table), bench.json (every row, written after each row, so a
# killed run keeps what finished), bench_progress.log, bench_variants.txt/json,
# bench_e2e.txt/json (rows printed and saved as they finish), summary.txt.
# Knobs: PYTHON, CHECK_BUDGET, EXT_TIMEOUT (default 120), TEST_TIMEOUT (default 75),
# BENCH_TIMEOUT (default 60), VARIANT_TIMEOUT (default 30), E2E_RESERVE (default 65),
# GPU_TESTS (the test paths, in order), BENCH_ARGS (extra arguments for the step benchmark; default "--quick", which its 60 s now
# need; BENCH_ARGS= for the full run), E2E_ARGS (extra arguments for bench_e2e).
set -u -o pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
OUT="${OUT:-/tmp/sam_fused_out}"
mkdir -p "$OUT"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export SAM_FUSED_TEST_DEVICE=cuda
unset TRITON_INTERPRET SAM_FUSED_BACKEND

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
  echo "no python with torch found (set PYTHON=...)" | tee "$OUT/summary.txt"
  exit 2
fi

section "versions"
{
  timeout 20 nvidia-smi || echo "nvidia-smi failed or is missing"
  timeout 60 "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: NOT importable:", exc)
for name in ("pytest", "hypothesis", "pytest_benchmark"):
    try:
        __import__(name)
        print(name, "available")
    except ImportError:
        print(name, "missing")
EOF
} 2>&1 | tee "$OUT/versions.txt"

section "compiled extensions (JIT build of sam_fused's cpp and cuda backends)"
# Built here, once, under its own timeout: otherwise the first test process to ask for a
# backend would build it inside the test timeout. The JIT cache then serves later parts.
{
  echo "ninja: $(command -v ninja || echo missing) | nvcc: $(command -v nvcc || echo 'missing from PATH')" \
    "| c++: $(command -v "${CXX:-c++}" || command -v g++ || echo missing) | CUDA_HOME: ${CUDA_HOME:-unset}"
} 2>&1 | tee "$OUT/extension.txt"
t=$(cap "${EXT_TIMEOUT:-120}" "$reserve")
if [ "$t" -lt 20 ]; then
  echo "SKIPPED: only $(left) s left" | tee -a "$OUT/extension.txt"
  summary+=("extensions: skipped (no time left)")
else
  timeout -k 10 "$t" "$PYTHON" - <<'EOF' 2>&1 | tee -a "$OUT/extension.txt"
import sys, time
t0 = time.perf_counter()
import sam_fused
info = sam_fused.available_backends()  # loads each extension, compiling it on first use
for name, value in info.items():
    print(f"{name}: {'available' if value else 'UNAVAILABLE'} ({value.detail})")
print(f"available_backends() took {time.perf_counter() - t0:.0f} s")
sys.exit(0 if info["cuda"] else 3)
EOF
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "TIMED OUT after $t s" | tee -a "$OUT/extension.txt"
    # a killed build leaves torch's lock file behind, and the next process would wait on it
    # for good; the later parts then run without compiled backends instead of rebuilding
    timeout 30 "$PYTHON" - <<'EOF' 2>&1 | tee -a "$OUT/extension.txt"
from pathlib import Path
from torch.utils import cpp_extension
for name in ("sam_fused_cpu", "sam_fused_cuda"):
    lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    if lock.exists():
        lock.unlink()
        print("removed the stale build lock", lock)
EOF
    export SAM_FUSED_NO_BUILD=1
    echo "later parts run with SAM_FUSED_NO_BUILD=1" | tee -a "$OUT/extension.txt"
    summary+=("extensions: TIMED OUT after $t s (later parts without compiled backends)")
  elif grep -q "build failed" "$OUT/extension.txt"; then
    export SAM_FUSED_NO_BUILD=1  # each later process would retry the failing compile
    echo "later parts run with SAM_FUSED_NO_BUILD=1" | tee -a "$OUT/extension.txt"
    summary+=("extensions: a build FAILED (exit $rc; see extension.txt)")
  elif [ "$rc" -ne 0 ]; then  # no nvcc, no ninja...: an environment limitation, not a failure
    summary+=("extensions: cuda backend unavailable here, its tests and rows skipped (see extension.txt)")
  else
    summary+=("extensions: exit 0, cuda backend available")
  fi
fi

section "tests (SAM_FUSED_TEST_DEVICE=cuda)"
if timeout 30 "$PYTHON" -c "import pytest" 2>/dev/null; then
  t=$(cap "${TEST_TIMEOUT:-75}" "$reserve")
  if [ "$t" -lt 20 ]; then
    echo "SKIPPED: only $(left) s left" | tee "$OUT/tests.log"
    summary+=("tests: skipped (no time left)")
  else
    # --maxfail, not -x: the cuda backend's first run on a GPU (tests/test_cpp_backend.py with
    # COMPILED=cuda) must not hide the rest of the suite behind its first failure
    # what only a GPU can check runs first (CUDA graphs, the cuda backend, fp16 scaling on CUDA,
    # Inductor), then the rest of the suite while time lasts (pytest drops repeated paths)
    # shellcheck disable=SC2086  # GPU_TESTS is a list of paths on purpose
    timeout -k 10 "$t" "$PYTHON" -m pytest ${GPU_TESTS:-tests/test_graph.py tests/test_cpp_backend.py \
      tests/test_amp.py tests/test_compile.py tests/test_api.py tests} \
      -q -rs --maxfail=20 -k "not slow" -p no:cacheprovider 2>&1 |
      tee "$OUT/tests.log"
    rc=$?
    [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s" | tee -a "$OUT/tests.log"
    summary+=("tests: exit $rc")
  fi
else
  echo "SKIPPED: pytest is not installed in this environment, and nothing can be installed" \
    "without network; the benchmark's own agreement check still compares the backends" | tee "$OUT/tests.log"
  summary+=("tests: skipped (no pytest)")
fi

section "benchmark (optimizer step; triton and cuda rows)"
t=$(cap "${BENCH_TIMEOUT:-60}" "$reserve")
if [ "$t" -lt 30 ]; then
  echo "SKIPPED: only $(left) s left" | tee "$OUT/bench.txt"
  summary+=("benchmark: skipped (no time left)")
else
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
  timeout -k 10 "$t" "$PYTHON" -m benchmarks.bench_sam_step --json "$OUT/bench.json" ${BENCH_ARGS---quick} \
    2> >(tee "$OUT/bench_progress.log" >&2) | tee "$OUT/bench.txt"
  rc=$?
  [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s (bench.json holds the rows that finished)" | tee -a "$OUT/bench.txt"
  summary+=("benchmark: exit $rc")
fi

section "variant rows (triton, sgd; own byte counts)"
t=$(cap "${VARIANT_TIMEOUT:-30}" "$reserve")
if [ "$t" -lt 20 ]; then
  echo "SKIPPED: only $(left) s left" | tee "$OUT/bench_variants.txt"
  summary+=("variants: skipped (no time left)")
else
  timeout -k 10 "$t" "$PYTHON" -m benchmarks.bench_sam_step --quick --no-check --base sgd \
    --sets resnet50,2000x4096 --impls triton --variants all --json "$OUT/bench_variants.json" \
    2>>"$OUT/bench_progress.log" | tee "$OUT/bench_variants.txt"
  rc=$?
  [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s (bench_variants.json holds the rows that finished)" | tee -a "$OUT/bench_variants.txt"
  summary+=("variants: exit $rc")
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
    --json "$OUT/bench_e2e.json" ${E2E_ARGS:-} 2>>"$OUT/bench_progress.log" | tee "$OUT/bench_e2e.txt"
  rc=$?
  [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s (bench_e2e.json holds the rows that finished)" | tee -a "$OUT/bench_e2e.txt"
  summary+=("e2e: exit $rc")
fi

section "summary"
{
  printf '%s\n' "${summary[@]}"
  echo "total $(($(date +%s) - start)) s; files in $OUT"
} | tee "$OUT/summary.txt"
for line in "${summary[@]}"; do
  case "$line" in *"exit 0"* | *skipped*) ;; *) exit 1 ;; esac
done
exit 0
