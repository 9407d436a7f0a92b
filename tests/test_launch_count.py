"""A fused step issues a handful of device launches, however many tensors the model has.

This is the point of the flat layout (docs/design.md): the per-parameter loops most SAM
code runs cost several launches per tensor per step, which is what makes a model of 2000
small tensors slow. Here each Triton kernel launch is counted (and not run: no host code
reads a device value, so the step's control flow does not change), and so is every torch
operation that would launch a device kernel (views launch nothing). The counts must be the
same for 3 and for 300 parameters, and stay within the numbers below: a change that adds a
launch to the hot path has to change them on purpose.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, NEEDS_TRITON
from torch.utils._python_dispatch import TorchDispatchMode

from sam_fused import GSAM, SAM, VaSSO

pytestmark = [
    NEEDS_TRITON,
    pytest.mark.skipif(DEVICE == "cuda", reason="counts launches through the interpreter's launch hook"),
]


class _DeviceOps(TorchDispatchMode):
    """Counts torch operations that launch a kernel (views and metadata ops do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.__name__ not in ("detach.default", "alias.default"):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_triton_launches(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[str] = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(self.fn.__name__)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return launches


def _one_step(opt: SAM, launches: list[str]) -> tuple[list[str], list[str]]:
    launches.clear()
    with _DeviceOps() as mode:
        opt.first_step(zero_grad=False)
        opt.second_step(zero_grad=False)
    return list(launches), mode.ops


# (class, base, options) -> (Triton launches, other device ops) per step, at most
BUDGET = {
    "sam-sgd": (SAM, torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-4), 5, 3),
    "sam-adamw": (SAM, torch.optim.AdamW, dict(weight_decay=0.01), 5, 3),
    "sam-sgd-noskip": (SAM, torch.optim.SGD, dict(skip_nonfinite=False), 4, 2),
    "vasso": (VaSSO, torch.optim.SGD, dict(theta=0.4), 6, 3),
    "gsam": (GSAM, torch.optim.SGD, dict(alpha=0.2), 5, 3),
    # clipping computes its coefficient with six scalar torch ops (a one-program kernel
    # could make that one launch)
    "sam-sgd-clip": (SAM, torch.optim.SGD, dict(max_grad_norm=1.0), 5, 9),
}


@pytest.mark.parametrize("case", list(BUDGET))
def test_launches_per_step_do_not_grow_with_the_tensor_count(case, count_triton_launches):
    cls, base, kw, max_launches, max_ops = BUDGET[case]
    counts = []
    for n_params in (3, 300):
        gen = torch.Generator().manual_seed(n_params)
        params = [torch.nn.Parameter(torch.randn(1 + i % 9, generator=gen)) for i in range(n_params)]
        opt = cls(params, base, lr=0.1, backend="triton", **kw)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        _one_step(opt, count_triton_launches)  # the first step attaches state and builds the plan
        counts.append(_one_step(opt, count_triton_launches))
    (launches_small, ops_small), (launches_big, ops_big) = counts
    assert launches_small == launches_big and ops_small == ops_big, (counts[0], counts[1])
    assert len(launches_big) <= max_launches, launches_big
    assert len(ops_big) <= max_ops, ops_big
    assert launches_big, "no Triton launch was seen: the count would prove nothing"
