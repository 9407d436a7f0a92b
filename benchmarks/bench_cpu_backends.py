"""CPU benchmark of the compiled C++ backend against the reference backend.

One SAM optimizer step (``first_step`` + ``second_step``, the optimizer's work only) over
ResNet-50's parameter set (25.6 M float32 elements, 161 tensors), SGD with momentum 0.9
and weight decay 5e-4, for ``backend="reference"`` and ``backend="cpp"``, with
``skip_nonfinite`` on (the default) and off.

The floor is what the step must move through memory, at this machine's copy bandwidth
(measured as for the GPU benchmark: a large ``copy_``, bytes read + written):

* skip_nonfinite=False, 40 B/element: norm pass reads g (4); perturb reads w, g and writes
  w, backup (16); restore + SGD reads backup, g, buf and writes w, buf (20);
* skip_nonfinite=True, 44 B/element: one more read of the second gradient (4).

On a CPU the step can come in under this floor (cpp/floor below 1): a store to memory the
core has not read first costs a hidden read for ownership, which ``copy_`` pays on every
byte it writes (so its counted bandwidth is low) while the step pays it only on the backup
and on the weights written from the backup. The floor is the GPU's definition, kept so
that the numbers compare across devices.

On a shared machine, run it when nothing else does: other processes on the two cores slow
the reference's many small OpenMP regions by factors, and the copy measurement with them.

Run: ``python -m benchmarks.bench_cpu_backends [--repeats 5] [--warmup 2]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from sam_fused import SAM, available_backends

try:
    from benchmarks.param_sets import resnet50_shapes
except ImportError:  # run as a plain script from benchmarks/
    from param_sets import resnet50_shapes  # type: ignore[no-redef]

BYTES_PER_ELEMENT = {False: 40, True: 44}


def copy_bandwidth(numel: int, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` over float32 buffers of ``numel`` elements."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def time_step(backend: str, check: bool, repeats: int, warmup: int, seed: int = 0) -> float:
    """Median seconds of first_step + second_step over ResNet-50's parameters."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.05) for s in resnet50_shapes()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = SAM(
        params,
        torch.optim.SGD,
        rho=0.05,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        backend=backend,
        skip_nonfinite=check,
    )
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        opt.first_step()
        opt.second_step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    info = available_backends()["cpp"]
    numel = sum(math.prod(s) for s in resnet50_shapes())
    print(f"ResNet-50 parameter set: {len(resnet50_shapes())} tensors, {numel / 1e6:.2f} M float32 elements")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cpp backend: {info.detail}")
    bandwidth = copy_bandwidth(numel, repeats=max(5, args.repeats))
    print(f"copy bandwidth (copy_ of {numel * 4 / 1e6:.0f} MB, read + write): {bandwidth / 1e9:.2f} GB/s")
    if not info:
        print("the cpp backend is unavailable here; only the floor is printed")
    header = (
        f"{'config':<28}{'floor ms':>10}{'reference ms':>14}{'cpp ms':>10}{'speedup':>9}{'cpp/floor':>11}"
    )
    print(header)
    for check in (True, False):
        floor = BYTES_PER_ELEMENT[check] * numel / bandwidth
        ref = time_step("reference", check, args.repeats, args.warmup)
        cpp = time_step("cpp", check, args.repeats, args.warmup) if info else float("nan")
        label = f"skip_nonfinite={check} ({BYTES_PER_ELEMENT[check]} B)"
        print(
            f"{label:<28}{floor * 1e3:>10.1f}{ref * 1e3:>14.1f}{cpp * 1e3:>10.1f}"
            f"{ref / cpp:>8.2f}x{cpp / floor:>10.2f}x"
        )


if __name__ == "__main__":
    main()
