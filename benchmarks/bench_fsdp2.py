"""The optimizer part of a SAM step under FSDP2, fused against per-parameter.

Two ranks (gloo, CPU, one torch thread each) hold an FSDP2 model (``fully_shard`` over a
module whose parameters have a parameter set's shapes, ``benchmarks/param_sets.py``
scaled for the CPU), so every parameter is a DTensor whose local shard is rows of it.
With gradients in place, each row times ``first_step()`` + ``second_step()``:

* ``per-parameter``: ``backend="reference"``, the per-parameter PyTorch math every
  DTensor parameter ran before the table layout (one small operation per tensor, as the
  popular SAM loop);
* ``fused sharded``: ``backend="auto"``, the table layout's multi-tensor kernels over the
  local shards in place (the compiled ``cpp`` backend on a CPU, ``triton`` on a GPU);
* ``flat, same shards``: no process group and no DTensor: each rank runs the same
  ``auto`` backend over ordinary tensors with its own local shards' shapes, in flat
  buffers (sam_fused's fastest layout, where it applies). The target compares the fused
  sharded step with this row: the same elements per rank, only the layout and the two
  scalar all-reduces differ.

Both ranks run every row at the same time (so the two cores are loaded alike in every
row); a row's time is the slower rank's median. Before timing, the fused and per-parameter
rows are checked to compute the same weights after one step (float rounding).

Run: ``python -m benchmarks.bench_fsdp2 [--sets resnet50,2000x4096] [--base sgd,adamw]
[--reps 20] [--quick] [--json PATH]``. The targets: fused sharded within 1.5x of
flat on the same shards, and at least 10x faster than per-parameter on the 2000-tensor set.

On a GPU, ``--device cuda`` runs one rank (NCCL) at the full sizes (benchmarks/README.md): FSDP2 on one GPU
keeps every parameter a DTensor, so the row compares the table layout with the flat one on
the same card (``benchmarks/gpu_check.sh``); times are CUDA-synchronized wall medians.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sam_fused import SAM

try:
    from benchmarks.param_sets import cpu_sets, full_sets, select
except ImportError:  # run as a plain script from benchmarks/
    from param_sets import cpu_sets, full_sets, select  # type: ignore[no-redef]

RHO = 0.05
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.05}),
}
ROWS = ("per-parameter", "fused sharded", "flat, same shards")
TARGET_VS_FLAT = 1.5  # fused sharded / flat, at most
TARGET_VS_PER_PARAM = 10.0  # per-parameter / fused sharded on the 2000-tensor set, at least


class Shapes(nn.Module):
    """A module whose parameters have the given shapes (what fully_shard shards)."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes)


def _fresh_grads(params: list[torch.Tensor], seed: int) -> None:
    """Gradients of the parameters' own kind (DTensor shards for sharded parameters)."""
    torch.manual_seed(seed)
    for p in params:
        p.grad = torch.randn_like(p) * 0.01


def _sharded(shapes: list[tuple[int, ...]], seed: int, device: torch.device) -> list[torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    model = Shapes(shapes, seed).to(device)
    fully_shard(model)
    return list(model.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _time(opt: SAM, reps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``reps`` optimizer steps, every rank starting together."""
    samples = []
    for _ in range(reps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if opt.first_step():
            opt.second_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _slower_rank(ms: float, device: torch.device) -> float:
    t = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _check(shapes: list[tuple[int, ...]], base: str, device: torch.device) -> float:
    """Largest difference between the fused and the per-parameter weights after one step."""
    cls, kwargs = BASES[base]
    after = []
    for backend in ("auto", "reference"):
        params = _sharded(shapes, seed=1, device=device)
        _fresh_grads(params, seed=2)
        opt = SAM(params, cls, rho=RHO, backend=backend, **kwargs)
        if opt.first_step():
            opt.second_step()
        after.append([_local(p.detach()).clone() for p in params])
    worst = max((float((a - b).abs().max()) for a, b in zip(*after) if a.numel()), default=0.0)
    torch.testing.assert_close(after[0], after[1], rtol=1e-5, atol=1e-6)
    return worst


def _sets(args: argparse.Namespace):
    if args.device == "cuda":
        return select(full_sets(), args.sets)
    return select(cpu_sets(4 if args.quick else 1), args.sets)


def _rank_main(rank: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=args.world, device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # two ranks on two cores
        dist.init_process_group("gloo", rank=rank, world_size=args.world)
    rows: list[dict[str, Any]] = []
    try:
        for pset in _sets(args):
            shapes = [tuple(s) for s in pset.shapes]
            for base in args.base.split(","):
                cls, kwargs = BASES[base]
                worst = _check(shapes, base, device)
                params = _sharded(shapes, seed=0, device=device)
                local_shapes = [tuple(_local(p).shape) for p in params]
                flat = [nn.Parameter(torch.randn(s, device=device) * 0.02) for s in local_shapes]
                ms: dict[str, float] = {}
                backends: dict[str, list[str]] = {}
                for row in ROWS:
                    target = flat if row == ROWS[2] else _sharded(shapes, seed=0, device=device)
                    _fresh_grads(target, seed=3)
                    backend = "reference" if row == ROWS[0] else "auto"
                    opt = SAM(target, cls, rho=RHO, backend=backend, **kwargs)
                    _time(opt, 2, device)  # warm-up: builds, compiles, plans, state
                    ms[row] = _slower_rank(statistics.median(_time(opt, args.reps, device)), device)
                    backends[row] = opt.backends
                for row in ROWS:
                    rows.append(
                        {
                            "set": pset.name,
                            "label": pset.label,
                            "tensors": pset.count,
                            "elements": pset.numel,
                            "elements_per_rank": sum(_local(p).numel() for p in params),
                            "base": base,
                            "row": row,
                            "backends": backends[row],
                            "ms": ms[row],
                            "vs_per_parameter": ms[ROWS[0]] / ms[row],
                            "vs_flat": ms[row] / ms[ROWS[2]],
                            "check_max_abs_diff": worst,
                        }
                    )
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| set | base | row | backends | ms | x vs per-parameter | / flat |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} ({r['tensors']} tensors, {r['elements_per_rank']:,} el/rank) | {r['base']} "
            f"| {r['row']} | {','.join(r['backends'])} | {r['ms']:.3f} | {r['vs_per_parameter']:.1f} "
            f"| {r['vs_flat']:.2f} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The two targets, per set and base optimizer."""
    out = []
    for r in rows:
        if r["row"] != ROWS[1]:
            continue
        where = f"{r['set']}/{r['base']}"
        ok = r["vs_flat"] <= TARGET_VS_FLAT
        out.append(f"{where}: fused sharded / flat = {r['vs_flat']:.2f} (target <= {TARGET_VS_FLAT}): {ok}")
        if r["set"] == "2000x4096":
            ok = r["vs_per_parameter"] >= TARGET_VS_PER_PARAM
            out.append(
                f"{where}: per-parameter / fused sharded = {r['vs_per_parameter']:.1f} "
                f"(target >= {TARGET_VS_PER_PARAM}): {ok}"
            )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="resnet50,2000x4096", help="parameter sets (param_sets.py names)")
    parser.add_argument("--base", default="sgd,adamw", help="base optimizers: sgd, adamw")
    parser.add_argument("--reps", type=int, default=20, help="timed steps per row (median)")
    parser.add_argument("--quick", action="store_true", help="sets 4x smaller, 3 reps: a smoke run")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--world", type=int, default=None, help="ranks (default: 2 on cpu, 1 on cuda)")
    args = parser.parse_args(argv)
    if args.world is None:
        args.world = 1 if args.device == "cuda" else 2
    if args.quick:
        args.reps = min(args.reps, 3)
    for base in args.base.split(","):
        if base not in BASES:
            parser.error(f"unknown base optimizer {base!r}; choose from {', '.join(BASES)}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        mp.spawn(_rank_main, args=(_free_port(), args, out_path), nprocs=args.world, join=True)
        with open(out_path) as f:
            rows = json.load(f)
    if args.device == "cuda":
        where = f"NCCL, {torch.cuda.get_device_name()}"
        print(f"FSDP2, {args.world} rank(s) ({where}), torch {torch.__version__}")
    else:
        print(f"FSDP2, {args.world} ranks (gloo, CPU, 1 thread each), torch {torch.__version__}")
    print(table(rows))
    for line in verdicts(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            meta = {"torch": torch.__version__, "device": args.device, "world": args.world}
            json.dump({**meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
