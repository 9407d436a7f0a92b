"""The reference backend: SAM in plain PyTorch, one parameter at a time.

This file is the specification. Every fused kernel is tested against it, and it is the
path of parameters no fused backend takes (float64, DTensor shards, storage sam_fused must
not move). It reads top to bottom as the math of ``docs/variants.md``:

1. ``centralize`` (GCSAM): subtract each row's mean from the gradient.
2. ``ascent_stats``: the sum of squares of ``u = T * v`` over every parameter with a
   gradient (``u`` in the math dtype, float32 or float64, its squares summed in float64: a
   finite float32 gradient's square can overflow float32), and a count of non-finite
   gradient entries.
3. ``perturb``: back ``w`` up, then ``w <- w + eps`` with
   ``eps = c * T * u``, ``c = rho / (||u|| + norm_eps)``; update the variant's running state.
4. ``descent_stats``: non-finite entries of the second-pass gradient ``g_p``, and the
   inner products GSAM and LookSAM need (``||g_p||^2`` also for clipping);
   ``revert_state`` undoes step 3's state update when the second pass was non-finite.
5. ``update``: ``w <- backup`` (an exact copy, not ``w - eps``), then the base update
   (``base_updates.py``) with the variant's descent gradient, times the clipping
   coefficient when ``max_grad_norm`` is set.

Mixed precision: with a GradScaler the gradients hold ``scale * g``. Every operation that
reads a gradient first multiplies it by ``1 / scale`` (``StepContext.unscaled``), so the
math below is always on true gradients and the gradient buffers are never rewritten; the
non-finite counts look at the raw (scaled) values, where an overflow shows.

Non-finite gradients: when either pass saw a NaN or an infinity and the optimizer was
built with ``skip_nonfinite=True`` (the default), the step is skipped *on the device*: the
perturbation is zero, the weights are restored bit for bit and no optimizer state moves.
The kernels do the same with ``tl.where``; here ``torch.where`` keeps the logic visible and
free of host synchronisation.

Sums of squares are taken in rows of :data:`ROW` elements, then over the rows: the result
does not depend on the number of torch threads (a plain ``sum`` splits its work, and so its
rounding, by thread count).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import status as S
from ..base_updates import BaseSpec
from ..context import StepContext
from ..layout import Bucket, Plan
from ..variants import Ascent, Descent, Variant, descent_gradient
from .protocol import Capabilities

__all__ = [
    "ReferenceBackend",
    "ascent_coefficient",
    "ascent_scale",
    "centralize_each",
    "math_dtype",
    "perturbation",
    "sum_of_squares",
]

ROW = 4096


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters keep float64 math; everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sum_of_squares(u: Tensor) -> Tensor:
    """``sum(u^2)`` in an order fixed by ``u.numel()`` alone (any thread count)."""
    flat = u.reshape(-1)
    rows = flat.numel() // ROW
    head = flat[: rows * ROW].view(rows, ROW).square().sum(dim=1).sum()
    return head + flat[rows * ROW :].square().sum()


def ascent_scale(weight: Tensor, adaptive: bool, eta: float) -> Tensor | float:
    """ASAM's ``T = |w| + eta`` (elementwise), or 1 for a non-adaptive group."""
    return weight.abs() + eta if adaptive else 1.0


def ascent_coefficient(rho: Any, norm: Any, variant: Variant, eps: float) -> Any:
    """``c = rho / (||u|| + norm_eps)``, or ``rho`` for unnormalized variants: ``eps = c T u``."""
    return rho / (norm + eps) if variant.normalized else rho


def perturbation(u: Tensor, t: Tensor | float, coefficient: Any) -> Tensor:
    """``eps = c T u`` (:func:`ascent_coefficient`)."""
    return coefficient * t * u


def centralized(g: Tensor) -> Tensor:
    """Gradient centralization: subtract the mean over every dimension but the first."""
    if g.dim() <= 1:
        return g
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)


def centralize_each(bucket: Bucket, indices) -> None:
    """Centralize the gradients of parameters ``indices`` in place, one by one."""
    for i in indices:
        g = bucket.grad(i)
        g.copy_(centralized(g.to(math_dtype(bucket.dtype))))


class ReferenceBackend:
    """Per-parameter PyTorch implementation of every operation a backend provides."""

    name = "reference"
    unscales_in_place = False  # GradScaler's factor is applied where gradients are read
    capabilities = Capabilities(
        device_types=None,
        dtypes=None,
        strided=True,
        ascents=frozenset(Ascent),
        descents=frozenset(Descent),
        updates=None,
    )

    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        return 1

    # ------------------------------------------------------------------ ascent
    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        """GCSAM: centralize every taking-part gradient in place."""
        centralize_each(bucket, plan.indices)

    def noise(self, bucket: Bucket, ctx: StepContext, std: float, generator: torch.Generator) -> None:
        """RSAM: back every parameter up and move it to ``w + delta``, delta ~ N(0, std^2).

        One draw of ``sum(numel)`` values for the whole bucket, split in parameter order,
        so that every backend sees the same delta from the same generator state.
        """
        draw = torch.randn(sum(bucket.numels), generator=generator, device=bucket.device, dtype=torch.float32)
        offset = 0
        for i in range(len(bucket.params)):
            w = bucket.weight(i)
            bucket.store_state("backup", i, w)
            delta = draw[offset : offset + w.numel()].view(w.shape).mul(std).to(w.dtype)
            offset += w.numel()
            bucket.store_state("rsam_delta", i, delta)
            compute = math_dtype(w.dtype)
            w.copy_((w.to(compute) + delta.to(compute)).to(w.dtype))

    def _aux(self, bucket: Bucket, i: int, ctx: StepContext, compute: torch.dtype) -> Tensor | None:
        if ctx.variant.ascent == Ascent.RSAM:
            return bucket.state_tensor("rsam_delta", i).to(compute)
        if ctx.variant.ascent_updates_state:
            return bucket.state_tensor(ctx.variant.running_state, i).to(compute)
        return None

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext, partials: Tensor
    ) -> None:
        """Write ``[sum of u^2, non-finite count]`` of this bucket into ``partials[:2, 0]``."""
        acc, compute = partials.dtype, math_dtype(bucket.dtype)
        sumsq = torch.zeros((), dtype=acc, device=bucket.device)
        bad = torch.zeros((), dtype=acc, device=bucket.device)
        for i in plan.indices:
            g_raw = bucket.grad(i).to(compute)
            g = ctx.unscaled(g_raw, S.INV_SCALE1)
            first = bucket.vsteps[i] == 0
            v, _ = ctx.variant.direction(ctx.options, g, self._aux(bucket, i, ctx, compute), first)
            u = ascent_scale(bucket.weight(i).to(compute), group["adaptive"], group["eta"]) * v
            sumsq += sum_of_squares(u.to(acc))
            bad += (~torch.isfinite(g_raw)).sum()
        partials[0, 0] = sumsq
        partials[1, 0] = bad

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        """Back every taking-part parameter up and move it to ``w + eps``."""
        variant = ctx.variant
        compute = math_dtype(bucket.dtype)
        norm = ctx.status[S.SUMSQ].sqrt().to(compute)  # the root in float64: the sum may exceed float32
        skip = ctx.skip(bucket.device)
        if variant.keeps_first_grad:  # a parameter without a first gradient has g = 0 (GSAM, LookSAM)
            for i in set(range(len(bucket.params))) - set(plan.indices):
                bucket.clear_state("first_grad", i)
        for i in plan.indices:
            w = bucket.weight(i)
            src = bucket.state_tensor("backup", i)
            # RSAM's backup was taken before the noise: perturb from there
            if not variant.perturbs_before_pass:
                src.copy_(w)
            g = ctx.unscaled(bucket.grad(i).to(compute), S.INV_SCALE1)
            if variant.keeps_first_grad:  # a copy: the next pass rewrites the gradient
                bucket.store_state("first_grad", i, g)
            aux = self._aux(bucket, i, ctx, compute)
            v, new_state = variant.direction(ctx.options, g, aux, bucket.vsteps[i] == 0)
            t = ascent_scale(src.to(compute), group["adaptive"], group["eta"])
            eps = perturbation(t * v, t, ascent_coefficient(group["rho"], norm, variant, ctx.norm_eps))
            w.copy_(torch.where(skip, src, (src.to(compute) + eps).to(w.dtype)))
            if new_state is not None:
                old = bucket.state_tensor(variant.running_state, i)
                bucket.store_state("state_prev", i, old)  # for revert_state
                bucket.store_state(variant.running_state, i, torch.where(skip, old, new_state.to(old.dtype)))
        if variant.perturbs_before_pass:  # parameters that took no part go back to w (their noise is undone)
            for i in set(range(len(bucket.params))) - set(plan.indices):
                self._restore_one(bucket, i)

    # ------------------------------------------------------------------ descent
    def revert_state(self, bucket: Bucket, plan: Plan, ctx: StepContext, force: bool = False) -> None:
        """VaSSO / F-SAM: undo this step's update of the running state when the step is
        skipped (``force``: always, when the step is abandoned).

        ``perturb`` updates the state as soon as the first pass is known good; a non-finite
        second pass, found later, must still leave it as it was.
        """
        skip = torch.ones((), dtype=torch.bool, device=bucket.device) if force else ctx.skip(bucket.device)
        name = ctx.variant.running_state
        for i in plan.indices:
            prev = bucket.state_tensor("state_prev", i)
            bucket.store_state(name, i, torch.where(skip, prev, bucket.state_tensor(name, i)))

    def descent_stats(self, bucket: Bucket, plan: Plan, ctx: StepContext, partials: Tensor) -> None:
        """``[non-finite count of g_p, <g, g_p>, ||g_p||^2, ||g||^2]`` into ``partials[:, 0]``."""
        acc, compute = partials.dtype, math_dtype(bucket.dtype)
        sums = torch.zeros(4, dtype=acc, device=bucket.device)
        inner = ctx.variant.keeps_first_grad
        for i in plan.indices:
            gp_raw = bucket.grad(i).to(compute)
            sums[0] += (~torch.isfinite(gp_raw)).sum()
            gp = ctx.unscaled(gp_raw, S.INV_SCALE2).to(acc)
            if inner or ctx.clip:
                sums[2] += sum_of_squares(gp)
            if inner:
                g = bucket.state_tensor("first_grad", i).to(acc)
                sums[1] += (g * gp).sum()
                sums[3] += sum_of_squares(g)
        partials[:, 0] = sums

    def restore(self, bucket: Bucket, plan: Plan | None) -> None:
        """``w <- backup``: an exact copy, not ``w - eps`` (every parameter when ``plan`` is None)."""
        for i in range(len(bucket.params)) if plan is None else plan.indices:
            self._restore_one(bucket, i)

    def _restore_one(self, bucket: Bucket, i: int) -> None:
        bucket.weight(i).copy_(bucket.state_tensor("backup", i))

    def update(
        self,
        bucket: Bucket,
        perturbed: Plan | None,
        plan: Plan,
        spec: BaseSpec,
        ctx: StepContext,
        descent: Descent,
    ) -> None:
        """Restore the perturbed parameters, then apply the base update to ``plan``'s."""
        if perturbed is not None:
            self.restore(bucket, perturbed)
        skip = ctx.skip(bucket.device)
        compute = math_dtype(bucket.dtype)
        names = spec.state_names()
        for i in plan.indices:
            w_old = bucket.weight(i)
            w, gp = w_old.to(compute), ctx.unscaled(bucket.grad(i).to(compute), S.INV_SCALE2)
            first_grad = None
            if ctx.variant.keeps_first_grad:
                first_grad = bucket.state_tensor("first_grad", i).to(compute)
            aux = None
            if descent == Descent.GSAM:
                aux = first_grad
            elif descent == Descent.LOOKSAM_REUSE:
                aux = bucket.state_tensor("looksam_gv", i).to(compute)
            elif descent == Descent.LOOKSAM_FULL:  # store g_v = g_p - (<g_p, g> / ||g||^2) g
                g2 = ctx.status[S.G2]
                gv = gp - torch.where(g2 > 0, ctx.status[S.DOT] / g2, 0).to(compute) * first_grad
                old = bucket.state_tensor("looksam_gv", i)
                bucket.store_state("looksam_gv", i, torch.where(skip, old, gv.to(old.dtype)))
            d = descent_gradient(descent, ctx.options, gp, aux, ctx.status)
            if ctx.clip:  # max_grad_norm: the coefficient of the whole descent gradient
                d = d * ctx.status[S.CLIP].to(compute)
            olds = {name: bucket.state_tensor(name, i) for name in names}
            w_new, new = spec.reference_update(
                w, d, {name: old.to(compute) for name, old in olds.items()}, bucket.steps[i]
            )
            for name, old in olds.items():
                bucket.store_state(name, i, torch.where(skip, old, new[name].to(old.dtype)))
            w_old.copy_(torch.where(skip, w_old, w_new.to(w_old.dtype)))

    def state_sumsq(self, bucket: Bucket, plan: Plan, name: str, partials: Tensor) -> None:
        """The sum of squares of a state tensor over the plan (LookSAM's ``||g_v||^2``)."""
        total = torch.zeros((), dtype=partials.dtype, device=bucket.device)
        for i in plan.indices:
            total += sum_of_squares(bucket.state_tensor(name, i).to(partials.dtype))
        partials[0, 0] = total

    def advance_steps(
        self, bucket: Bucket, plan: Plan, ctx: StepContext, count_skip: bool, base: bool, variant: bool
    ) -> None:
        """Count one update for every taking-part parameter, unless the step was skipped:
        of the base state (``base``), of the variant's running state (``variant``)."""
        skip = ctx.skip(bucket.device)
        inc = bucket.mask_of(plan) * (~skip)
        if base:
            bucket.steps.add_(inc)
        if variant:
            bucket.vsteps.add_(inc)
        if count_skip:
            ctx.status[S.SKIPPED] += skip
