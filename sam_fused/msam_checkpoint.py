"""MSAM's ``state_dict()`` and ``load_state_dict()``.

The layout is torch.optim's (``state`` keyed by the parameter's index over all groups,
``param_groups`` with ``params`` as indices) with, per parameter, the base's state
(``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``), ``step`` (a float32 tensor, as
torch's capturable Adam keeps it) and ``unperturbed_weight`` (the stored ``w``), plus
``msam_scales``: each group's perturbation factor ``c``. The entries are views of the
buckets' buffers (``torch.save`` writes them; take a copy to keep a snapshot in memory).
A checkpoint is checked whole before anything is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .msam_rules import WEIGHT, MSAMHyper, state_roles

if TYPE_CHECKING:
    from .msam import MSAM

__all__ = ["load", "save"]

SCALES = "msam_scales"


def _entries(opt: MSAM) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """``(parameter, its state views)`` in checkpoint order (group by group)."""
    return [(p, opt.state[p]) for group in opt.param_groups for p in group["params"]]


def save(opt: MSAM) -> dict[str, Any]:
    state = {k: dict(views) for k, (_, views) in enumerate(_entries(opt))}
    groups, start = [], 0
    for group in opt.param_groups:
        n = len(group["params"])
        groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + n))}
        )
        start += n
    return {"state": state, "param_groups": groups, SCALES: opt._scales.clone()}


def _refuse(why: str) -> ValueError:
    return ValueError(f"cannot load this state_dict into MSAM: {why}; nothing was changed")


def _check(opt: MSAM, state_dict: dict[str, Any]) -> None:
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or SCALES not in state_dict or "state" not in state_dict:
        raise _refuse(f"it is not an MSAM checkpoint (it needs 'state', 'param_groups' and {SCALES!r})")
    if len(groups) != len(opt.param_groups):
        raise _refuse(f"it has {len(groups)} param groups, this optimizer {len(opt.param_groups)}")
    for index, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise _refuse(
                f"param group {index} has {len(saved['params'])} parameters there, "
                f"{len(group['params'])} here"
            )
        try:
            MSAMHyper.of(opt._base, {**group, **{k: v for k, v in saved.items() if k != "params"}}, index)
        except (TypeError, ValueError) as error:
            raise _refuse(str(error)) from error
    scales = state_dict[SCALES]
    if not isinstance(scales, Tensor) or scales.shape != opt._scales.shape:
        raise _refuse(f"{SCALES!r} must be a tensor of {len(opt.param_groups)} values")
    roles = (*state_roles(opt._base), WEIGHT, "step")
    saved_ids = [i for g in groups for i in g["params"]]
    for (p, _), saved_id in zip(_entries(opt), saved_ids):
        entry = state_dict["state"].get(saved_id)
        if entry is None:
            continue  # no state: the parameter starts fresh, as torch.optim does
        missing = [role for role in roles if role not in entry]
        if missing:
            raise _refuse(
                f"the state of parameter {saved_id} lacks {missing} "
                f"(a {opt._base} MSAM checkpoint has {list(roles)})"
            )
        for role in roles[:-1]:
            value = entry[role]
            if not isinstance(value, Tensor) or value.shape != p.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise _refuse(f"{role!r} of parameter {saved_id} is {shape}, the parameter {tuple(p.shape)}")


def load(opt: MSAM, state_dict: dict[str, Any]) -> None:
    _check(opt, state_dict)
    groups = state_dict["param_groups"]
    saved_ids = [i for g in groups for i in g["params"]]
    for (_, views), saved_id in zip(_entries(opt), saved_ids):
        entry = state_dict["state"].get(saved_id)
        for role, view in views.items():
            if entry is None:
                view.zero_()
            else:
                view.copy_(torch.as_tensor(entry[role]))
    for saved, group in zip(groups, opt.param_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
    opt._scales.copy_(state_dict[SCALES])
    for bucket in opt._buckets:
        bucket.counts_moved()
