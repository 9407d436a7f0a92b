"""End-to-end training-step benchmark: forward, backward and optimizer, bf16 autocast.

Where ``bench_sam_step.py`` times the optimizer alone, this times what a training loop
pays per step, on the models of ``benchmarks/models.py``:

* ``resnet18_b128`` / ``resnet18_b512``: ResNet-18 for 32x32 inputs (CIFAR stem, 10
  classes), batches of 128 and 512, cross-entropy on class labels;
* ``transformer_b8``: a 12-layer, 768-wide encoder (12 heads, MLP 3072) over 8 sequences
  of 128 tokens, 32000-token vocabulary, token-level cross-entropy through an untied
  vocabulary head (language-model style).

Rows (every one starts from the same freshly initialised model; SGD lr 0.01, momentum 0.9,
weight decay 5e-4 everywhere; SAM rho 0.05):

* ``sgd``: ``torch.optim.SGD(foreach=True)``, one forward/backward per step;
* ``perparam_sam``: ``benchmarks.baseline.PerParamSAM`` (per-parameter loop, base SGD with
  ``foreach=False``, as in ``bench_sam_step``), two forward/backward passes;
* ``sam_fused``: ``sam_fused.SAM(..., torch.optim.SGD, momentum=0.9)`` in the manual loop
  (backward, ``first_step(zero_grad=True)``, backward, ``second_step(zero_grad=True)``);
* ``sam_fused_graphed``: ``sam_fused.graph.GraphedSAMStep``, both passes and the optimizer
  replayed from one CUDA graph (n/a on a CPU, or when ``sam_fused.graph`` is missing);
* ``sgd_graphed``: forward, backward and the SGD step captured in one ``torch.cuda.graph``
  after warm-up steps on a side stream (n/a on a CPU).

On CUDA each step is timed between two CUDA events and the row reports the median of
``--iters`` steps after ``--warmup`` steps; on a CPU ``time.perf_counter`` does the same.
Ratios: ``x SGD`` = this row's time / eager SGD's (lower is better), ``vs per-param`` =
per-param SAM's time / this row's (the speed-up; higher is better). The project's targets,
printed beside them: graphed SAM at most 0.5x eager SGD on ResNet-18 batch 128, and at
least 5x faster than per-param SAM.

    python -m benchmarks.bench_e2e                          # GPU: all workloads, all rows
    python -m benchmarks.bench_e2e --quick --json e2e.json  # fewer steps
    python -m benchmarks.bench_e2e --device cpu --quick     # CPU smoke run (tiny models)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.baseline import PerParamSAM
from benchmarks.devices import pick_device
from benchmarks.models import TransformerConfig, TransformerLM, resnet18_cifar
from sam_fused import SAM

LR, MOMENTUM, WEIGHT_DECAY, RHO = 0.01, 0.9, 5e-4, 0.05
IMPLS = ("sgd", "perparam_sam", "sam_fused", "sam_fused_graphed", "sgd_graphed")
LABELS = {
    "sgd": "eager SGD (foreach)",
    "perparam_sam": "per-param SAM (davda54 loop)",
    "sam_fused": "sam_fused eager",
    "sam_fused_graphed": "sam_fused graphed",
    "sgd_graphed": "graphed SGD",
}
# ResNet-18 batch 128 first: it carries the targets, and a run cut short by its time limit
# should have measured it; the biggest workload last.
WORKLOADS = ("resnet18_b128", "transformer_b8", "resnet18_b512")
# the project's targets for graphed SAM on ResNet-18 batch 128
TARGET_WORKLOAD = "resnet18_b128"
TARGET_X_SGD = 0.5  # graphed SAM time / eager SGD time, at most
TARGET_VS_PERPARAM = 5.0  # per-param SAM time / graphed SAM time, at least


@dataclass
class Workload:
    """A model, its loss and a batch shape; ``batch`` is what this run uses (tiny runs shrink it)."""

    name: str
    label: str
    batch: int
    build: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.device, torch.Generator], tuple[Tensor, Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor]


@dataclass
class Row:
    """One line of the table: a workload, an implementation and its time per step."""

    workload: str
    impl: str
    ms: float | None = None  # None: not measured (see note / error)
    x_sgd: float | None = None  # ms / eager SGD ms
    vs_perparam: float | None = None  # per-param SAM ms / ms
    loss: float | None = None  # the last step's (first-pass) loss, a sanity value
    note: str = ""  # n/a reason, or which sam_fused backend ran
    error: str | None = None
    method: str = ""
    samples: list[float] = field(default_factory=list)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- workloads


def image_batch(size: int) -> Callable[[int, torch.device, torch.Generator], tuple[Tensor, Tensor]]:
    def make(batch: int, device: torch.device, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(batch, 3, size, size, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        return x.to(device), y.to(device)

    return make


def token_batch(
    cfg: TransformerConfig,
) -> Callable[[int, torch.device, torch.Generator], tuple[Tensor, Tensor]]:
    def make(batch: int, device: torch.device, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens = torch.randint(0, cfg.vocab, (batch, cfg.seq + 1), generator=gen)
        # next-token targets: the loss is over every position, flattened like the logits
        return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].reshape(-1).to(device)

    return make


def workloads(tiny: bool) -> dict[str, Workload]:
    """The three workloads; ``tiny`` shrinks the models, batches and images for CPU smoke runs.

    Tiny images are 16x16: bf16 convolutions on a CPU are several times slower than float32
    ones, and the smoke run only has to show that every row runs.
    """
    images = image_batch(16 if tiny else 32)
    cfg = TransformerConfig.tiny() if tiny else TransformerConfig()
    resnet_label = "ResNet-18 (tiny)" if tiny else "ResNet-18 CIFAR"
    tf_label = "Transformer (tiny)" if tiny else "Transformer 12x768, seq 128"
    return {
        "resnet18_b128": Workload(
            "resnet18_b128",
            resnet_label,
            4 if tiny else 128,
            lambda: resnet18_cifar(tiny=tiny),
            images,
            F.cross_entropy,
        ),
        "resnet18_b512": Workload(
            "resnet18_b512",
            resnet_label,
            8 if tiny else 512,
            lambda: resnet18_cifar(tiny=tiny),
            images,
            F.cross_entropy,
        ),
        "transformer_b8": Workload(
            "transformer_b8",
            tf_label,
            2 if tiny else 8,
            lambda: TransformerLM(cfg),
            token_batch(cfg),
            F.cross_entropy,
        ),
    }


# ---------------------------------------------------------------------------- the steps

Step = Callable[[Tensor, Tensor], Tensor]  # one training step on a batch; returns the loss


class NotApplicable(Exception):
    """The row cannot run here (no CUDA, helper missing): printed as n/a, not a failure."""


def autocast(device: torch.device, graphed: bool = False) -> contextlib.AbstractContextManager:
    # torch's CUDA-graph notes ask for cache_enabled=False inside a capture: the autocast
    # weight-cast cache would hold tensors from outside the graph's memory pool
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graphed)


def sgd(model: nn.Module, foreach: bool = True) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=foreach
    )


def make_step(
    impl: str, model: nn.Module, wl: Workload, device: torch.device, example: tuple[Tensor, Tensor], args
) -> tuple[Step, str]:
    """The step function of ``impl`` over ``model``, and a note for the table."""
    loss_fn = wl.loss_fn

    def two_pass(opt: Any) -> Step:
        def step(x: Tensor, y: Tensor) -> Tensor:
            with autocast(device):
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.first_step(zero_grad=True)
            with autocast(device):
                loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)
            return loss.detach()

        return step

    if impl == "sgd":
        opt = sgd(model)

        def step(x: Tensor, y: Tensor) -> Tensor:
            opt.zero_grad()
            with autocast(device):
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        return step, "foreach=True"
    if impl == "perparam_sam":
        opt = PerParamSAM(
            model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY, foreach=False,
        )  # fmt: skip
        return two_pass(opt), "base foreach=False"
    if impl == "sam_fused":
        opt = SAM(
            model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY, backend=args.sam_backend,
        )  # fmt: skip
        return two_pass(opt), f"backend {','.join(sorted(set(opt.backends)))}"
    if impl == "sam_fused_graphed":
        try:
            from sam_fused.graph import GraphedSAMStep
        except ImportError:
            raise NotApplicable("n/a (sam_fused.graph unavailable)") from None
        if device.type != "cuda":
            raise NotApplicable("n/a (CUDA graphs need a CUDA device)")
        opt = SAM(
            model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY, backend=args.sam_backend,
        )  # fmt: skip
        graphed = GraphedSAMStep(model, loss_fn, opt, *example, autocast_dtype=torch.bfloat16)
        return graphed, f"backend {','.join(sorted(set(opt.backends)))}"
    if impl == "sgd_graphed":
        if device.type != "cuda":
            raise NotApplicable("n/a (CUDA graphs need a CUDA device)")
        return graphed_sgd(model, loss_fn, example, device), "foreach=True, one graph"
    raise ValueError(f"unknown implementation {impl!r}")


def graphed_sgd(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], example: tuple[Tensor, Tensor], device
) -> Step:
    """Forward, backward and SGD step in one CUDA graph, fed through static batch buffers."""
    opt = sgd(model)
    static_x, static_y = (t.detach().clone() for t in example)

    def body() -> Tensor:
        with autocast(device, graphed=True):
            loss = loss_fn(model(static_x), static_y)
        loss.backward()
        opt.step()
        return loss.detach()

    # warm-up on a side stream: allocates the momentum buffers and autograd's workspaces and
    # lets cuDNN pick its algorithms outside the capture, which must not see any of that
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    # gradients set to None: the captured backward allocates them from the graph's pool
    # and its accumulation starts from nothing on every replay
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = body()

    def step(x: Tensor, y: Tensor) -> Tensor:
        static_x.copy_(x, non_blocking=True)
        static_y.copy_(y, non_blocking=True)
        graph.replay()
        return static_loss

    return step


# ---------------------------------------------------------------------------- timing


def time_steps(
    step: Step, batches: list[tuple[Tensor, Tensor]], device: torch.device, warmup: int, iters: int
) -> tuple[float, list[float], float, str]:
    """Median milliseconds per step after ``warmup`` steps; also the last loss."""
    feed: Iterator[tuple[Tensor, Tensor]] = (batches[i % len(batches)] for i in range(warmup + iters))
    loss = None
    for _ in range(warmup):
        loss = step(*next(feed))
    sync(device)
    samples: list[float] = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
        ]
        for start, end in events:
            x, y = next(feed)
            start.record()
            loss = step(x, y)
            end.record()
        sync(device)
        samples = [s.elapsed_time(e) for s, e in events]
        method = f"cuda events, median of {iters} after {warmup} warm-up"
    else:
        for _ in range(iters):
            x, y = next(feed)
            t0 = time.perf_counter()
            loss = step(x, y)
            samples.append((time.perf_counter() - t0) * 1e3)
        method = f"perf_counter, median of {iters} after {warmup} warm-up"
    assert loss is not None
    return statistics.median(samples), samples, float(loss.float().item()), method


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(impl: str, wl: Workload, device: torch.device, args: argparse.Namespace) -> Row:
    row = Row(wl.name, impl)
    cleanup(device)
    gen = torch.Generator().manual_seed(0)
    # two distinct batches, alternated: the graphed rows really copy a new batch each step
    batches = [wl.make_batch(wl.batch, device, gen) for _ in range(2)]
    torch.manual_seed(0)  # every row starts from the same weights
    model = wl.build().to(device).train()
    try:
        step, row.note = make_step(impl, model, wl, device, batches[0], args)
        row.ms, row.samples, row.loss, row.method = time_steps(step, batches, device, args.warmup, args.iters)
    except NotApplicable as exc:
        row.note = str(exc)
    except Exception as exc:  # one failing row (out of memory, a refused capture) must not lose the others
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        del model
        cleanup(device)
    return row


def finish_rows(rows: list[Row]) -> None:
    """Fill in the ratios against eager SGD and per-param SAM of the same workload."""
    base = {(r.workload, r.impl): r.ms for r in rows if r.ms}
    for r in rows:
        if not r.ms:
            continue
        sgd_ms = base.get((r.workload, "sgd"))
        pp_ms = base.get((r.workload, "perparam_sam"))
        r.x_sgd = r.ms / sgd_ms if sgd_ms else None
        r.vs_perparam = pp_ms / r.ms if pp_ms else None


# ---------------------------------------------------------------------------- output


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def target_text(r: Row) -> str:
    if r.impl != "sam_fused_graphed" or r.workload != TARGET_WORKLOAD:
        return ""
    return f"target: x SGD <= {TARGET_X_SGD}, vs per-param >= {TARGET_VS_PERPARAM}"


def row_cells(r: Row, wls: dict[str, Workload]) -> list[str]:
    wl = wls[r.workload]
    status = r.note if r.ms is None and not r.error else ("FAILED" if r.error else r.note)
    return [
        f"{wl.label}, batch {wl.batch}",
        LABELS[r.impl],
        fmt(r.ms, ".2f"),
        fmt(r.x_sgd, ".2f"),
        fmt(r.vs_perparam, ".2f"),
        fmt(r.loss, ".3f"),
        status,
        target_text(r),
    ]


HEAD = ["workload", "step", "ms/step", "x SGD", "vs per-param", "loss", "note", "target"]


def table(rows: list[Row], wls: dict[str, Workload]) -> str:
    lines = [row_cells(r, wls) for r in rows]
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(HEAD)]
    numeric = {2, 3, 4, 5}

    def render(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [render(HEAD), render(["-" * w for w in widths])]
    previous = None
    for r, line in zip(rows, lines):
        if previous is not None and r.workload != previous:
            out.append("")
        out.append(render(line))
        previous = r.workload
    return "\n".join(out)


def targets(rows: list[Row], tiny: bool) -> list[str]:
    """The project's two targets for graphed SAM on ResNet-18 batch 128, met or missed."""
    g = next((r for r in rows if r.workload == TARGET_WORKLOAD and r.impl == "sam_fused_graphed"), None)
    head = f"targets (graphed SAM, {TARGET_WORKLOAD})" + (" [tiny sizes: not meaningful]" if tiny else "")
    if g is None or g.ms is None:
        why = "not run" if g is None else (g.error or g.note)
        return [f"{head}: {why}"]

    def verdict(value: float | None, ok: Callable[[float], bool]) -> str:
        return "n/a" if value is None else ("met" if ok(value) else "MISSED")

    return [
        f"{head}:",
        f"  time / eager SGD      = {fmt(g.x_sgd, '.2f')} (target <= {TARGET_X_SGD}): "
        f"{verdict(g.x_sgd, lambda v: v <= TARGET_X_SGD)}",
        f"  per-param SAM / time  = {fmt(g.vs_perparam, '.2f')} (target >= {TARGET_VS_PERPARAM}): "
        f"{verdict(g.vs_perparam, lambda v: v >= TARGET_VS_PERPARAM)}",
    ]


def write_json(path: str | None, payload: dict) -> None:
    """Write atomically, so a run killed mid-way leaves the rows finished so far."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(target)


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {','.join(WORKLOADS)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--quick", action="store_true", help="fewer steps; on a CPU also the tiny models (as --tiny)"
    )
    p.add_argument("--tiny", action="store_true", help="tiny models and batches (smoke tests)")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per row (default 5, quick 3, quick on a CPU 1)",
    )
    p.add_argument(
        "--iters", type=int, default=None, help="timed steps per row (default 30, quick 10, quick on a CPU 3)"
    )
    p.add_argument(
        "--sam-backend",
        default="auto",
        help="backend= of the sam_fused rows (default auto: triton on CUDA; the graphed row needs triton)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="start no new row after S seconds; the rest are reported as not run",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on a CPU, as in bench_sam_step: OpenMP threads competing "
        "for busy cores made steps several times slower; untouched on CUDA)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write every row to this JSON file")
    args = p.parse_args(argv)
    # a quick CPU run is a smoke run of tiny models: a couple of steps per row say enough
    cpu_quick = args.quick and (
        args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    )
    if args.warmup is None:
        args.warmup = 1 if cpu_quick else (3 if args.quick else 5)
    if args.iters is None:
        args.iters = 3 if cpu_quick else (10 if args.quick else 30)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall = time.perf_counter()
    device = pick_device(args.device, args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: every row gets the tuned kernels
    tiny = args.tiny or (args.quick and device.type == "cpu")
    wls = workloads(tiny)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for name in names:
        if name not in wls:
            raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")

    env = environment(device)
    title = f"End-to-end training step, bf16 autocast, {env.get('gpu', 'CPU')}" + (
        " (tiny sizes)" if tiny else ""
    )
    print(title, flush=True)
    payload: dict[str, Any] = {"environment": env, "args": vars(args), "tiny": tiny, "rows": []}
    rows: list[Row] = []
    failures = 0
    plan = [(name, impl) for name in names for impl in impls]
    for n, (name, impl) in enumerate(plan, 1):
        if args.time_limit is not None and time.perf_counter() - wall > args.time_limit:
            row = Row(name, impl, note=f"not run (time limit {args.time_limit:.0f} s)")
        else:
            t0 = time.perf_counter()
            row = run_row(impl, wls[name], device, args)
            log(f"[{n}/{len(plan)}] {name} {impl}: row took {time.perf_counter() - t0:.1f} s")
        failures += row.error is not None
        rows.append(row)
        finish_rows(rows)
        # one line per finished row on stdout, so a run killed by a time limit keeps them
        what = f"FAILED: {row.error}" if row.error else (f"{row.ms:.2f} ms" if row.ms else row.note)
        print(f"  {name:<15} {LABELS[impl]:<29} {what}", flush=True)
        payload["rows"] = [asdict(r) for r in rows]
        write_json(args.json, payload)

    print()
    print(table(rows, wls))
    print()
    for line in targets(rows, tiny):
        print(line)
    elapsed = time.perf_counter() - wall
    print(f"\ntotal {elapsed:.0f} s")
    payload["targets"] = targets(rows, tiny)
    payload["elapsed_s"] = elapsed
    write_json(args.json, payload)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
