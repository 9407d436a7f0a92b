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
  # pytest-xdist: the suite runs on both cores (scripts/test.sh), which halves CI's wall time.
  if ! "$PYTHON" -c "import torch, triton, numpy, pytest, pytest_benchmark, hypothesis, ruff, matplotlib, sklearn, expecttest, xdist" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check \
      "torch==2.13.0" "triton>=3.0" numpy pytest pytest-benchmark hypothesis ninja ruff matplotlib scikit-learn expecttest \
      pytest-xdist
  fi
  # The frameworks tests/test_integration_*.py drive for real (sam_fused/integrations): exact
  # versions, since the Lightning and Trainer glue uses hooks of these releases; the
  # constraint file holds torch at 2.13.0 (none of them may replace it). timm brings
  # torchvision (tests/_frameworks.py makes PyPI's CUDA-linked wheel importable beside the
  # CPU torch). Checked through the installed metadata, without importing anything.
  frameworks=(lightning==2.6.6 accelerate==1.15.0 transformers==5.24.0 timm==1.0.31)
  if ! "$PYTHON" - "${frameworks[@]}" <<'PY' 2>/dev/null; then
import importlib.metadata as m, sys
sys.exit(any(m.version(n) != v for n, v in (a.split("==") for a in sys.argv[1:])))
PY
    "$PYTHON" -m pip install --quiet --disable-pip-version-check \
      -c "$root/scripts/constraints.txt" "${frameworks[@]}"
  fi
  # installed here, so their tests must run (tests/_frameworks.py)
  export SAM_FUSED_REQUIRE_FRAMEWORKS="${SAM_FUSED_REQUIRE_FRAMEWORKS:-1}"
fi
export PYTHON
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
