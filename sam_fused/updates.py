"""The descent half of a SAM step, over every bucket: restore, then the base update.

``fused``: each bucket's backend restores the weights fused with the base update (layer 0;
layers of parameters that share memory with earlier ones are restored first, in reverse,
and update from the weights) and advances the update counts on the device, so a skipped
step changes nothing. ``generic``: a base optimizer sam_fused does not fuse runs its own
``step()`` after the restore; it cannot be skipped on the device, so one host sync decides.
"""

from __future__ import annotations

from typing import Any

import torch

from . import status as S
from .base_updates import BaseSpec
from .buckets import Buckets
from .context import StepContext
from .layout import Plan
from .variants import Descent, Variant

__all__ = ["fused", "generic"]


def fused(
    layout: Buckets,
    variant: Variant,
    perturbed: list[Plan] | None,
    plans: list[Plan],
    specs: list[BaseSpec],
    ctx: StepContext,
    descent: Descent,
) -> None:
    """Restore ``perturbed`` (None: a one-pass step) and apply each bucket's fused update."""
    if perturbed is not None:  # parameters sharing memory with earlier ones: restored first
        layout.restore(perturbed, aliases_only=True)
    counted = False
    state_on_ascent = perturbed is not None and variant.ascent_updates_state
    for i, (bucket, plan, spec) in enumerate(zip(layout.items, plans, specs)):
        # layer 0 restores fused with the update; later layers update from the weights
        done = None if perturbed is None else perturbed[i]
        bucket.backend.update(bucket, done if bucket.layer == 0 else None, plan, spec, ctx, descent)
        variant_counts = descent == Descent.LOOKSAM_FULL or (state_on_ascent and done.key == plan.key)
        if not plan.empty:
            bucket.backend.advance_steps(bucket, plan, ctx, not counted, bool(spec.names), variant_counts)
            bucket.counts_moved()
            counted = True
        if state_on_ascent and done.key != plan.key and not done.empty:  # the ascent's own participants
            bucket.backend.advance_steps(bucket, done, ctx, False, False, True)


def generic(
    layout: Buckets,
    base: torch.optim.Optimizer,
    variant: Variant,
    perturbed: list[Plan] | None,
    plans: list[Plan],
    ctx: StepContext,
) -> None:
    """Restore, then the base optimizer's own step (a host sync decides a skip)."""
    status = ctx.status
    if perturbed is not None:
        layout.restore(perturbed)
    if ctx.check:
        skip = status[S.BAD1] + status[S.BAD2] > 0
        status[S.SKIPPED] += skip
        if bool(skip):  # the base optimizer's step cannot be skipped on the device
            return
    # the base optimizer reads p.grad itself: unscale and clip in place, as
    # scaler.unscale_() and clip_grad_norm_() would
    for bucket, plan in zip(layout.items, plans):
        factor: Any = None
        if ctx.unscale and not bucket.backend.unscales_in_place:
            factor = status[S.INV_SCALE2]
        if ctx.clip:
            factor = status[S.CLIP] if factor is None else factor * status[S.CLIP]
        grads = [bucket.params[i].grad for i in plan.indices]
        if factor is not None and grads:
            torch._foreach_mul_(grads, factor)
    step = type(base).step
    # torch wraps step() with the step hooks and a profiler range: those belong to the SAM step
    (step.__wrapped__ if getattr(step, "hooked", False) else step)(base)
    for bucket, plan in zip(layout.items, plans):
        if variant.ascent_updates_state and perturbed is not None:
            bucket.vsteps.add_(bucket.mask_of(plan))
        bucket.counts_set()  # torch's step moved Adam's counts through opt.state
