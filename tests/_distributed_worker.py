"""One rank of the distributed tests (``tests/test_distributed.py`` starts two of these).

Run as ``python tests/_distributed_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. Every scenario runs on both ranks (collectives
need both); each rank saves what it ends with to ``OUT_DIR/rank{RANK}.pt`` and the test
process compares that with computations of its own. The problem (model, data, loss,
hyperparameters) is defined here once, so that both sides build the same one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 3
RHO = 0.1
# SGD with momentum and weight decay, and AdamW: both fused base updates
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.02, "weight_decay": 0.05}),
}
# the state torch.optim keeps per parameter for each base, compared after the run
STATE_NAMES = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}
DDP_BACKENDS = ("reference", "auto")  # "auto" is the compiled cpp backend where it builds
# every variant (ASAM: SAM with adaptive=True) with the options its tests use
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "sam": {},
    "asam": {},
    "usam": {},
    "vasso": {"theta": 0.4},
    "fsam": {"sigma": 0.8, "lam": 0.6},
    "gcsam": {},
    "rsam": {"seed": 7},
    "gsam": {"alpha": 0.4},
    "looksam": {"k": 2, "alpha": 0.7},
    "interval": {"k": 2},
}


def emulated_cuda() -> type | None:
    """The cuda backend with its library emulated on the CPU (tests/emulated_cuda_backend.py),
    where it builds and the tests run on the CPU; None elsewhere."""
    if os.environ.get("SAM_FUSED_TEST_DEVICE", "cpu") != "cpu":
        return None
    from emulated_cuda_backend import EmulatedCudaBackend  # tests/ is on the path of both sides

    return EmulatedCudaBackend if EmulatedCudaBackend.info() else None


def table_backends() -> tuple[str, ...]:
    """The fused backends that run FSDP2's shards here (multi-tensor kernels over tables)."""
    from sam_fused.backends import CppBackend, TritonBackend, triton_available

    names = []
    if triton_available() and "cpu" in TritonBackend.capabilities.device_types:
        names.append("triton")
    if CppBackend.info():
        names.append("cpp")
    cuda = emulated_cuda()
    if cuda is not None:
        names.append("cuda")
    return tuple(names)


def runs_variant(backend: str, variant: str) -> bool:
    """Whether fused ``backend`` declares it runs ``variant`` on float32 CPU tensors."""
    from sam_fused.backends import CppBackend, TritonBackend
    from sam_fused.variants import VARIANTS

    capabilities = {"triton": TritonBackend, "cpp": CppBackend, "cuda": emulated_cuda()}[backend].capabilities
    rule = VARIANTS["sam" if variant == "asam" else variant]
    return capabilities.refusal(torch.device("cpu"), torch.float32, rule) is None


def auto_backend(variant: str) -> str:
    """What ``backend="auto"`` runs FSDP2's CPU shards on: the C++ backend where it takes table
    buckets and the variant, else foreach."""
    return "cpp" if "cpp" in table_backends() and runs_variant("cpp", variant) else "foreach"


def fused_fsdp_cases() -> tuple[tuple[str, str, str, dict[str, Any]], ...]:
    """Every variant x base on each fused table backend that runs it; RSAM also on the reference
    (its noise is drawn per shard, so the sharded run is compared with the reference's sharded run)."""
    cases = [
        (v, base, b, o)
        for b in table_backends()
        for v, o in VARIANT_OPTIONS.items()
        for base in BASES
        if runs_variant(b, v)
    ]
    if any(runs_variant(b, "rsam") for b in table_backends()):
        cases += [("rsam", base, "reference", VARIANT_OPTIONS["rsam"]) for base in BASES]
    return tuple(cases)


FSDP_CASES = (  # (variant, base, backend, variant_options)
    ("sam", "sgd", "auto", {}),
    ("sam", "adamw", "reference", {}),
    ("gsam", "sgd", "auto", {"alpha": 0.4}),  # the second pass's inner products
    ("looksam", "sgd", "auto", {"k": 2, "alpha": 0.7}),  # + ||g_v||^2 and a reuse step
)
FSDP_BACKENDS = ("auto", "reference")  # whatever "auto" runs for DTensor parameters, and the reference
# non-finite gradients on one rank only: (batch, the pass whose gradient overflows, the rank
# whose shard gets the infinity) per step; None: a clean step
OVERFLOW_STEPS = ((0, None, None), (1, "first", 1), (1, "second", 0), (2, None, None))
OVERFLOW_LOOPS = ("manual", "scaler.step", "unscaled")
OVERFLOW_SCALE = 2.0**10


def make_model() -> nn.Module:
    """6 -> 7 -> 1: on two ranks FSDP2 splits 7 rows 4 + 3 and gives rank 1 an empty last layer."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 1))


def batches() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, 1, generator=gen))
        for _ in range(STEPS)
    ]


def shard(batch: tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s half of the global batch (equal halves: DDP's mean = the global mean)."""
    per = GLOBAL_BATCH // WORLD
    x, y = batch
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def loss_fn(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).square().mean()


def make_sam(params, base: str, backend: str, variant: str = "sam", options: dict | None = None):
    from sam_fused import SAM

    cls, kwargs = BASES[base]
    if variant == "asam":  # SAM with |w|-scaled perturbations
        variant, kwargs = "sam", {**kwargs, "adaptive": True}
    return SAM(params, cls, rho=RHO, backend=backend, variant=variant, variant_options=options, **kwargs)


def train(model: nn.Module, opt, data) -> list[float]:
    """The manual SAM loop over ``data``; the norm of each step that perturbed."""
    from sam_fused import status as S

    norms = []
    for x, y in data:
        if opt.variant.perturbs_before_pass:  # RSAM
            opt.noise_step()
        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True):
            norms.append(float(opt._engine.status[S.SUMSQ].sqrt()))
            loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)
    return norms


def snapshot(params: list[Tensor], opt, base: str, full: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """Parameters and base-optimizer state as plain full tensors (``full`` gathers shards)."""
    state = [{n: full(opt.state[p][n]).clone() for n in STATE_NAMES[base]} for p in params]
    return {"params": [full(p.detach()).clone() for p in params], "state": state}


# ---------------------------------------------------------------------------- DDP
def ddp_model() -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(make_model())


def run_ddp(rank: int) -> dict[str, Any]:
    from sam_fused.distributed import agree_on_skip, local_first_pass, sam_step

    out: dict[str, Any] = {}
    data = [shard(b, rank) for b in batches()]
    same = lambda t: t  # DDP parameters are whole on every rank: nothing to gather

    for backend in DDP_BACKENDS:
        for base in BASES:
            # synced SAM, the manual loop: DDP averages both passes
            model = ddp_model()
            opt = make_sam(model.parameters(), base, backend)
            for x, y in data:
                loss_fn(model(x), y).backward()
                opt.first_step(zero_grad=True)
                loss_fn(model(x), y).backward()
                opt.second_step(zero_grad=True)
            out[f"synced/{backend}/{base}"] = snapshot(list(model.parameters()), opt, base, same)
            out[f"backends/{backend}"] = opt.backends

            # m-sharpness through sam_step
            model = ddp_model()
            opt = make_sam(model.parameters(), base, backend)
            for x, y in data:
                sam_step(model, opt, lambda x=x, y=y, m=model: loss_fn(m(x), y), m_sharpness=True)
            out[f"msharp/{backend}/{base}"] = snapshot(list(model.parameters()), opt, base, same)

    # m-sharpness, the manual loop with the context manager
    model = ddp_model()
    opt = make_sam(model.parameters(), "sgd", "reference")
    for x, y in data:
        with local_first_pass(model):
            loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        agree_on_skip(opt, model)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    out["msharp_manual"] = snapshot(list(model.parameters()), opt, "sgd", same)

    # what the first pass sees: inside the helper, the naive recipe, plain DDP
    x, y = data[0]
    model = ddp_model()
    opt = make_sam(model.parameters(), "sgd", "reference")
    with local_first_pass(model):
        loss_fn(model(x), y).backward()
    out["helper/grads"] = [p.grad.clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    out["helper/perturbed"] = [p.detach().clone() for p in model.parameters()]
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)

    model = ddp_model()
    output = model(x)  # the popular recipe: forward outside no_sync ...
    with model.no_sync():
        loss_fn(output, y).backward()  # ... backward inside
    out["naive/grads"] = [p.grad.clone() for p in model.parameters()]

    # a NaN in rank 1's first pass only: every rank must skip, or the replicas drift apart
    for agree in (True, False):
        model = ddp_model()
        opt = make_sam(model.parameters(), "sgd", "reference")
        x, y = data[0]
        with local_first_pass(model):
            loss = loss_fn(model(x), y)
            (loss * float("nan") if rank == 1 else loss).backward()
        opt.first_step(zero_grad=True)
        if agree:
            agree_on_skip(opt, model)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
        out[f"nan/agree={agree}"] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "skipped": float(opt.skipped_steps),
        }
    return out


# ---------------------------------------------------------------------------- FSDP2
def fully_shard(module: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard as shard_it

    shard_it(module)


def run_fsdp(rank: int) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    data = [shard(b, rank) for b in batches()]

    def full(t: Tensor) -> Tensor:
        assert isinstance(t, DTensor), f"expected a DTensor, got {type(t).__name__}"
        return t.full_tensor()

    for variant, base, backend, options in FSDP_CASES + fused_fsdp_cases():
        model = make_model()
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        params = list(model.parameters())
        opt = make_sam(params, base, backend, variant, options)
        norms = train(model, opt, data)
        key = f"fsdp/{variant}/{base}/{backend}"
        out[key] = snapshot(params, opt, base, full)
        out[key]["norms"] = norms
        out[key]["local_shapes"] = [tuple(p.to_local().shape) for p in params]
        out[key]["backends"] = opt.backends

    for backend in FSDP_BACKENDS:
        for how in OVERFLOW_LOOPS:
            out[f"overflow/{how}/{backend}"] = run_overflow(rank, backend, how, full)

    # what is refused, and how (the messages are checked by the test)
    from torch.distributed.fsdp import fully_shard as shard_it

    from sam_fused.distributed import local_first_pass

    half = make_model()
    fully_shard(half[0])  # the first layer's parameters are DTensors, the last layer's are not
    whole = make_model()
    fully_shard(whole)
    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    columns = nn.Linear(6, 4)  # the weight split along dimension 1: each rank holds parts of rows
    shard_it(columns, shard_placement_fn=lambda p: Shard(1) if p.dim() > 1 else Shard(0))
    columns_before = [p.to_local().clone() for p in columns.parameters()]
    cpp_runs_shards = "cpp" in table_backends()
    out["errors"] = {
        "mixed": _error(lambda: make_sam(half.parameters(), "sgd", "auto")),
        "gcsam_rows": _error(lambda: make_sam(columns.parameters(), "sgd", "auto", "gcsam")),
        # the C++ backend takes FSDP2's shards as table buckets (no error) where it builds
        "cpp": _error(lambda: make_sam(whole.parameters(), "sgd", "cpp")) if cpp_runs_shards else None,
        "local_first_pass": _error(lambda: local_first_pass(whole).__enter__()),
        # refused before anything moved: the shards keep their values (and their storage)
        "gcsam_rows_unchanged": all(
            torch.equal(p.to_local(), b) for p, b in zip(columns.parameters(), columns_before)
        ),
        "inner_module": _error(lambda: local_first_pass(make_model()).__enter__()),
    }
    return out


def run_overflow(rank: int, backend: str, how: str, full: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """OVERFLOW_STEPS under FSDP2: an infinity lands in one rank's gradient shard only.

    ``how``: "manual" (first_step/second_step with grad_scaler=), "scaler.step" (the second
    pass finished by GradScaler.step(opt)), "unscaled" (no GradScaler: skip_nonfinite).
    Records, after every step, each rank's skip count, the loss scale and the full weights.
    """
    model = make_model()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    params = list(model.parameters())
    opt = make_sam(params, "sgd", backend)
    scaler = None if how == "unscaled" else torch.amp.GradScaler("cpu", init_scale=OVERFLOW_SCALE)
    scale = (lambda t: t) if scaler is None else scaler.scale
    data = [shard(b, rank) for b in batches()]
    steps = []
    for index, (batch, bad_pass, bad_rank) in enumerate(OVERFLOW_STEPS):
        x, y = data[batch]
        for this_pass in ("first", "second"):
            scale(loss_fn(model(x), y)).backward()
            if this_pass == bad_pass and rank == bad_rank:  # only this rank's shard overflows
                params[0].grad.to_local()[0, index % 3] = float("inf")
            if this_pass == "first":
                opt.first_step(zero_grad=True, grad_scaler=scaler)
            elif how == "scaler.step":
                scaler.step(opt)
                opt.zero_grad()
            else:
                opt.second_step(zero_grad=True, grad_scaler=scaler)
        if scaler is not None:
            scaler.update()
        steps.append(
            {
                "skipped": float(opt.skipped_steps),
                "scale": None if scaler is None else float(scaler.get_scale()),
                "params": [full(p.detach()).clone() for p in params],
            }
        )
    return {"steps": steps, **snapshot(params, opt, "sgd", full)}


def _error(build: Callable[[], Any]) -> str | None:
    try:
        build()
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main() -> None:
    import torch.distributed as dist

    out_dir = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    if "cuda" in table_backends():  # backend="cuda" gets the emulated library, as in conftest
        from sam_fused import backends

        backends._INSTANCES["cuda"] = emulated_cuda()()
    try:
        results = {"ddp": run_ddp(rank), "fsdp": run_fsdp(rank)}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
