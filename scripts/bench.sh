#!/usr/bin/env bash
# The main job: time the optimizer part of one SAM step (first_step + second_step) for the
# popular per-parameter loop (the baseline), sam_fused's reference backend and its fused
# backends: cpp on a CPU; triton and cuda on a GPU. Extra arguments go to the benchmark's
# CLI (`--help`; e.g. `--quick`). The table is printed, with what each row and column means;
# every row also lands in bench-results/bench.json.
#
# The environment (.venv, or SAM_FUSED_VENV) gets only what the benchmark needs: torch and
# ninja (scripts/setup_env.sh with SAM_FUSED_ENV=bench).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
SAM_FUSED_ENV="${SAM_FUSED_ENV:-bench}" source scripts/setup_env.sh
mkdir -p bench-results
echo "bench: timing the SAM optimizer step; progress below, the table at the end" >&2
"$PYTHON" -m benchmarks.bench_sam_step --json bench-results/bench.json "$@"
