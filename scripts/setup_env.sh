#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with everything the tests
# and the benchmark need. Sourced by scripts/test.sh and scripts/bench.sh.
#
# torch is pinned to 2.13.0: on the project's CPU machines pip takes that CPU build from a
# local wheel; an unpinned torch would pull a multi-GB CUDA build. On a machine that
# already provides torch (SAM_FUSED_USE_SYSTEM_PYTHON=1, e.g. a GPU box) nothing is installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "${SAM_FUSED_USE_SYSTEM_PYTHON:-0}" = "1" ]; then
  PYTHON="${PYTHON:-python3}"
else
  venv="${SAM_FUSED_VENV:-$root/.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  PYTHON="$venv/bin/python"
  # numpy: the Triton interpreter (TRITON_INTERPRET=1) cannot import without it.
  # matplotlib, scikit-learn: the convergence lab (plots; the digits data), so that its
  # smoke test runs in CI instead of skipping.
  # expecttest: torch's own optimizer-test machinery (torch.testing._internal.common_optimizers,
  # which tests/test_conformance.py uses for torch's configurations and bad inputs) imports it.
  if ! "$PYTHON" -c "import torch, triton, numpy, pytest, pytest_benchmark, hypothesis, ruff, matplotlib, sklearn, expecttest" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check \
      "torch==2.13.0" "triton>=3.0" numpy pytest pytest-benchmark hypothesis ninja ruff matplotlib scikit-learn expecttest
  fi
fi
export PYTHON
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
