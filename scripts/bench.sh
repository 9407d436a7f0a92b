#!/usr/bin/env bash
# The main job: time the optimizer part of a SAM step for the per-parameter-loop baseline,
# the reference backend and (on a GPU) the fused Triton backend. Extra arguments go to the
# benchmark CLI (see `--help`); results also land in bench-results/bench.json.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/setup_env.sh
mkdir -p bench-results
"$PYTHON" -m benchmarks.bench_sam_step --json bench-results/bench.json "$@"
