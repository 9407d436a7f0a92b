"""Compile every recorded Triton kernel specialization for a real GPU target, without a GPU.

    python tests/compile_kernels.py LAUNCHES.json [--target cuda:90] [--jobs N]

``LAUNCHES.json`` comes from a test run with ``SAM_FUSED_RECORD_LAUNCHES`` set (see
``tests/launch_recorder.py``). Each launch is rebuilt with stand-in arguments that Triton
specialises exactly like the recorded ones, and handed to the kernel's own ``warmup``,
which runs Triton's JIT front end (specialisation, constexpr folding, type checks) and the
whole backend (MLIR passes, LLVM, ptxas) but launches nothing. A fake driver supplies the
target, so no GPU and no CUDA driver is needed: ptxas ships inside the triton wheel.

Exit status 1 when any specialization fails to compile, with the kernel, its arguments and
Triton's error. Compiled kernels land in Triton's cache as usual (``TRITON_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# the real compiler, not the interpreter: decided when triton is first imported
os.environ.pop("TRITON_INTERPRET", None)

import torch


class _CompileOnlyDriver:
    """Just enough of a Triton driver for ``warmup``: a device, a stream and a target."""

    def __init__(self, backend: str, arch: int | str, warp_size: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget(backend, arch, warp_size)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name: str):
        raise AttributeError(f"compile-only driver: '{name}' needs a real GPU driver")


def _install_driver(target: tuple) -> None:
    import warnings

    from triton.runtime.driver import driver

    # triton 3.9 warns once per process that its FMA-contraction default will change
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    driver.set_active(_CompileOnlyDriver(*target))


def _stand_in(desc):
    """An argument Triton specialises like the recorded one (see launch_recorder.describe)."""
    if isinstance(desc, dict):
        if "tensor" in desc:
            dtype = getattr(torch, desc["tensor"])
            base = torch.empty(64, dtype=dtype)  # the allocator aligns to at least 16 bytes
            # one element in: misaligned for every dtype narrower than 16 bytes
            return base if desc["aligned"] else base[1:]
        if "int" in desc:
            return desc["int"]
        if "float" in desc:
            return desc["float"]
    return desc


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers and spilled bytes (stack + local) per thread of one Triton cubin."""
    from cubin_usage import resource_usage

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        kernels = resource_usage(f.name)
    if not kernels:
        return {}
    return {"regs": kernels[0].regs, "local": kernels[0].spills}


def _compile_one(entry: dict) -> tuple[str, float, str | None, dict[str, int]]:
    label = f"{entry['module']}.{entry['kernel']}({entry['args']}, {entry['kwargs']})"
    start = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(entry["module"]), entry["kernel"])
        args = [_stand_in(a) for a in entry["args"]]
        kwargs = {k: _stand_in(v) for k, v in entry["kwargs"].items()}
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    except Exception as exc:  # every failure is reported with its launch
        return label, time.perf_counter() - start, f"{type(exc).__name__}: {exc}", {}
    seconds = time.perf_counter() - start
    cubin = compiled.asm.get("cubin") if compiled is not None else None
    return label, seconds, None, _resource_usage(cubin) if cubin else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launches", help="JSON file written by a recorded test run")
    parser.add_argument("--target", default="cuda:90", help="backend:arch, e.g. cuda:90 or cuda:80")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fail-on-spills", action="store_true", help="a kernel using local memory fails")
    parser.add_argument(
        "--allow-spill-bytes",
        type=int,
        default=0,
        help="with --fail-on-spills, spills of at most this many bytes per thread are reported, not failed",
    )
    parser.add_argument(
        "--allow-empty", action="store_true", help="no recorded launch is not an error (a filtered test run)"
    )
    args = parser.parse_args(argv)

    backend, arch = args.target.split(":")
    target = (backend, int(arch) if arch.isdigit() else arch, 32)
    if not os.path.exists(args.launches):
        print(f"no launch record at {args.launches} (set SAM_FUSED_RECORD_LAUNCHES)", file=sys.stderr)
        return 1
    with open(args.launches) as f:
        entries = json.load(f)
    if not entries:
        print("no Triton launches were recorded: no kernel was compiled", file=sys.stderr)
        return 0 if args.allow_empty else 1
    import triton

    start = time.perf_counter()
    failures = []
    per_kernel: dict[str, list[int]] = {}  # name -> [specializations, most registers]
    spills = []
    serial = 0.0  # what one cold process would spend compiling them all
    with ProcessPoolExecutor(args.jobs, initializer=_install_driver, initargs=(target,)) as pool:
        for entry, (label, seconds, error, usage) in zip(entries, pool.map(_compile_one, entries)):
            count = per_kernel.setdefault(entry["kernel"], [0, 0])
            count[0] += 1
            count[1] = max(count[1], usage.get("regs", 0))
            serial += seconds
            if error is not None:
                failures.append((label, error))
            if usage.get("local", 0) > 0:
                spills.append((label, usage))
    elapsed = time.perf_counter() - start
    print(
        f"compiled {len(entries) - len(failures)}/{len(entries)} kernel specializations for "
        f"{args.target} with triton {triton.__version__} in {elapsed:.0f} s on {args.jobs} processes "
        f"({serial:.0f} s of compiling in all)"
    )
    print(
        "  specializations (most registers per thread): "
        + ", ".join(f"{name} x{n} ({regs or '?'})" for name, (n, regs) in sorted(per_kernel.items()))
    )
    for label, usage in spills:
        # a kernel that spills registers to local memory runs far from the bandwidth floor
        print(f"SPILLS {usage['local']} B/thread of local memory: {label}", file=sys.stderr)
    for label, error in failures:
        print(f"FAILED {label}\n    {error}", file=sys.stderr)
    failing_spills = [label for label, usage in spills if usage["local"] > args.allow_spill_bytes]
    return 1 if failures or (failing_spills and args.fail_on_spills) else 0


if __name__ == "__main__":
    sys.exit(main())
