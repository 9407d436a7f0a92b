"""SAM-ON's param-group key ``perturb``: which buckets the ascent covers.

A group with ``perturb=False`` (Mueller et al., NeurIPS 2023: only the normalization layers
are perturbed; ``norm_groups.py`` builds such groups) is left out of the ascent altogether:

* its buckets get an *empty ascent plan* (:func:`ascent_plans`), so no backend reads its
  gradients for the norm, backs its weights up, perturbs them or updates a variant's
  running state for them: its ``backup`` buffer is never allocated;
* the norm ``||u||`` is therefore over the perturbed groups only, as in the official code;
* in ``second_step`` there is nothing to restore (the empty plan is the "perturbed" plan),
  and the base update runs with the second-pass gradient, fused as usual;
* RSAM draws no noise for it, and the noise's scale counts the perturbed parameters only.

The key is read once per step, when ``first_step()`` (RSAM: ``noise_step()``) validates:
an edit between the passes takes effect at the next step, so a step never restores what
it did not back up. GSAM and LookSAM correct the descent with the first-pass gradient ``g``
of *every* parameter: for them the groups left out of the ascent still keep ``g``
(:func:`keep_first_grads`: a copy, unscaled, and its non-finite entries counted), and
nothing else (``docs/variants.md``, SAM-ON).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import status as S
from .backends.reference import math_dtype
from .context import StepContext
from .layout import Bucket, Plan
from .step_state import Phase
from .tables import TableRun

if TYPE_CHECKING:
    from .engine import StepEngine

__all__ = ["ascent_plans", "flags", "keep_first_grads", "noise_scales", "restore_plans", "step_flags"]


def flags(groups: Sequence[Mapping[str, Any]], buckets: Sequence[Bucket], key: str) -> tuple:
    """Whether each bucket is perturbed this step (its group's key, already validated)."""
    return tuple(bool(groups[b.group_index][key]) for b in buckets)


def step_flags(engine: StepEngine) -> tuple:
    """:func:`flags` for this step: RSAM's first_step() keeps what its noise_step() chose."""
    if engine.step.phase is Phase.NOISED:
        return engine.step.perturbed
    return flags(engine.owner.param_groups, engine.buckets, engine.keys["perturb"])


def noise_scales(engine: StepEngine) -> tuple[tuple, list[float | None]]:
    """RSAM: the buckets perturbed this step, and each one's noise scale (None: no noise).

    ``noise_std``, or the group's ``rho / sqrt(d)`` with ``d`` the number of scalar
    parameters the noise covers: those of the perturbed groups only (``||delta|| ~ rho``)."""
    on = step_flags(engine)
    total = max(1, sum(p.numel() for b, b_on in zip(engine.buckets, on) if b_on for p in b.params))
    fixed, groups, key = engine.variant_options["noise_std"], engine.owner.param_groups, engine.keys["rho"]
    scales: list[float | None] = []
    for bucket, b_on in zip(engine.buckets, on):
        rho = groups[bucket.group_index][key]
        scales.append(None if not b_on else float(rho) / math.sqrt(total) if fixed is None else float(fixed))
    return on, scales


def _empty_plan(bucket: Bucket) -> Plan:
    """A plan in which no parameter takes part (cached per address epoch of the bucket)."""
    plan = bucket.cache.get("no_ascent")
    if plan is None or plan.epoch != bucket.epoch:
        run = TableRun(bucket.storage, (), [], [])
        plan = bucket.cache["no_ascent"] = Plan(bytes(len(bucket.params)), (), run, bucket.epoch)
    return plan


def ascent_plans(buckets: Sequence[Bucket], plans: Sequence[Plan], perturbed: Sequence[bool]) -> list[Plan]:
    """The ascent's plans: each bucket's plan, or an empty one where its group is not perturbed."""
    return [plan if on else _empty_plan(b) for b, plan, on in zip(buckets, plans, perturbed)]


def restore_plans(buckets: Sequence[Bucket], perturbed: Sequence[bool]) -> list[Plan | None]:
    """What an abandoned RSAM step restores: every parameter (None) of the noised buckets."""
    perturbed = perturbed or (True,) * len(buckets)  # (none recorded: every bucket)
    return [None if on else _empty_plan(b) for b, on in zip(buckets, perturbed)]


def keep_first_grads(
    buckets: Sequence[Bucket], plans: Sequence[Plan], perturbed: Sequence[bool], ctx: StepContext
) -> None:
    """GSAM, LookSAM: the first-pass gradient of the buckets left out of the ascent, kept as
    their ``perturb`` does for the others (unscaled, in the bucket's dtype; 0 where a
    parameter has none), and its non-finite entries added to the first pass's count."""
    for bucket, plan, on in zip(buckets, plans, perturbed):
        if on:
            continue
        raw = [bucket.grad(i).to(math_dtype(bucket.dtype)) for i in plan.indices]
        if raw:  # non-finite entries are counted on the raw (scaled) values, where overflow shows
            ctx.status[S.BAD1] += torch.stack([(~torch.isfinite(g)).sum() for g in raw]).sum()
            grads = [ctx.unscaled(g, S.INV_SCALE1) for g in raw]
            torch._foreach_copy_(bucket.storage.views("first_grad", plan.indices), grads)
        left_out = [i for i in range(len(bucket.params)) if not plan.key[i]]
        if left_out:
            torch._foreach_zero_(bucket.storage.views("first_grad", left_out))
