"""The host side of one fused SAM step: its device launches and its Python time, on a CPU.

    python -m benchmarks.bench_host [--tensors 2000] [--repeats 7] [--steps 100]

For a model of many small tensors a fused step is bound by the host, not by memory: the
GPU waits while Python decides what to launch. This measures that part without a GPU.
Triton kernels are counted but not run (the interpreter's launch is replaced by a
counter: ``TRITON_INTERPRET=1`` is set before triton is imported), torch operations that
would launch a device kernel are counted through a dispatch mode, and the wall time of
``first_step() + second_step()`` is what the optimizer's own Python costs per step. On a
GPU each Triton launch adds Triton's launcher on top of this (not measured here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sam_fused

__all__ = ["CASES", "DeviceOps", "intercept_triton_launches", "stub_triton_launches"]

# name -> (class, base optimizer, options)
CASES: dict[str, tuple[type, type, dict]] = {
    "sam-sgd": (sam_fused.SAM, torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-4)),
    "sam-adamw": (sam_fused.SAM, torch.optim.AdamW, dict(weight_decay=0.01)),
    "sam-sgd-noskip": (sam_fused.SAM, torch.optim.SGD, dict(skip_nonfinite=False)),
    "vasso": (sam_fused.VaSSO, torch.optim.SGD, dict(theta=0.4)),
    "gsam": (sam_fused.GSAM, torch.optim.SGD, dict(alpha=0.2)),
    "sam-sgd-clip": (sam_fused.SAM, torch.optim.SGD, dict(max_grad_norm=1.0)),
}


class DeviceOps(TorchDispatchMode):
    """Records the torch operations that launch a device kernel (views launch nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # views and the profiler's range markers launch nothing
        if (
            not func.is_view
            and func.__name__ not in ("detach.default", "alias.default")
            and func.namespace != "profiler"
        ):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def intercept_triton_launches(on_launch: Callable, run_kernels: bool) -> Callable[[], None]:
    """Call ``on_launch(kernel_fn, args, kwargs)`` at each interpreted Triton launch, then run
    the kernel (``run_kernels``) or skip it; returns the function that undoes the patch.

    The one place that patches the interpreter's launch (a private triton API): the launch
    counters here and ``tests/launch_recorder.py`` both go through it."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        on_launch(self.fn, args, kwargs)
        if run_kernels:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run

    def undo() -> None:
        InterpretedFunction.run = original

    return undo


def stub_triton_launches(launches: list[str]) -> Callable[[], None]:
    """Replace the interpreter's launch by ``launches.append(kernel name)``; returns the undo."""
    return intercept_triton_launches(lambda fn, args, kwargs: launches.append(fn.__name__), run_kernels=False)


def build(case: str, n_tensors: int, seed: int = 0) -> sam_fused.SAM:
    """``CASES[case]`` over ``n_tensors`` small parameters (sizes 1..9) with gradients."""
    cls, base, options = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(1 + i % 9, generator=gen)) for i in range(n_tensors)]
    opt = cls(params, base, lr=0.1, backend="triton", **options)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return opt


def count_step(opt: sam_fused.SAM, launches: list[str]) -> tuple[list[str], list[str]]:
    """The Triton launches and other device operations of one step."""
    launches.clear()
    with DeviceOps() as mode:
        opt.first_step(zero_grad=False)
        opt.second_step(zero_grad=False)
    return list(launches), mode.ops


def host_us(opt: sam_fused.SAM, steps: int, repeats: int) -> list[float]:
    """Microseconds per step: ``repeats`` means of ``steps`` steps each."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            opt.first_step(zero_grad=False)
            opt.second_step(zero_grad=False)
        samples.append((time.perf_counter() - start) / steps * 1e6)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=100, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("TRITON_INTERPRET must be 1 (or unset) for this benchmark", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    launches: list[str] = []
    undo = stub_triton_launches(launches)
    try:
        print(f"host side of one SAM step, {args.tensors} tensors, kernels counted, not run")
        print(f"(median of {args.repeats} means over {args.steps} steps; 1 torch thread)\n")
        print(f"{'case':16} {'triton launches':>16} {'torch ops':>10} {'host us/step':>13}")
        for case in args.cases.split(","):
            opt = build(case, args.tensors)
            count_step(opt, launches)  # the first step attaches the state and builds the plan
            kernels, ops = count_step(opt, launches)
            us = statistics.median(host_us(opt, args.steps, args.repeats))
            print(f"{case:16} {len(kernels):>16} {len(ops):>10} {us:>13.0f}")
    finally:
        undo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
