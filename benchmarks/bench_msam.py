"""MSAM's optimizer step against SGD's and SAM's, and the drift MSAM avoids by storing ``w``.

Part 1 times the optimizer part of one step (gradients in place, no forward/backward) on
the CPU sets of ``param_sets.py``: ``torch.optim.SGD`` (foreach), ``sam_fused.MSAM``
(SGD base) and ``sam_fused.SAM`` (``first_step()`` + ``second_step()``), both on each
backend of ``--backends``.
Medians of ``--repeats`` calls, one torch thread. A SAM step also costs a second
forward/backward, which this does not count: the model's passes dominate a real step.

Part 2 measures what un-perturbing by arithmetic would cost: the official code returns to
``w`` by adding ``c v`` back to ``w~``; sam_fused copies a stored ``w``. Over ``--steps``
steps of random gradients, it reports the largest difference between ``w~ + c v`` and the
stored ``w`` in units of the float's spacing at the larger term (ulps), and how many weights
the arithmetic misses, per dtype.

    python -m benchmarks.bench_msam
    python -m benchmarks.bench_msam --sets resnet50 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.param_sets import cpu_sets, select
from sam_fused import MSAM, SAM


def _median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: buffers, plans
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _params(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return params


def time_steps(shapes, backend: str, repeats: int) -> dict[str, float]:
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    sgd = torch.optim.SGD(_params(shapes), foreach=True, **options)
    msam = MSAM(_params(shapes), torch.optim.SGD, rho=3.0, backend=backend, **options)
    sam = SAM(_params(shapes), torch.optim.SGD, rho=0.05, backend=backend, **options)

    def sam_step() -> None:
        sam.first_step()
        sam.second_step()

    return {
        "torch SGD (foreach)": _median_ms(sgd.step, repeats),
        f"MSAM {backend}": _median_ms(msam.step, repeats),
        f"SAM {backend}": _median_ms(sam_step, repeats),
    }


def drift(dtype: torch.dtype, steps: int, numel: int = 100_000) -> tuple[float, float]:
    """Over the run: the largest ``|(w~ + c v) - w|`` in ulps of ``max(|w|, |c v|)`` (the
    terms' own spacing), and the largest fraction of weights not restored bit for bit."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel, generator=gen).to(dtype))
    opt = MSAM([p], torch.optim.SGD, rho=3.0, backend="reference", lr=0.1, momentum=0.9)
    worst, inexact = 0.0, 0.0
    for _ in range(steps):
        p.grad = (torch.randn(numel, generator=gen) * 0.1).to(dtype)
        opt.step()
        w = opt.state[p]["unperturbed_weight"].float()
        shift = opt.state_dict()["msam_scales"][0].float() * opt.state[p]["momentum_buffer"].float()
        back = (p.detach().float() + shift).to(dtype).float()  # the official move back
        spacing = torch.finfo(dtype).eps * torch.maximum(w.abs(), shift.abs()).clamp_min(
            torch.finfo(dtype).tiny
        )
        worst = max(worst, float(((back - w).abs() / spacing).max()))
        inexact = max(inexact, float((back != w).float().mean()))
    return worst, inexact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="all")
    parser.add_argument("--backends", default="foreach,cpp")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    for backend in args.backends.split(","):
        for s in select(cpu_sets(), args.sets):
            try:
                rows = time_steps(s.shapes, backend, args.repeats)
            except (RuntimeError, ValueError) as error:
                print(f"{s.label}: SAM {backend} skipped ({error})")
                continue
            cells = "  ".join(f"{name} {ms:8.3f} ms" for name, ms in rows.items())
            print(f"{s.describe():48s} {cells}")
    for dtype in (torch.float32, torch.bfloat16):
        ulps, inexact = drift(dtype, args.steps)
        print(
            f"un-perturbing by w~ + c v over {args.steps} steps, {dtype}: up to {ulps:.2f} ulps of "
            f"max(|w|, |c v|); up to {inexact:.1%} of the weights not restored exactly"
        )


if __name__ == "__main__":
    main()
