"""``state_dict()`` and ``load_state_dict()``: torch.optim's format, checked before it is applied.

The format is torch.optim's (``{"state": {index: {...}}, "param_groups": [...]}``, with
``param_names`` where the groups have names) plus one entry of sam_fused's own,
``"sam_fused"``: the step index (periodic variants), the persistent status entries (skipped
steps, LookSAM's ``||g_v||^2``) and RSAM's generator state. Everything in it loads with
``torch.load(weights_only=True)``.

Loading behaves as torch.optim's does with the same checkpoint: a parameter the checkpoint
has no state for starts fresh (its Adam step count included), groups take the saved
hyperparameters, and a checkpoint of a plain ``torch.optim`` optimizer loads (SAM's own
group keys take the optimizer's defaults). Unlike torch.optim, a mismatched checkpoint is
refused before anything changes: wrong group sizes, state for unknown parameters, an
incomplete entry, a tensor shaped unlike its parameter.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from . import options
from . import status as S
from .state import ParamState, check_entry
from .step_state import Phase

if TYPE_CHECKING:
    from .optimizer import SAM

__all__ = ["load_state_dict", "state_dict"]


def _refuse_mid_step(opt: SAM, what: str) -> None:
    if opt._engine.step.phase is not Phase.IDLE:
        raise RuntimeError(options.MID_STEP.format(what=what))


def state_dict(opt: SAM) -> dict[str, Any]:
    _refuse_mid_step(opt, "state_dict()")
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    index: dict[int, int] = {}
    groups = []
    for group in opt.param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            index.setdefault(id(p), len(index))
        packed["params"] = [index[id(p)] for p in group["params"]]
        groups.append(packed)
    engine = opt._engine
    saved = {
        "state": {index[id(p)]: dict(entry) for p, entry in opt.state.items()},
        "param_groups": groups,
        "sam_fused": {
            "step_index": engine.step.step_index,
            "status": {i: float(engine.status[i]) for i in S.PERSISTENT},
            "generator": None if engine.step.generator is None else engine.step.generator.get_state(),
        },
    }
    for hook in opt._optimizer_state_dict_post_hooks.values():
        result = hook(opt, saved)
        if result is not None:
            saved = result
    return saved


def load_state_dict(opt: SAM, saved: dict[str, Any]) -> None:
    _refuse_mid_step(opt, "load_state_dict()")
    saved = dict(saved)
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, saved)
        if result is not None:
            saved = result
    engine = opt._engine
    groups = opt.param_groups
    new_groups = _checked_groups(opt, copy.deepcopy(saved["param_groups"]))
    order = [p for g in new_groups for p in g["params"]]
    params = [p for g in groups for p in g["params"]]
    by_id = dict(zip(order, params))
    entries: dict[int, dict] = {}
    for key, entry in saved["state"].items():
        if key not in by_id:
            raise ValueError(
                f"the checkpoint has state for parameter {key!r}, which none of its param groups lists"
            )
        bucket, i = engine.locate(by_id[key])
        names, counts_steps = _names(opt, new_groups[bucket.group_index])
        check_entry(bucket, i, entry, names, counts_steps, engine.variant.running_state)
        entries[id(by_id[key])] = entry
    extra = saved.get("sam_fused")
    generator = None
    if extra is not None:
        generator = _checked_generator(engine, extra.get("generator"))
    # ---- everything is checked: apply
    for group, new in zip(groups, new_groups):
        params_list, names = group["params"], group.get("param_names")
        group.clear()
        group.update(new)
        group["params"] = params_list
        if names is not None and "param_names" not in new:
            group["param_names"] = names
    for bucket in engine.buckets:
        for i, p in enumerate(bucket.params):
            entry = ParamState(engine, bucket, i)
            given = entries.get(id(p))
            if given is None:
                entry.clear()
            else:
                entry.replace(given)
    step = engine.step
    step.step_index = 0 if extra is None else int(extra["step_index"])
    for i in S.PERSISTENT:
        engine.status[i] = 0.0 if extra is None else float(extra["status"].get(i, 0.0))
    if generator is not None:
        step.generator = generator
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def _checked_groups(opt: SAM, saved_groups: list[dict]) -> list[dict]:
    groups = opt.param_groups
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        raise ValueError(
            "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
        )
    keys = opt._engine.keys
    for index, group in enumerate(saved_groups):
        for key in keys.values():  # a plain torch.optim checkpoint: SAM's keys take our defaults
            group.setdefault(key, opt.defaults[key])
        options.check_group(group, keys, index, opt._engine.device)
    return saved_groups


def _names(opt: SAM, group: dict) -> tuple[tuple[str, ...], bool]:
    from .base_updates import REGISTRY

    spec = REGISTRY.get(type(opt.base_optimizer))
    if spec is None:
        return (), False
    return spec.names_for_group(group), spec.counts_steps


def _checked_generator(engine, state: Any) -> torch.Generator | None:
    if state is None:
        return None
    generator = torch.Generator(device=engine.device)
    try:
        generator.set_state(state)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"the checkpoint's RSAM generator state cannot be used here: {exc}") from None
    return generator
