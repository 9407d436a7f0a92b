#!/usr/bin/env bash
# The install as users get it, checked from outside the tree (run by scripts/test.sh).
#
# Builds the sdist and, from it, the wheel (pip's isolated build: no torch), then installs
# sam_fused five ways, each into a fresh virtual environment that holds only CPU torch:
#   wheel     pip install sam_fused-*.whl
#   sdist     pip install sam_fused-*.tar.gz
#   path      pip install <checkout>
#   git       pip install git+file://<clone of the checkout's HEAD>
#   prebuilt  pip install --no-build-isolation <checkout>   (setup.py compiles the extension)
# and runs tests/install_check.py from a temporary directory with each: the C++ backend
# compiles on first use (or was built at install time), and one step of every variant runs
# on the backend that backend="auto" documents, equal to the reference backend's step.
#
# Needs PYTHON (scripts/setup_env.sh) with the `build` package. Prints "N passed, M failed".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# the fresh environments must see only what is installed in them: scripts/setup_env.sh puts
# the checkout on PYTHONPATH, where pip would find sam_fused "already installed"
unset PYTHONPATH
work="$(mktemp -d "${TMPDIR:-/tmp}/sam_fused_install.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
pip_quiet=(--quiet --disable-pip-version-check --no-input)

say() { echo "check_install: $* ($((SECONDS - start)) s)"; }

# the interpreter the project's venv was made from: the local torch wheel matches it
base_python="$("$PYTHON" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')"

say "building the sdist, then the wheel from it"
"$PYTHON" -m build --outdir "$work/dist" "$root" >"$work/build.log" 2>&1 || {
  cat "$work/build.log"
  exit 1
}
sdist="$(ls "$work"/dist/sam_fused-*.tar.gz)"
wheel="$(ls "$work"/dist/sam_fused-*.whl)"

say "a template environment with CPU torch only"
"$base_python" -m venv "$work/template"
"$work/template/bin/python" -m pip install "${pip_quiet[@]}" "torch==2.13.0"

git clone --quiet "$root" "$work/clone"
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  say "note: the git install takes the committed HEAD; uncommitted changes are not in it"
fi

passed=0
failed=0
mkdir -p "$work/run"
check() {  # name, expected build (jit|prebuilt), then pip install's arguments
  local name="$1" expect="$2"
  shift 2
  local venv="$work/venv-$name"
  # a hard-linked copy of the template is a fresh environment with only torch, made in a second
  cp -al "$work/template" "$venv"
  if [ "$expect" = prebuilt ]; then  # --no-build-isolation builds with what the venv holds
    "$venv/bin/python" -m pip install "${pip_quiet[@]}" "setuptools>=77"
  fi
  say "$name: pip install $*"
  if ! "$venv/bin/python" -m pip install "${pip_quiet[@]}" "$@" >"$work/$name.log" 2>&1; then
    cat "$work/$name.log"
    say "$name: FAILED to install"
    failed=$((failed + 1))
    return
  fi
  if (cd "$work/run" && TORCH_EXTENSIONS_DIR="$work/ext-$name" \
    "$venv/bin/python" "$root/tests/install_check.py" --expect "$expect" --checkout "$root"); then
    passed=$((passed + 1))
  else
    say "$name: FAILED"
    failed=$((failed + 1))
  fi
  rm -rf "$venv"
}

check wheel jit "$wheel"
check sdist jit "$sdist"
check path jit "$root"
check git jit "git+file://$work/clone"
check prebuilt prebuilt --no-build-isolation "$root"

rm -rf "$work"
say "done"
echo "install: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
