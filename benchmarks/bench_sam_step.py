"""Time the optimizer part of one SAM step (first_step + second_step) on four parameter sets.

Gradients are already in place and no forward/backward runs, so the numbers are the
optimizer's own cost (the sets, the floor and the peer figures are in benchmarks/README.md).
Implementations:

* ``baseline``: the per-parameter loop of ``benchmarks/baseline.py`` (davda54 style) with a
  ``foreach=False`` base optimizer;
* ``reference``: ``sam_fused.SAM(backend="reference")``;
* ``foreach``: ``sam_fused.SAM(backend="foreach")``, PyTorch over the flat buffers (any device);
* ``triton``: ``sam_fused.SAM(backend="triton")``, the default ``skip_nonfinite=True``;
* ``triton_noskip``: the same with ``skip_nonfinite=False``, which moves exactly the bytes
  the floor counts;
* ``cpp``: ``sam_fused.SAM(backend="cpp")``, the compiled C++/OpenMP kernels (CPU tensors);
* ``cuda``: ``sam_fused.SAM(backend="cuda")``, the compiled CUDA C++ kernels (CUDA tensors);
  ``cuda_noskip`` the same with ``skip_nonfinite=False`` (the floor's bytes, as ``triton_noskip``).

The compiled rows run only on their own device and only when ``available_backends()``
reports the extension (built ahead of time or JIT-built on first use); otherwise they are
skipped with the reason printed. The default list holds the rows that can run on the
chosen device: ``cuda`` and ``cuda_noskip`` beside ``triton`` on a GPU, ``cpp`` on a CPU.

On CUDA every row is timed with ``triton.testing.do_bench`` (median) or, for steps slower
than 20 ms, a few CUDA-event-timed calls; the floor is the fewest bytes a fused step moves over
the device-to-device copy bandwidth measured in the same run. On CPU the sets are scaled
down and timed with ``time.perf_counter`` medians; the Triton rows run only under
``TRITON_INTERPRET=1``, on the smallest set, to show the path is wired.

    python -m benchmarks.bench_sam_step                 # all sets, sgd and adamw, fp32
    python -m benchmarks.bench_sam_step --quick --sets resnet50 --base sgd --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.baseline import PerParamSAM
from benchmarks.devices import pick_device
from benchmarks.param_sets import ParamSet, cpu_sets, full_sets, select
from sam_fused import SAM
from sam_fused.backends import CppBackend, CudaBackend
from sam_fused.variants import VARIANTS

RHO = 0.05
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}
# tensor accesses per element of the fewest-bytes fused step (benchmarks/README.md): norm reads g (1);
# perturb reads w, g, writes w, backup (4); restore + SGD reads backup, g, momentum and
# writes w, momentum (5), restore + AdamW reads backup, g, m, v and writes w, m, v (7)
FLOOR_ACCESSES = {"sgd": 10, "adamw": 12}
IMPLS = ("baseline", "reference", "foreach", "triton", "triton_noskip", "cpp", "cuda", "cuda_noskip")
# compiled backends: the row's name is the backend's name (a "_noskip" row: skip_nonfinite=False)
COMPILED = ("cpp", "cuda", "cuda_noskip")
COMPILED_DEVICE = {"cpp": "cpu", "cuda": "cuda", "cuda_noskip": "cuda"}  # the device type each one runs on
# a variant row is "<backend>:<variant>", e.g. "triton:vasso" (default skip_nonfinite=True)
VARIANT_NAMES = tuple(v for v in VARIANTS if v != "sam")
LABELS = {
    "floor": "floor (fewest bytes)",
    "baseline": "per-param loop (davda54)",
    "reference": "sam_fused reference",
    "foreach": "sam_fused foreach",
    "triton": "sam_fused triton",
    "triton_noskip": "sam_fused triton, no skip",
    "cpp": "sam_fused cpp (C++/OpenMP)",
    "cuda": "sam_fused cuda (CUDA C++)",
    "cuda_noskip": "sam_fused cuda, no skip",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SLOW_MS = 20.0  # steps slower than this are timed with a few CUDA-event calls, not do_bench


@dataclass
class Row:
    """One measured (or computed, for the floor) line of the table."""

    set: str
    base: str
    impl: str
    ms: float | None  # None when the row failed (see ``error``)
    elements: int
    tensors: int
    bytes_per_element: float | None = None  # what the implementation moves by design
    speedup: float | None = None  # baseline ms / this ms
    pct_floor: float | None = None  # floor ms / this ms, in percent
    gbs: float | None = None  # bytes_per_element * elements / time
    extra_mib: float | None = None  # peak memory beyond params + grads
    method: str = ""
    samples: list[float] = field(default_factory=list)
    error: str | None = None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- building


def make_params(shapes: list[tuple[int, ...]], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Parameters with gradients already present, reproducible from ``seed``."""
    torch.manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype).normal_(0, 0.02))
        p.grad = torch.empty(shape, device=device, dtype=dtype).normal_(0, 0.01)
        params.append(p)
    return params


def build(impl: str, params: list[torch.nn.Parameter], base: str) -> torch.optim.Optimizer:
    """The optimizer ``impl`` over ``params`` with base optimizer ``base``."""
    cls, kwargs = BASES[base]
    if impl == "baseline":
        return PerParamSAM(params, cls, rho=RHO, foreach=False, **kwargs)
    if ":" in impl:  # a variant row
        backend, variant = impl.split(":", 1)
        return SAM(params, cls, rho=RHO, backend=backend, variant=variant, **kwargs)
    if impl in COMPILED:
        backend, skip = impl.removesuffix("_noskip"), not impl.endswith("_noskip")
        return SAM(params, cls, rho=RHO, backend=backend, skip_nonfinite=skip, **kwargs)
    backend = impl if impl in ("reference", "foreach") else "triton"
    return SAM(params, cls, rho=RHO, backend=backend, skip_nonfinite=impl != "triton_noskip", **kwargs)


def stepper(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """The timed unit: the optimizer part of ``steps_per_call(opt)`` SAM steps.

    LookSAM and interval SAM alternate perturbed and one-pass steps, so one call runs a
    whole cycle of k steps and the row reports the average cost per step. RSAM's call
    includes its ``noise_step()``.
    """
    cycle = steps_per_call(opt)
    noise = getattr(getattr(opt, "variant", None), "noise", False)

    def step() -> None:
        for _ in range(cycle):
            if noise:
                opt.noise_step()
            if opt.first_step() is not False:
                opt.second_step()

    return step


def steps_per_call(opt: torch.optim.Optimizer) -> int:
    """k for a periodic variant (a full step and k - 1 one-pass steps per call), else 1."""
    variant = getattr(opt, "variant", None)
    return int(opt.variant_options["k"]) if getattr(variant, "periodic", False) else 1


def variant_accesses(variant: str, base: str) -> float:
    """Element accesses per step of a variant's fused design (skip_nonfinite=True).

    The update reads src (backup or w), g_p and the base state and writes w and the state:
    5 accesses for SGD with momentum, 7 for AdamW. The rest is each variant's own traffic
    (docs/variants.md); cyclic variants average a full step and k - 1 one-pass steps.
    """
    upd = 5 if base == "sgd" else 7
    v = VARIANTS[variant]
    full = {
        "usam": 1 + 4 + 1 + upd,  # stats only count non-finite values
        "vasso": 2 + 6 + 1 + upd,  # stats read g, d; perturb also reads and writes d
        "fsam": 2 + 6 + 1 + upd,
        "gcsam": 3 + 1 + 4 + 3 + 1 + upd,  # centralization reads each row twice, writes once
        "rsam": 8 + 2 + 4 + 1 + upd,  # noise: draw, scatter, backup copy, w += delta
        "gsam": 1 + 5 + 2 + upd + 1,  # keep g; <g, g_p>, ||g_p||^2; update re-reads g
        "looksam": 1 + 5 + 2 + upd + 3 + 1,  # update reads g, reads and writes g_v; ||g_v||^2
        "interval": 1 + 4 + 1 + upd,
    }[variant]
    if not v.periodic:
        return float(full)
    k = int(v.options["k"].default)
    reuse = 1 + upd + (1 if variant == "looksam" else 0)  # stats of g; LookSAM also reads g_v
    return (full + (k - 1) * reuse) / k


def impl_bytes(impl: str, base: str, element_size: int) -> float | None:
    """Bytes per element the fused designs move; None for the per-tensor implementations."""
    if impl.startswith("triton:"):
        return variant_accesses(impl.split(":", 1)[1], base) * element_size
    if impl.endswith("_noskip"):
        return FLOOR_ACCESSES[base] * element_size
    if impl in ("triton", *COMPILED):  # skip_nonfinite re-reads the second gradient once
        return (FLOOR_ACCESSES[base] + 1) * element_size
    return None


# ---------------------------------------------------------------------------- timing


def time_cpu(step: Callable[[], None], reps: int) -> tuple[float, list[float], str]:
    """Median wall time of ``reps`` calls (fewer when one call takes over a second)."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    reps = max(2, min(reps, int(3.0 / max(first, 1e-9))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), samples, f"perf_counter median of {reps}"


def events_ms(fn: Callable[[], None], device: torch.device, n: int) -> list[float]:
    """Milliseconds of ``n`` calls, each between two CUDA events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    sync(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def bench_ms(fn: Callable[[], None], device: torch.device, warmup: int, rep: int) -> tuple[float, str]:
    """``triton.testing.do_bench``'s median (it flushes L2 between calls); CUDA events without it."""
    try:
        from triton.testing import do_bench
    except ImportError:
        for _ in range(3):
            fn()
        return statistics.median(events_ms(fn, device, 50)), "cuda events median of 50 (no triton)"
    ms = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    return float(ms), f"do_bench median (warmup {warmup} ms, rep {rep} ms)"


def time_cuda(step: Callable[[], None], device: torch.device, quick: bool) -> tuple[float, list[float], str]:
    """do_bench median for fast steps; a few CUDA-event-timed calls for slow ones."""
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    estimate = (time.perf_counter() - t0) * 1e3
    if estimate >= SLOW_MS:
        n = 3 if quick else 5
        samples = events_ms(step, device, n)
        return statistics.median(samples), samples, f"cuda events median of {n}"
    ms, method = bench_ms(step, device, *((10, 25) if quick else (25, 100)))
    return ms, [], method


def _copy_ms(nbytes: int, device: torch.device, quick: bool) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)

    return bench_ms(copy, device, *((10, 50) if quick else (25, 200)))[0]


def copy_bandwidth(device: torch.device, quick: bool) -> tuple[float, int]:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = min(1 << 30, free // 4) // 4 * 4  # 1 GiB per buffer, or less on a crowded card
    ms = _copy_ms(nbytes, device, quick)
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9, nbytes


def peak_extra_mib(step: Callable[[], None], device: torch.device, before: int, payload: int) -> float:
    """Peak memory of one untimed step beyond what was allocated before + params + grads."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before - payload) / 2**20


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- checks


def compiled_unavailable(impl: str, device: torch.device) -> str | None:
    """Why the compiled backend ``impl`` cannot run on ``device``, or None when it can.

    Asks the same ``BackendInfo`` that ``sam_fused.available_backends()`` reports, but only
    for this one extension: ``available_backends()`` would also build the other device's
    extension (half a minute or more) for a row this run never times.
    """
    if COMPILED_DEVICE[impl] != device.type:
        return f"the {impl} backend runs on {COMPILED_DEVICE[impl]} tensors and this run is on {device.type}"
    info = (CppBackend if impl == "cpp" else CudaBackend).info()  # builds on first use
    return None if info else f"the {impl} backend is unavailable here: {info.detail}"


def agreement_check(impls: list[str], bases: list[str], device: torch.device, dtype: torch.dtype) -> dict:
    """Two steps of every implementation on a tiny set must agree with the baseline.

    A benchmark that compares different math compares nothing, and on a GPU this also
    compiles the Triton kernels before the first timed row.
    """
    shapes = [(33, 7), (33,), (5, 33), (5,), (4096,), (3, 3, 3, 3)]
    result: dict[str, dict[str, float]] = {}
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for base in bases:
        finals: dict[str, torch.Tensor] = {}
        for impl in impls:
            params = make_params(shapes, device, dtype, seed=1)
            step = stepper(build(impl, params, base))
            step()
            step()
            finals[impl] = torch.cat([p.detach().float().flatten() for p in params]).cpu()
        ref = finals.get("baseline", next(iter(finals.values())))
        scale = ref.abs().max().item()
        result[base] = {impl: (w - ref).abs().max().item() / scale for impl, w in finals.items()}
        for impl, err in result[base].items():
            if not err <= tol:
                log(f"WARNING: {impl} with {base} differs from the baseline by {err:.2e} (relative)")
    return result


# ---------------------------------------------------------------------------- the run


def run_row(
    pset: ParamSet, base: str, impl: str, device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> Row:
    cleanup(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    params = make_params(list(pset.shapes), device, dtype)
    opt = build(impl, params, base)
    step = stepper(opt)
    cycle = steps_per_call(opt)
    step()  # allocates state, compiles kernels, builds the flat-buffer plan
    sync(device)
    if device.type == "cuda":
        ms, samples, method = time_cuda(step, device, args.quick)
        payload = 2 * pset.numel * params[0].element_size()
        extra = peak_extra_mib(step, device, before, payload)
    else:
        ms, samples, method = time_cpu(step, args.reps)
        extra = None
    if cycle > 1:  # average cost per step over a cycle of k steps
        ms, samples = ms / cycle, [x / cycle for x in samples]
        method += f", per step over a cycle of {cycle}"
    del opt, step, params
    cleanup(device)
    return Row(
        pset.name, base, impl, ms, pset.numel, pset.count, extra_mib=extra, method=method, samples=samples
    )


def finish_rows(rows: list[Row], bandwidth_gbs: float | None, element_size: int) -> None:
    """Fill in speed-ups, byte counts and the percentage of the floor."""
    baseline = {(r.set, r.base): r.ms for r in rows if r.impl == "baseline" and r.ms}
    floor = {(r.set, r.base): r.ms for r in rows if r.impl == "floor" and r.ms}
    for r in rows:
        key = (r.set, r.base)
        if r.impl != "floor":
            r.bytes_per_element = impl_bytes(r.impl, r.base, element_size)
        if not r.ms:
            continue
        if key in baseline:
            r.speedup = baseline[key] / r.ms
        if ":" in r.impl and r.bytes_per_element is not None and bandwidth_gbs is not None:
            own_floor_ms = r.bytes_per_element * r.elements / (bandwidth_gbs * 1e9) * 1e3
            r.pct_floor = 100.0 * own_floor_ms / r.ms  # a variant against its own byte count
        elif key in floor:
            r.pct_floor = 100.0 * floor[key] / r.ms
        if r.bytes_per_element is not None and bandwidth_gbs is not None:
            r.gbs = r.bytes_per_element * r.elements / (r.ms * 1e-3) / 1e9


def floor_row(pset: ParamSet, base: str, bandwidth_gbs: float, element_size: int) -> Row:
    per_element = FLOOR_ACCESSES[base] * element_size
    ms = pset.numel * per_element / (bandwidth_gbs * 1e9) * 1e3
    return Row(pset.name, base, "floor", ms, pset.numel, pset.count, bytes_per_element=per_element)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


# the columns that need a GPU run: a bandwidth floor, peak CUDA memory, bytes over time
GPU_COLUMNS = 4
# what the rows and columns of the table are, printed under it
ROW_MEANINGS = {
    "floor": "the fewest bytes a fused step must move, at the copy bandwidth measured in the run",
    "per-param loop (davda54)": "the popular SAM file's loop, one tensor at a time "
    "(benchmarks/baseline.py): the baseline",
    "sam_fused reference": "the pure-PyTorch backend, the specification (what runs when no fused one can)",
    "sam_fused triton": "the fused Triton kernels (backend='auto' on CUDA tensors)",
    "sam_fused cpp": "the fused C++/OpenMP kernels (backend='auto' on CPU tensors)",
    "sam_fused cuda": "the fused CUDA C++ kernels (backend='cuda')",
}
COLUMN_MEANINGS = {
    "ms": "median time of one optimizer step (first_step + second_step)",
    "x-vs-baseline": "the per-param loop's ms / this row's ms (above 1: faster than the loop)",
}
GPU_COLUMN_MEANINGS = {
    "% of floor": "the floor's time / this row's",
    "extra MiB": "peak memory of one step beyond the parameters and gradients",
    "B/el, GB/s": "the bytes per element the row moves by design, and at what rate",
}


def table(rows: list[Row], labels: dict[str, str], gpu_columns: bool = True) -> str:
    head = ("set", "base", "impl", "ms", "x-vs-baseline", "% of floor", "extra MiB", "B/el", "GB/s")
    lines = []
    for r in rows:
        lines.append(
            (
                labels.get(r.set, r.set),
                r.base,
                LABELS.get(r.impl, r.impl),
                fmt(r.ms, ".3f"),
                fmt(r.speedup, ".2f"),
                fmt(r.pct_floor, ".1f"),
                fmt(r.extra_mib, ".1f"),
                fmt(r.bytes_per_element, "g"),
                fmt(r.gbs, ".0f"),
            )
        )
    if not gpu_columns:  # a CPU run measures none of them: no empty columns
        head = head[:-GPU_COLUMNS]
        lines = [line[:-GPU_COLUMNS] for line in lines]
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(head)]
    left = {0, 1, 2}

    def render(cells) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    out = [render(head), render(["-" * w for w in widths])]
    previous = None
    for r, line in zip(rows, lines):
        if previous is not None and (r.set, r.base) != previous:
            out.append("")
        out.append(render(line))
        previous = (r.set, r.base)
    return "\n".join(out)


def legend(rows: list[Row], gpu_columns: bool) -> str:
    """What the rows and columns of this table mean."""
    shown = {LABELS.get(r.impl, r.impl) for r in rows}
    rows_meant = {k: v for k, v in ROW_MEANINGS.items() if any(label.startswith(k) for label in shown)}
    columns = {**COLUMN_MEANINGS, **(GPU_COLUMN_MEANINGS if gpu_columns else {})}
    lines = [f"  {name}: {meaning}" for name, meaning in {**rows_meant, **columns}.items()]
    return "\n".join(["rows and columns:", *lines])


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "triton_interpret": interpreting(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        root = Path(__file__).resolve().parent.parent
        info["git"] = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def write_json(path: str | None, payload: dict) -> None:
    """Write atomically, so a run killed mid-way leaves the rows finished so far."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(target)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="all", help="comma-separated: resnet50,vit_b16,2000x4096,one_134m")
    p.add_argument("--base", default="sgd,adamw", help="comma-separated base optimizers: sgd,adamw")
    p.add_argument(
        "--impls",
        default=None,
        help=f"comma-separated subset of {','.join(IMPLS)} (default: all that fit the device, i.e. "
        "without cuda on a CPU and without cpp on a GPU)",
    )
    p.add_argument(
        "--variants",
        default="",
        help=f"add a row per SAM variant ('all' or a subset of {','.join(VARIANT_NAMES)}), on the "
        "triton backend (CUDA or TRITON_INTERPRET=1), or on the one --variant-backend names "
        "(auto: what backend='auto' picks, e.g. cpp on the CPU)",
    )
    p.add_argument(
        "--variant-backend", default="triton", choices=("triton", "reference", "foreach", "cpp", "auto")
    )
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--size",
        default="auto",
        choices=("auto", "full", "cpu"),
        help="full: the published sizes (default on CUDA); cpu: scaled down (default on CPU)",
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions; on CPU also smaller sets")
    p.add_argument("--reps", type=int, default=None, help="CPU repetitions per row (default 5, quick 3)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: the scaled sets are small, and OpenMP threads "
        "competing for a busy core made timings tens of times slower and noisy; untouched on CUDA)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the agreement check on a tiny set")
    p.add_argument("--json", default=None, metavar="PATH", help="write every result to this JSON file")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall = time.perf_counter()
    device = pick_device(args.device, args.threads)
    on_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    element_size = torch.empty((), dtype=dtype).element_size()
    size = args.size if args.size != "auto" else ("full" if on_cuda else "cpu")
    try:
        sets = select(full_sets() if size == "full" else cpu_sets(4 if args.quick else 1), args.sets)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    bases = [b.strip().lower() for b in args.base.split(",") if b.strip()]
    for b in bases:
        if b not in BASES:
            raise SystemExit(f"unknown base optimizer {b!r}; choose from {', '.join(BASES)}")
    if args.impls is None:  # the compiled backend of the other device would only be skipped
        args.impls = ",".join(i for i in IMPLS if COMPILED_DEVICE.get(i, device.type) == device.type)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"unknown implementation {i!r}; choose from {', '.join(IMPLS)}")
    skipped: dict[str, str] = {}
    for i in [i for i in impls if i in COMPILED]:
        reason = compiled_unavailable(i, device)
        if reason is not None:
            skipped[i] = reason
            impls.remove(i)
            log(f"note: skipping the {i} rows: {reason}")
    variants = VARIANT_NAMES if args.variants == "all" else [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANT_NAMES:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANT_NAMES)}")
    impls += [f"{args.variant_backend}:{v}" for v in variants]

    # which sets each implementation runs on: Triton needs CUDA, or the (slow) interpreter
    triton_sets = {s.name for s in sets}
    if not on_cuda:
        if interpreting() and sets:
            triton_sets = {min(sets, key=lambda s: (s.numel, s.count)).name}
        else:
            triton_sets = set()
    try:
        import triton  # noqa: F401
    except ImportError:
        triton_sets = set()
    if any(i.startswith("triton") for i in impls) and not triton_sets:
        log("note: the triton rows need CUDA (or TRITON_INTERPRET=1 on the CPU); skipping them")

    env = environment(device)
    log(f"sam_fused benchmark on {env.get('gpu', 'cpu')} ({size} sizes, {args.dtype}); torch {env['torch']}")
    payload: dict[str, Any] = {
        "environment": env,
        "args": vars(args),
        "size": size,
        "rows": [],
        "skipped": skipped,
    }
    # variants compute different math on purpose: only the plain SAM rows are compared
    check_impls = [i for i in impls if ":" not in i and (not i.startswith("triton") or triton_sets)]
    if not args.no_check and check_impls:
        try:
            payload["agreement"] = agreement_check(check_impls, bases, device, dtype)
            log(f"agreement with the baseline (max relative weight difference): {payload['agreement']}")
        except Exception as exc:  # the rows below report the failure where it happens
            payload["agreement"] = f"{type(exc).__name__}: {exc}"
            log(f"WARNING: the agreement check failed: {payload['agreement']}")

    bandwidth = None
    if on_cuda:
        bandwidth, nbytes = copy_bandwidth(device, args.quick)
        payload["copy_bandwidth_gbs"] = bandwidth
        payload["copy_bytes"] = nbytes
        log(f"device-to-device copy bandwidth: {bandwidth:.0f} GB/s ({nbytes >> 20} MiB copy_, read + write)")

    rows: list[Row] = []
    failures = 0
    plan = [
        (s, b, i)
        for s in sets
        for b in bases
        for i in impls
        if not (i.startswith("triton") and s.name not in triton_sets)
    ]
    for n, (pset, base, impl) in enumerate(plan, 1):
        if bandwidth is not None and not any(r.set == pset.name and r.base == base for r in rows):
            rows.append(floor_row(pset, base, bandwidth, element_size))
        size_note = f"{pset.count} tensors, {pset.numel / 1e6:.2f} M"
        log(f"[{n}/{len(plan)}] {pset.name} {base} {impl} ({size_note}) ...")
        t0 = time.perf_counter()
        try:
            row = run_row(pset, base, impl, device, dtype, args)
        except Exception as exc:  # one failing row must not lose the others
            row = Row(
                pset.name, base, impl, None, pset.numel, pset.count, error=f"{type(exc).__name__}: {exc}"
            )
            failures += 1  # memory is freed by the next row's cleanup, once the traceback is gone
        rows.append(row)
        took = time.perf_counter() - t0
        if row.error:
            log(f"    FAILED: {row.error} (row took {took:.1f} s)")
        else:
            extra = "" if row.extra_mib is None else f", extra {row.extra_mib:.1f} MiB"
            log(f"    {row.ms:.3f} ms ({row.method}{extra}; row took {took:.1f} s)")
        finish_rows(rows, bandwidth, element_size)
        payload["rows"] = [asdict(r) for r in rows]
        write_json(args.json, payload)

    finish_rows(rows, bandwidth, element_size)
    labels = {s.name: s.label for s in sets}
    print(f"SAM optimizer step (first_step + second_step), {args.dtype}, {env.get('gpu', 'CPU')}")
    for s in sets:
        print(f"  {s.describe()}")
    if bandwidth is not None:
        accesses = ", ".join(
            f"{b} {FLOOR_ACCESSES[b] * element_size} B/element "
            f"(sam_fused default skip_nonfinite=True: {(FLOOR_ACCESSES[b] + 1) * element_size})"
            for b in bases
        )
        print(f"  floor = bytes / {bandwidth:.0f} GB/s measured copy bandwidth; {accesses}")
    else:
        print(
            "  CPU run: each set scaled down (/N: dimensions divided, tensor count kept); the floor, "
            "memory and bandwidth columns are GPU measurements, shown on a GPU"
        )
    print()
    print(table(rows, labels, gpu_columns=bandwidth is not None))
    print()
    print(legend(rows, gpu_columns=bandwidth is not None))
    for impl, reason in skipped.items():
        print(f"skipped {LABELS[impl]}: {reason}")
    for r in rows:
        if r.error:
            print(f"FAILED: {r.set} {r.base} {r.impl}: {r.error}")
    elapsed = time.perf_counter() - wall
    payload["rows"] = [asdict(r) for r in rows]
    payload["elapsed_s"] = elapsed
    write_json(args.json, payload)
    where = f"; every row, the environment and the agreement check are in {args.json}" if args.json else ""
    print(f"\ntotal {elapsed:.0f} s{where}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
