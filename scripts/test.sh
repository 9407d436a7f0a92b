#!/usr/bin/env bash
# The test command: lint, then the whole suite. Triton kernels run through the Triton
# interpreter on CPU tensors (TRITON_INTERPRET=1), so CI exercises every kernel; then every
# kernel specialization the suite launched is compiled for an H100/H200 (sm_90) with the
# real Triton compiler, which catches what only the interpreter accepts. A full run then
# builds the documentation site (mkdocs build --strict) and checks the install as users get
# it (scripts/check_install.sh: sdist, wheel, path and git installs into fresh environments).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k adam`) and skip those two.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/setup_env.sh
"$PYTHON" -m ruff check sam_fused tests benchmarks lab
# every Triton kernel must run here: a triton that fails to import is an error, not a skip
export SAM_FUSED_REQUIRE_TRITON="${SAM_FUSED_REQUIRE_TRITON:-1}"
if [ "${SAM_FUSED_TEST_DEVICE:-cpu}" != "cpu" ]; then
  "$PYTHON" -m pytest tests "$@"
  exit
fi
export TRITON_INTERPRET=1
# the record stays in build/: benchmarks/gpu_check.sh compiles it up front on a GPU machine
mkdir -p build
launches=build/launches.json
rm -f "$launches"
# one pytest-xdist worker per core (SAM_FUSED_TEST_WORKERS overrides; 0 runs in this process);
# --dist loadfile keeps a module's tests on one worker, so its module-scoped fixtures (the
# two-rank runs of test_distributed.py, test_dcp.py) run once
workers="${SAM_FUSED_TEST_WORKERS:-$("$PYTHON" -c "import os; print(min(4, os.cpu_count() or 1))")}"
xdist=()
if [ "$workers" -gt 1 ]; then xdist=(-n "$workers" --dist loadfile); fi
SAM_FUSED_RECORD_LAUNCHES="$launches" "$PYTHON" -m pytest ${xdist[@]+"${xdist[@]}"} tests "$@"
# a filtered run (extra pytest arguments) may launch no kernel at all
# One specialization (AdamW + amsgrad + weight decay, float32, no non-finite check, no
# clipping) spills 8 B/thread under ptxas with triton 3.9: reported on every run, allowed up to
# that size until it is removed (docs/development.md); anything larger fails.
"$PYTHON" tests/compile_kernels.py "$launches" --target cuda:90 --fail-on-spills --allow-spill-bytes 8 ${1:+--allow-empty}
if [ $# -gt 0 ]; then exit; fi
# the site goes to a temporary folder: only whether it builds, warnings included, matters here
site="$(mktemp -d "${TMPDIR:-/tmp}/sam_fused_site.XXXXXX")"
NO_MKDOCS_2_WARNING=1 "$PYTHON" -m mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"
unset TRITON_INTERPRET SAM_FUSED_RECORD_LAUNCHES
bash scripts/check_install.sh
