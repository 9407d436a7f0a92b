"""The compiled C++ backend's SAM step on every CPU parameter set, SGD and AdamW.

    python -m benchmarks.bench_cpp_sets [--steps 15]

One ``first_step()`` + ``second_step()`` (the optimizer's work only, gradients in place)
over each of ``benchmarks/param_sets.py``'s CPU sets, with ``backend="cpp"``; prints the
fastest of ``--steps`` timed steps after three warm-up steps, in ms. Meant for side-by-side
runs of two checkouts (``PYTHONPATH=<checkout>``), alternated, on a quiet machine: the
layout comparison in docs/design.md was made this way, with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.param_sets import cpu_sets
from sam_fused import SAM

BASES = (
    (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
    (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
)


def step_ms(shapes: list, base: type, options: dict, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.05) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = SAM(params, base, rho=0.05, backend="cpp", **options)
    times = []
    for _ in range(steps + 3):
        start = time.perf_counter()
        opt.first_step()
        opt.second_step()
        times.append(time.perf_counter() - start)
    return min(times[3:]) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args(argv)
    for param_set in cpu_sets():
        for base, options in BASES:
            ms = step_ms(param_set.shapes, base, options, args.steps)
            print(f"{param_set.name:12s} {base.__name__:6s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
