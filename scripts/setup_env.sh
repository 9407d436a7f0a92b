#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv. Sourced by scripts/test.sh,
# scripts/bench.sh and scripts/lab.sh.
#
# SAM_FUSED_ENV=bench (scripts/bench.sh) installs only what the benchmark runs; the default,
# test, everything the tests, the lab and the documentation site need.
#
# torch is pinned to 2.13.0: on the project's CPU machines pip takes that CPU build from a
# local wheel; an unpinned torch would pull a multi-GB CUDA build. On a machine that
# already provides torch (SAM_FUSED_USE_SYSTEM_PYTHON=1, e.g. a GPU box) nothing is installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_setup_say() { echo "setup_env: $*" >&2; }

# installs what is missing; `pip install` shows its progress
_setup_bench() {
  # torch; ninja: the C++ backend compiles on first use; numpy: torch warns without it
  # (triton is for a GPU, where SAM_FUSED_USE_SYSTEM_PYTHON=1 uses the machine's own)
  if ! "$PYTHON" -c "import torch, ninja, numpy" 2>/dev/null; then
    _setup_say "installing torch 2.13.0 (CPU), ninja and numpy into $venv (about a minute, once)"
    "$PYTHON" -m pip install --disable-pip-version-check --progress-bar on "torch==2.13.0" ninja numpy >&2
  fi
}

_setup_test() {
  # numpy: the Triton interpreter (TRITON_INTERPRET=1) cannot import without it.
  # matplotlib, scikit-learn: the convergence lab (plots; the digits data), so that its
  # smoke test runs in CI instead of skipping.
  # expecttest: torch's own optimizer-test machinery (torch.testing._internal.common_optimizers,
  # which tests/test_conformance.py uses for torch's configurations and bad inputs) imports it.
  # pytest-xdist: the suite runs on both cores (scripts/test.sh), which halves CI's wall time.
  # build: scripts/check_install.sh builds the sdist and the wheel. mkdocs, mkdocs-material,
  # mkdocstrings-python: the documentation site (mkdocs.yml), built with --strict by the test
  # command; pinned, since a new release can add warnings that --strict turns into errors.
  if ! "$PYTHON" -c "import torch, triton, numpy, pytest, pytest_benchmark, hypothesis, ruff, matplotlib, sklearn, expecttest, xdist, build, mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null; then
    _setup_say "installing the test environment into $venv (about a minute, once)"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check \
      "torch==2.13.0" "triton>=3.0" numpy pytest pytest-benchmark hypothesis ninja ruff matplotlib \
      scikit-learn expecttest pytest-xdist build \
      "mkdocs==1.6.1" "mkdocs-material==9.8.2" "mkdocstrings==1.0.8" "mkdocstrings-python==2.0.11"
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
    _setup_say "installing ${frameworks[*]} (the integrations' tests)"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check \
      -c "$root/scripts/constraints.txt" "${frameworks[@]}"
  fi
  # installed here, so their tests must run (tests/_frameworks.py)
  export SAM_FUSED_REQUIRE_FRAMEWORKS="${SAM_FUSED_REQUIRE_FRAMEWORKS:-1}"
}

if [ "${SAM_FUSED_USE_SYSTEM_PYTHON:-0}" = "1" ]; then
  PYTHON="${PYTHON:-python3}"
else
  venv="${SAM_FUSED_VENV:-$root/.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    _setup_say "creating $venv"
    python3 -m venv "$venv"
  fi
  PYTHON="$venv/bin/python"
  case "${SAM_FUSED_ENV:-test}" in
    bench) _setup_bench ;;
    test) _setup_test ;;
    *)
      _setup_say "SAM_FUSED_ENV must be bench or test, not ${SAM_FUSED_ENV}"
      exit 2
      ;;
  esac
fi
export PYTHON
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
