#!/usr/bin/env bash
# The convergence lab: reproduces the seed paper's claims (stall of constant-step SAM on a
# quadratic, convergence under diminishing steps/radii), compares SGD with every SAM
# variant on scikit-learn's digits, and with SAM/ASAM/VaSSO/F-SAM/GSAM on digits with noisy
# training labels (Foret et al.'s robustness claim). Writes PNG plots and results.md into
# docs/lab (measured times in docs/convergence.md). Part 4 (cost against benefit: SGD against
# the cheap SAM variants) runs alone with `--parts cost`; `--readme README.md` also rewrites the
# README's generated cost table.
# Extra arguments go to the lab's CLI, e.g.
# `bash scripts/lab.sh --quick --out /tmp/lab` for a smoke run (see `--help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/setup_env.sh
"$PYTHON" -m lab.convergence_lab --out docs/lab "$@"
