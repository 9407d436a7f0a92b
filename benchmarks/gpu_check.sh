#!/usr/bin/env bash
# The one prepared check for a GPU machine, inside five minutes: versions, the test suite
# on CUDA, then the benchmark. Installs nothing (the GPU machine has no network).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # results and logs land in $OUT
#
# Every part runs under `timeout`, sized from one overall deadline (CHECK_BUDGET seconds,
# default 285), so a hang in one part cannot eat the others' time. Files written to $OUT:
# versions.txt, tests.log, bench.txt (the table), bench.json (every row, written after each
# row, so a killed run keeps what finished), bench_progress.log, summary.txt.
# Knobs: PYTHON, CHECK_BUDGET, TEST_TIMEOUT (default 90), BENCH_TIMEOUT (default 120),
# VARIANT_TIMEOUT (default 70),
# BENCH_ARGS (extra arguments for the benchmark CLI, e.g. "--quick").
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
cap() { # the smaller of a part's own limit and what the deadline leaves (minus kill grace)
  local want=$1 room=$(($(left) - 15))
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

section "tests (SAM_FUSED_TEST_DEVICE=cuda)"
if timeout 30 "$PYTHON" -c "import pytest" 2>/dev/null; then
  t=$(cap "${TEST_TIMEOUT:-90}")
  if [ "$t" -lt 20 ]; then
    echo "SKIPPED: only $(left) s left" | tee "$OUT/tests.log"
    summary+=("tests: skipped (no time left)")
  else
    timeout -k 10 "$t" "$PYTHON" -m pytest tests -q -x -k "not slow" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
    rc=$?
    [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s" | tee -a "$OUT/tests.log"
    summary+=("tests: exit $rc")
  fi
else
  echo "SKIPPED: pytest is not installed in this environment, and nothing can be installed" \
    "without network; the benchmark's own agreement check still compares the backends" | tee "$OUT/tests.log"
  summary+=("tests: skipped (no pytest)")
fi

section "benchmark"
t=$(cap "${BENCH_TIMEOUT:-120}")
if [ "$t" -lt 30 ]; then
  echo "SKIPPED: only $(left) s left" | tee "$OUT/bench.txt"
  summary+=("benchmark: skipped (no time left)")
else
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
  timeout -k 10 "$t" "$PYTHON" -m benchmarks.bench_sam_step --json "$OUT/bench.json" ${BENCH_ARGS:-} \
    2> >(tee "$OUT/bench_progress.log" >&2) | tee "$OUT/bench.txt"
  rc=$?
  [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s (bench.json holds the rows that finished)" | tee -a "$OUT/bench.txt"
  summary+=("benchmark: exit $rc")
fi

section "variant rows (triton, sgd; own byte counts)"
t=$(cap "${VARIANT_TIMEOUT:-70}")
if [ "$t" -lt 30 ]; then
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

section "summary"
{
  printf '%s\n' "${summary[@]}"
  echo "total $(($(date +%s) - start)) s; files in $OUT"
} | tee "$OUT/summary.txt"
for line in "${summary[@]}"; do
  case "$line" in *"exit 0"* | *skipped*) ;; *) exit 1 ;; esac
done
exit 0
