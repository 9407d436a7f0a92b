"""A fused step issues a handful of device launches, however many tensors the model has.

This is the point of the flat layout (docs/design.md): the per-parameter loops most SAM
code runs cost several launches per tensor per step, which is what makes a model of 2000
small tensors slow. Each Triton kernel launch is counted (and not run: no host code reads a
device value, so the step's control flow does not change), and so is every torch operation
that would launch a device kernel (views launch nothing); ``benchmarks/bench_host.py``
holds the counters and times the same step. The counts must be the same for 3 and for 300
parameters, and stay within the numbers below: a change that adds a launch to the hot path
has to change them on purpose.
"""

from __future__ import annotations

import pytest
from conftest import DEVICE, NEEDS_TRITON

pytestmark = [
    NEEDS_TRITON,
    pytest.mark.skipif(DEVICE == "cuda", reason="counts launches through the interpreter's launch hook"),
]

# case of benchmarks/bench_host.py -> (Triton launches, other device ops) per step, at most
BUDGET = {
    "sam-sgd": (5, 3),  # stats, perturb, descent stats, update, step counts; zero, 2 sums
    "sam-adamw": (5, 3),
    "sam-sgd-noskip": (4, 2),  # no second-pass statistics
    "vasso": (6, 3),  # + revert_state (a skipped step puts d back)
    "gsam": (5, 3),
    # clipping computes its coefficient with six scalar torch ops (a one-program kernel
    # could make that one launch)
    "sam-sgd-clip": (5, 9),
}


@pytest.fixture
def launches():
    from benchmarks.bench_host import stub_triton_launches

    recorded: list[str] = []
    undo = stub_triton_launches(recorded)
    yield recorded
    undo()


@pytest.mark.parametrize("case", list(BUDGET))
def test_launches_per_step_do_not_grow_with_the_tensor_count(case, launches):
    from benchmarks.bench_host import build, count_step

    max_launches, max_ops = BUDGET[case]
    counts = []
    for n_params in (3, 300):
        opt = build(case, n_params, seed=n_params)
        count_step(opt, launches)  # the first step attaches state and builds the plan
        counts.append(count_step(opt, launches))
    (launches_small, ops_small), (launches_big, ops_big) = counts
    assert launches_small == launches_big and ops_small == ops_big, (counts[0], counts[1])
    assert len(launches_big) <= max_launches, launches_big
    assert len(ops_big) <= max_ops, ops_big
    assert launches_big, "no Triton launch was seen: the count would prove nothing"


def test_host_benchmark_runs(capsys):
    from benchmarks import bench_host

    argv = ["--tensors", "50", "--steps", "2", "--repeats", "1", "--cases", "sam-sgd,gsam"]
    assert bench_host.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith(("sam-sgd", "gsam"))}
    assert rows["sam-sgd"][:2] == ["5", "3"] and rows["gsam"][:2] == ["5", "3"], rows
    assert float(rows["sam-sgd"][2]) > 0
