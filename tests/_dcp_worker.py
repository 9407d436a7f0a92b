"""One rank of ``tests/test_dcp.py``: SAM under FSDP2 through torch.distributed.checkpoint.

Run as ``python tests/_dcp_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT`` set (``tests/_ranks.py`` does). For each case and backend, three runs of
the same problem on both ranks:

* ``uninterrupted``: ``STEPS`` SAM steps;
* ``saving``: ``SPLIT`` steps, ``dcp.save`` of ``get_state_dict(model, opt)`` into
  ``OUT_DIR/checkpoints/<case>``, then on to ``STEPS`` (saving must disturb nothing);
* ``resumed``: a fresh FSDP2 model and SAM optimizer, ``get_state_dict`` of them as the
  template, ``dcp.load``, ``set_state_dict``, then the steps from ``SPLIT`` to ``STEPS``.

Each rank saves what it ends with (its own shards, bit for bit, and the gathered full
tensors) to ``OUT_DIR/rank{RANK}.pt``; the test compares the runs and reads the checkpoints'
metadata.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
import _distributed_worker as W  # the model, loss, bases and SAM constructor

STEPS, SPLIT = 5, 3
GLOBAL_BATCH = 8
# (variant, base, variant options): both fused bases, the variants whose running state lives
# in opt.state (VaSSO's d, F-SAM's m), and LookSAM, whose schedule (the step count) and
# ||g_v||^2 are optimizer-wide: k = 2 makes the resumed run start on a reuse step (3)
CASES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("sam", "sgd", {}),
    ("sam", "adamw", {}),
    ("vasso", "sgd", {}),
    ("vasso", "adamw", {}),
    ("fsam", "adamw", {}),
    ("looksam", "sgd", {"k": 2, "alpha": 0.7}),
)
BACKENDS = ("auto", "reference")  # "auto": whatever runs DTensor parameters (fused or not)
# other StateDictOptions: (name, case, options as keyword arguments)
OPTION_CASES: tuple[tuple[str, tuple[str, str, dict[str, Any]], dict[str, bool]], ...] = (
    ("flatten", ("vasso", "adamw", {}), {"flatten_optimizer_state_dict": True}),
    ("full", ("fsam", "adamw", {}), {"full_state_dict": True}),
)


def case_name(case: tuple[str, str, dict[str, Any]], backend: str) -> str:
    variant, base, _ = case
    return f"{variant}-{base}-{backend}"


def batches() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, 1, generator=gen))
        for _ in range(STEPS)
    ]


def sharded_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = W.make_model()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def make(case: tuple[str, str, dict[str, Any]], backend: str) -> tuple[nn.Module, Any]:
    variant, base, options = case
    model = sharded_model()
    return model, W.make_sam(list(model.parameters()), base, backend, variant, options)


def train(model: nn.Module, opt: Any, data: list[tuple[Tensor, Tensor]], steps: range) -> None:
    W.train(model, opt, [data[i] for i in steps])


def record(model: nn.Module, opt: Any) -> dict[str, Any]:
    """This rank's shards (to compare bit for bit) and the full tensors, of weights and state."""
    params = list(model.parameters())
    local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().clone()
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return {
        "params": [local(p) for p in params],
        "state": [{k: local(v) for k, v in opt.state[p].items()} for p in params],
        "full_params": [full(p) for p in params],
        "full_state": [{k: full(v) for k, v in opt.state[p].items()} for p in params],
        "step_index": opt._engine.step.step_index,
        "skipped": float(opt.skipped_steps),
        "backends": opt.backends,
    }


def describe(state_dict: dict[str, Any]) -> dict[str, Any]:
    """What get_state_dict handed to dcp.save for the optimizer: type and placements per entry."""
    out = {}
    for fqn, entry in state_dict["state"].items():
        for key, value in entry.items():
            placements = [repr(p) for p in value.placements] if hasattr(value, "placements") else None
            out[f"{fqn}.{key}"] = (type(value).__name__, placements)
    return out


def run_case(
    case: tuple[str, str, dict[str, Any]], backend: str, folder: Path, **options: bool
) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    sd_options = StateDictOptions(**options)
    rank = int(os.environ["RANK"])
    data = [W.shard(b, rank) for b in batches()]
    out: dict[str, Any] = {}

    model, opt = make(case, backend)
    train(model, opt, data, range(STEPS))
    out["uninterrupted"] = record(model, opt)

    model, opt = make(case, backend)
    train(model, opt, data, range(SPLIT))
    model_sd, optim_sd = get_state_dict(model, opt, options=sd_options)
    if not options:
        out["saved_types"] = describe(optim_sd)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
    train(model, opt, data, range(SPLIT, STEPS))
    out["saving"] = record(model, opt)

    model, opt = make(case, backend)
    model_sd, optim_sd = get_state_dict(model, opt, options=sd_options)  # the template to load into
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
    try:
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=sd_options)
    except ValueError as exc:
        out["error"] = str(exc)
        return out
    out["loaded_step_index"] = opt._engine.step.step_index
    train(model, opt, data, range(SPLIT, STEPS))
    out["resumed"] = record(model, opt)
    return out


def run_fresh(base: str, backend: str) -> dict[str, Any]:
    """What DCP's state initialization does to a fresh SAM optimizer, and to torch's own."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    out = {}
    for who in ("sam", "torch"):
        model = sharded_model()
        params = list(model.parameters())
        if who == "sam":
            opt = W.make_sam(params, base, backend, "vasso")
        else:
            cls, kwargs = W.BASES[base]
            opt = cls(params, **kwargs)
        saved = get_optimizer_state_dict(model, opt)
        out[who] = {
            "params": [p.detach().full_tensor().clone() for p in params],
            "state": {
                fqn: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in e.items()}
                for fqn, e in saved["state"].items()
            },
            "lr": [g["lr"] for g in opt.param_groups],
        }
        if who == "sam":
            out[who]["step_index"] = opt._engine.step.step_index
            out[who]["grads"] = [p.grad for p in params]
    return out


def main() -> None:
    import torch.distributed as dist

    out_dir = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    results: dict[str, Any] = {}
    try:
        for case in CASES:
            for backend in BACKENDS:
                name = case_name(case, backend)
                results[name] = run_case(case, backend, out_dir / "checkpoints" / name)
        for option, case, options in OPTION_CASES:
            name = f"{option}/{case_name(case, 'auto')}"
            results[name] = run_case(case, "auto", out_dir / "checkpoints" / option, **options)
        # LookSAM's schedule cannot travel through the flattened format: refused on load
        looksam = next(c for c in CASES if c[0] == "looksam")
        results["flatten/looksam"] = run_case(
            looksam, "auto", out_dir / "checkpoints" / "flatten-looksam", flatten_optimizer_state_dict=True
        )
        for base in W.BASES:
            results[f"fresh/{base}"] = run_fresh(base, "auto")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
