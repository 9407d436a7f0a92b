"""``state_dict()`` and ``load_state_dict()``: torch.optim's format, checked before it is applied.

The format is torch.optim's (``{"state": {index: {...}}, "param_groups": [...]}``, with
``param_names`` where the groups have names). sam_fused's own entry, ``"sam_fused"`` (the
step index of periodic variants, the skipped-steps count, LookSAM's ``||g_v||^2`` and RSAM's
generator state: one optimizer-wide value each), is a key of *every* saved param group:
``torch.distributed.checkpoint`` keeps only ``"state"`` and ``"param_groups"`` of an
optimizer's state dict, and routes each group to its optimizer when several are saved
together, so that is the one place it survives. Everything loads with
``torch.load(weights_only=True)``; checkpoints that kept the entry at the top level
(sam_fused before the groups carried it) still load.

Loading behaves as torch.optim's does with the same checkpoint: a parameter the checkpoint
has no state for starts fresh (its Adam step count included), groups take the saved
hyperparameters, and a checkpoint of a plain ``torch.optim`` optimizer loads (SAM's own
group keys take the optimizer's defaults). Unlike torch.optim, a mismatched checkpoint is
refused before anything changes: wrong group sizes, state for unknown parameters, an
incomplete entry, a tensor shaped unlike its parameter, a group saved by another base
optimizer (``base_match.py``). Entries of ``opt.state`` under a key that is not a parameter
(what a hook or a user keeps there) are saved under that key and loaded back, a checkpoint's
replacing the optimizer's, as torch.optim does (a key the saved groups list is a parameter's,
and an integer key that they do not list is refused as state for an unknown parameter).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer  # a sam_fused.SAM (its class is above this module)

from . import options
from . import status as S
from .base_match import check_saved_group
from .state import ParamState, check_entry
from .step_state import Phase

__all__ = ["EXTRA", "initialize_state", "load_state_dict", "state_dict"]

EXTRA = "sam_fused"  # the key of sam_fused's own entry in each saved param group


def _refuse_mid_step(opt: Optimizer, what: str) -> None:
    if opt.engine.step.phase is not Phase.IDLE:
        raise RuntimeError(options.MID_STEP.format(what=what))


def state_dict(opt: Optimizer) -> dict[str, Any]:
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
    extra = _extra(opt.engine)
    for packed in groups:
        packed[EXTRA] = dict(extra)
    state: dict[Any, Any] = {}
    for key, entry in opt.state.items():  # a parameter's entry by its index; any other as it is
        if isinstance(key, Tensor):
            state[index[id(key)]] = dict(entry)
        else:
            state[key] = entry
    saved = {"state": state, "param_groups": groups}
    for hook in opt._optimizer_state_dict_post_hooks.values():
        result = hook(opt, saved)
        if result is not None:
            saved = result
    return saved


def load_state_dict(opt: Optimizer, saved: dict[str, Any]) -> None:
    _refuse_mid_step(opt, "load_state_dict()")
    saved = dict(saved)
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, saved)
        if result is not None:
            saved = result
    engine = opt.engine
    groups = opt.param_groups
    saved_groups = copy.deepcopy(saved["param_groups"])
    extra = _saved_extra(opt, saved, saved_groups)  # takes the entries out of saved_groups
    new_groups = _checked_groups(opt, saved_groups)
    order = [p for g in new_groups for p in g["params"]]
    params = [p for g in groups for p in g["params"]]
    by_id = dict(zip(order, params))
    entries: dict[int, dict] = {}
    foreign: dict[Any, Any] = {}
    for key, entry in saved["state"].items():
        # a parameter's key is what the saved groups list for it (torch.optim's numbers; the
        # names torch.distributed.checkpoint puts there); any other key is an entry a user or a
        # hook kept under its own key (torch.optim keeps it), but a number names a parameter
        if key not in by_id and not isinstance(key, int):
            foreign[key] = entry
            continue
        if key not in by_id:
            raise ValueError(
                f"the checkpoint has state for parameter {key!r}, which none of its param groups lists"
            )
        bucket, i = engine.locate(by_id[key])
        names, counts_steps = _names(opt, new_groups[bucket.group_index])
        check_entry(bucket, i, entry, names, counts_steps, engine.variant.running_state)
        entries[id(by_id[key])] = entry
    generator = None if extra is None else _checked_generator(engine, extra["generator"])
    policy = engine.policy.checked_state(None if extra is None else extra["policy"])
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
    opt.state.foreign.clear()  # torch.optim's load replaces the whole state
    opt.state.foreign.update(foreign)
    step = engine.step
    step.step_index = 0 if extra is None else extra["step_index"]
    engine.status[S.SKIPPED] = 0.0 if extra is None else extra["skipped_steps"]
    engine.status[S.GV2] = 0.0 if extra is None else extra["looksam_gv2"]
    if generator is not None:
        step.generator = generator
    engine.policy.load_state(policy)
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def _extra(engine: Any) -> dict[str, Any]:
    """sam_fused's optimizer-wide state, as each saved param group carries it."""
    generator = engine.step.generator
    if generator is None and engine.variant.perturbs_before_pass:
        # the generator RSAM's first noise_step() would seed: a fresh optimizer's entry has the
        # same structure as a trained one's (torch.distributed.checkpoint loads into it)
        generator = _seeded(engine)
    extra = {
        "step_index": engine.step.step_index,
        "skipped_steps": float(engine.status[S.SKIPPED]),
        "looksam_gv2": float(engine.status[S.GV2]),
        "generator": None if generator is None else generator.get_state(),
    }
    policy = engine.policy.state_dict()  # AESAM's statistics (policies.py); none for the others
    return {**extra, "policy": policy} if policy else extra


def _seeded(engine: Any) -> torch.Generator:
    generator = torch.Generator(device=engine.device)
    generator.manual_seed(int(engine.variant_options["seed"]))
    return generator


def _saved_extra(opt: Optimizer, saved: dict[str, Any], groups: list[dict]) -> dict[str, Any] | None:
    """sam_fused's entry of a checkpoint (removed from ``groups``), checked; None when it has none.

    A checkpoint whose groups have SAM's keys but no entry lost it on the way (DCP's
    ``flatten_optimizer_state_dict=True`` rebuilds the groups from this optimizer's keys):
    refused where the entry decides the next steps (periodic variants, RSAM's noise).
    """
    found = [g.pop(EXTRA) for g in groups if isinstance(g, dict) and EXTRA in g]
    if found:
        first = found[0]
        if any(not _same_extra(first, other) for other in found[1:]):
            raise ValueError(
                f"the checkpoint's param groups carry different {EXTRA!r} entries; they are one "
                "optimizer-wide value (were groups of several optimizers mixed?)"
            )
        return _checked_extra(first, "param_groups[0]")
    old = saved.get(EXTRA)
    if old is not None:  # sam_fused's earlier format: one top-level entry, status by index
        status = old.get("status", {})
        entry = {
            "step_index": old.get("step_index", 0),
            "skipped_steps": status.get(S.SKIPPED, 0.0),
            "looksam_gv2": status.get(S.GV2, 0.0),
            "generator": old.get("generator"),
        }
        return _checked_extra(entry, "the top-level entry")
    variant = opt.engine.variant
    sam_keys = set(opt.engine.keys.values())
    stripped = bool(groups) and all(isinstance(g, dict) and sam_keys <= g.keys() for g in groups)
    if stripped and (variant.periodic or variant.perturbs_before_pass):
        what = f"{variant.name}'s step count (its schedule)"
        if variant.perturbs_before_pass:
            what = "RSAM's noise generator"
        raise ValueError(
            f"the checkpoint's param groups have SAM's keys but no {EXTRA!r} entry, which holds "
            f"{what}: resuming without it would not continue the run. It is lost on the way "
            "through torch.distributed.checkpoint with StateDictOptions(flatten_optimizer_state_dict="
            "True), which rebuilds the groups from the optimizer's own keys; save and load with the "
            "default options (flatten_optimizer_state_dict=False)"
        )
    return None


def _checked_extra(entry: Any, where: str) -> dict[str, Any]:
    where = f"the checkpoint's {EXTRA!r} entry ({where})"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, not a dict")
    missing = {"step_index", "skipped_steps", "looksam_gv2", "generator"} - entry.keys()
    if missing:
        raise ValueError(f"{where} lacks {sorted(missing)}")
    index = entry["step_index"]
    if isinstance(index, Tensor) and index.numel() == 1 and not index.is_floating_point():
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"{where}: step_index must be a non-negative integer, got {index!r}")
    values = {"step_index": index, "generator": entry["generator"], "policy": entry.get("policy")}
    for key in ("skipped_steps", "looksam_gv2"):
        value = entry[key]
        if isinstance(value, Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {key} must be a number, got {value!r}")
        values[key] = float(value)
    return values


def _same_extra(a: Any, b: Any) -> bool:
    if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            if not (isinstance(x, Tensor) and isinstance(y, Tensor) and torch.equal(x.cpu(), y.cpu())):
                return False
        elif x != y:
            return False
    return True


def _checked_groups(opt: Optimizer, saved_groups: list[dict]) -> list[dict]:
    groups = opt.param_groups
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        raise ValueError(
            "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
        )
    keys = opt.engine.keys
    for index, group in enumerate(saved_groups):
        check_saved_group(opt.base_optimizer, set(keys.values()), group, index)
        for key in keys.values():  # a plain torch.optim checkpoint: SAM's keys take our defaults,
            # but perturb the group's own (SAM-ON's groups stay SAM-ON's)
            group.setdefault(key, groups[index][key] if key == keys["perturb"] else opt.defaults[key])
        options.check_group(group, keys, index, opt.engine.device)
    return saved_groups


def _names(opt: Optimizer, group: dict) -> tuple[tuple[str, ...], bool]:
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


def initialize_state(opt: Optimizer) -> bool:
    """``step()`` without a closure or a ``first_step()``: torch.distributed.checkpoint's case.

    ``get_optimizer_state_dict``/``set_optimizer_state_dict`` (and ``get_state_dict``...)
    create an optimizer's lazily made state before they save or load it: when the optimizer
    has no state and no gradient, they set every gradient to zeros, the learning rates to 0,
    and call ``step()``. With zero gradients and no state, every variant's perturbation of
    the gradient is zero, so both of SAM's passes would see the same zero gradient and the
    step needs no closure: it runs here as a whole SAM step, which creates the state entries
    (base optimizer and variant) that DCP then saves, or loads into. sam_fused's own step
    count, RSAM's generator and AESAM's statistics are put back, so a periodic schedule, the
    noise sequence or AESAM's decisions do not shift. Returns False, having changed nothing,
    for any other closure-less ``step()`` (no gradient, a gradient that is not zero, existing
    state, a learning rate that is not 0): the caller's error stands.

    The decision reads every gradient (one host sync) and is all-reduced over FSDP2's shard
    group, so that all ranks take the same branch of the collectives that follow.
    """
    engine = opt.engine
    grads = [g for b in engine.buckets for g in map(b.grad, range(len(b.params))) if g is not None]
    # DCP sets zero gradients (step() before any backward has none) and every lr to 0 (a
    # training loop's step() after zero_grad() has its learning rate)
    lrs = [group["lr"] for group in opt.param_groups if "lr" in group]
    refused = not grads or len(opt.state) > 0 or any(float(lr) != 0 for lr in lrs)
    refusals = torch.tensor(float(refused), dtype=torch.float64, device=engine.device)
    for grad in grads:
        refusals += torch.count_nonzero(grad)  # NaN counts too
    if engine.process_group is not None:
        torch.distributed.all_reduce(refusals, group=engine.process_group)
    if float(refusals) > 0:
        return False
    step = engine.step
    index, generator = step.step_index, step.generator
    before = None if generator is None else generator.get_state()
    policy = engine.policy.checked_state(engine.policy.state_dict())  # AESAM's statistics stay too
    with torch.no_grad():
        if engine.variant.perturbs_before_pass:
            opt.noise_step()
        if opt.first_step():
            opt.second_step()
    step.step_index = index
    engine.policy.load_state(policy)
    step.generator = generator
    if generator is not None:
        generator.set_state(before)
    return True
