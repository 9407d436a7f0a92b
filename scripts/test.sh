#!/usr/bin/env bash
# The test command: lint, then the whole suite. Triton kernels run through the Triton
# interpreter on CPU tensors (TRITON_INTERPRET=1), so CI exercises every kernel.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k adam`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/setup_env.sh
"$PYTHON" -m ruff check sam_fused tests benchmarks lab
if [ "${SAM_FUSED_TEST_DEVICE:-cpu}" = "cpu" ]; then
  export TRITON_INTERPRET=1
fi
# every Triton kernel must run here: a triton that fails to import is an error, not a skip
export SAM_FUSED_REQUIRE_TRITON="${SAM_FUSED_REQUIRE_TRITON:-1}"
"$PYTHON" -m pytest tests "$@"
