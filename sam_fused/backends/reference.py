"""The reference backend: SAM in plain PyTorch, one parameter at a time.

This file is the specification. Every fused kernel is tested against it, and it is the
path CPU tensors take. It reads top to bottom as the math of ``docs/variants.md``:

1. ``centralize`` (GCSAM): subtract each row's mean from the gradient.
2. ``ascent_stats``: the sum of squares of ``u = T * v`` over every parameter with a
   gradient (accumulated in float32, float64 for float64 parameters), and a count of
   non-finite gradient entries.
3. ``perturb``: back ``w`` up, then ``w <- w + eps`` with
   ``eps = rho * T * u / (||u|| + norm_eps)``; update the variant's running state.
4. ``descent_stats``: non-finite entries of the second-pass gradient ``g_p``, and the
   inner products GSAM and LookSAM need (``||g_p||^2`` also for clipping);
   ``revert_state`` undoes step 3's state update when the second pass was non-finite.
5. ``update``: ``w <- backup`` (an exact copy, not ``w - eps``), then the base update
   (SGD or Adam/AdamW) with the variant's descent gradient, times the clipping
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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import status as S
from ..base_updates import AdamSpec, SGDSpec
from ..layout import Bucket, Plan
from ..variants import ASCENT, DESCENT, Variant

__all__ = ["ReferenceBackend", "StepContext", "math_dtype"]


@dataclass
class StepContext:
    """What every backend operation of one step needs besides the bucket."""

    variant: Variant
    options: dict[str, Any]
    norm_eps: float
    check: bool  # skip the step on non-finite gradients
    status: Tensor
    state: dict  # the optimizer's per-parameter state (persistent variant state lives here)
    unscale: bool = False  # gradients hold loss_scale * g: multiply by status[INV_SCALE1/2]
    clip: bool = False  # max_grad_norm: multiply the descent gradient by status[CLIP]

    def unscaled(self, g: Tensor, index: int) -> Tensor:
        """``g`` (already in the math dtype) divided by its pass's loss scale."""
        return g * self.status[index].to(g.dtype) if self.unscale else g

    def skip(self, device: torch.device) -> Tensor:
        """Whether this step is skipped, as a 0-d bool tensor (no host sync)."""
        if not self.check:
            return torch.zeros((), dtype=torch.bool, device=device)
        return (self.status[S.BAD1] + self.status[S.BAD2] > 0).to(device)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters keep float64 math; everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ascent_scale(weight: Tensor, adaptive: bool, eta: float) -> Tensor | float:
    """ASAM's ``T = |w| + eta`` (elementwise), or 1 for a non-adaptive group."""
    if adaptive:
        return weight.abs() + eta
    return 1.0


def ascent_direction(
    variant: Variant, options: dict[str, Any], g: Tensor, aux: Tensor | None, first: Tensor
) -> tuple[Tensor, Tensor | None]:
    """The variant's ascent direction ``v`` and its new running state (or None).

    ``aux`` is the variant's state before this step (VaSSO's ``d``, F-SAM's ``m``) or RSAM's
    noise ``delta``; ``first`` is True while the parameter has never been updated.
    """
    rule = variant.ascent
    if rule == ASCENT.GRAD:
        return g, None
    if rule == ASCENT.VASSO:  # d <- (1 - theta) d + theta g, with d = g on the first step
        theta = options["theta"]
        d = torch.where(first, g, (1 - theta) * aux + theta * g)
        return d, d
    if rule == ASCENT.FSAM:  # v = g - sigma m (previous EMA), then m <- lam m + (1 - lam) g
        lam = options["lam"]
        return g - options["sigma"] * aux, lam * aux + (1 - lam) * g
    if rule == ASCENT.RSAM:  # v = delta + lam g_hat, g_hat taken at w + delta
        return aux + options["lam"] * g, None
    raise NotImplementedError(f"ascent rule {rule}")


def perturbation(u: Tensor, t: Tensor | float, rho: float, norm: Tensor, variant: Variant, eps: float):
    """``eps = rho T u / (||u|| + norm_eps)``, or ``rho T u`` for unnormalized variants."""
    if variant.normalized:
        return rho * t * u / (norm + eps)
    return rho * t * u


def centralized(g: Tensor) -> Tensor:
    """Gradient centralization: subtract the mean over every dimension but the first."""
    if g.dim() <= 1:
        return g
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)


def descent_gradient(
    variant_rule: int, options: dict[str, Any], gp: Tensor, aux: Tensor | None, status: Tensor
) -> Tensor:
    """The gradient the base update receives.

    GSAM: ``g_p - alpha g_perp`` with ``g_perp = g - (<g, g_p> / ||g_p||^2) g_p`` (aux = g).
    LookSAM reuse steps: ``g + alpha (||g|| / ||g_v||) g_v`` (aux = g_v, gp = this pass's g).
    """
    if variant_rule in (DESCENT.PLAIN, DESCENT.LOOKSAM_FULL):
        return gp
    dt = gp.dtype
    if variant_rule == DESCENT.GSAM:
        gp2 = status[S.GP2].to(dt)
        coef = torch.where(gp2 > 0, status[S.DOT].to(dt) / gp2, 0)
        return gp - options["alpha"] * (aux - coef * gp)
    if variant_rule == DESCENT.LOOKSAM_REUSE:
        gv_norm = status[S.GV2].to(dt).sqrt()
        scale = torch.where(gv_norm > 0, status[S.SUMSQ].to(dt).sqrt() / gv_norm, 0)
        return gp + options["alpha"] * scale * aux
    raise NotImplementedError(f"descent rule {variant_rule}")


def sgd_update(
    w: Tensor, g: Tensor, buf: Tensor | None, first: Tensor, spec: SGDSpec
) -> tuple[Tensor, Tensor | None]:
    """``torch.optim.SGD``'s update of one parameter: returns the new ``w`` and buffer."""
    if spec.maximize:
        g = -g
    d = g + spec.weight_decay * w if spec.weight_decay != 0 else g
    if spec.momentum != 0:
        buf = torch.where(first, d, spec.momentum * buf + (1 - spec.dampening) * d)
        d = d + spec.momentum * buf if spec.nesterov else buf
    return w - spec.lr * d, buf


def adam_update(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    v_max: Tensor | None,
    step: Tensor,
    spec: AdamSpec,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``torch.optim.Adam``/``AdamW``'s update of one parameter at step count ``step``."""
    if spec.maximize:
        g = -g
    if spec.weight_decay != 0:
        if spec.decoupled:
            w = w * (1 - spec.lr * spec.weight_decay)
        else:
            g = g + spec.weight_decay * w
    m = torch.lerp(m, g, 1 - spec.beta1)
    v = spec.beta2 * v + (1 - spec.beta2) * g * g
    t = step.to(torch.float64)
    bias_correction1 = 1 - spec.beta1**t
    bias_correction2_sqrt = (1 - spec.beta2**t).sqrt()
    step_size = (spec.lr / bias_correction1).to(w.dtype)
    if spec.amsgrad:
        v_max = torch.maximum(v_max, v)
        denom = v_max.sqrt() / bias_correction2_sqrt.to(w.dtype) + spec.eps
    else:
        denom = v.sqrt() / bias_correction2_sqrt.to(w.dtype) + spec.eps
    return w - step_size * (m / denom), m, v, v_max


class ReferenceBackend:
    """Per-parameter PyTorch implementation of every operation a backend provides."""

    name = "reference"
    unscales_in_place = False  # GradScaler's factor is applied where gradients are read

    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        return 1

    # ------------------------------------------------------------------ ascent
    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        """GCSAM: centralize every taking-part gradient in place."""
        compute = math_dtype(bucket.dtype)
        for i in plan.indices:
            g = bucket.params[i].grad
            g.copy_(centralized(g.to(compute)))

    def noise(self, bucket: Bucket, ctx: StepContext, std: float, generator: torch.Generator) -> None:
        """RSAM: back every parameter up and move it to ``w + delta``, delta ~ N(0, std^2).

        One draw of ``sum(numel)`` values for the whole bucket, split in parameter order,
        so that every backend sees the same delta from the same generator state.
        """
        total = sum(p.numel() for p in bucket.params)
        draw = torch.randn(total, generator=generator, device=bucket.device, dtype=torch.float32) * std
        offset = 0
        for i, p in enumerate(bucket.params):
            w = p.detach()
            bucket.backups[i] = w.clone()
            delta = draw[offset : offset + w.numel()].view(w.shape).to(w.dtype)
            offset += w.numel()
            bucket.scratch("rsam_delta")[i] = delta
            compute = math_dtype(w.dtype)
            w.copy_((w.to(compute) + delta.to(compute)).to(w.dtype))

    def _aux(self, bucket: Bucket, i: int, state: dict, ctx: StepContext, compute) -> Tensor | None:
        name = ctx.variant.state[0] if ctx.variant.state else None
        p = bucket.params[i]
        if ctx.variant.ascent == ASCENT.RSAM:
            return bucket.scratch("rsam_delta")[i].to(compute)
        if ctx.variant.ascent in (ASCENT.VASSO, ASCENT.FSAM):
            held = state[p].get(name)
            return torch.zeros_like(p, dtype=compute) if held is None else held.to(compute)
        return None

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext, partials: Tensor
    ) -> None:
        """Write ``[sum of u^2, non-finite count]`` of this bucket into ``partials[:2, 0]``."""
        acc = partials.dtype
        sumsq = torch.zeros((), dtype=acc, device=bucket.device)
        bad = torch.zeros((), dtype=acc, device=bucket.device)
        state = ctx.state
        for i in plan.indices:
            p = bucket.params[i]
            g_raw = p.grad.to(acc)
            g = ctx.unscaled(g_raw, S.INV_SCALE1)
            first = bucket.steps[i] == 0
            v, _ = ascent_direction(ctx.variant, ctx.options, g, self._aux(bucket, i, state, ctx, acc), first)
            u = ascent_scale(p.detach().to(acc), group["adaptive"], group["eta"]) * v
            sumsq += u.square().sum()
            bad += (~torch.isfinite(g_raw)).sum()
        partials[0, 0] = sumsq
        partials[1, 0] = bad

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        """Back every taking-part parameter up and move it to ``w + eps``."""
        compute = math_dtype(bucket.dtype)
        norm = ctx.status[S.SUMSQ].to(compute).sqrt()
        skip = ctx.skip(bucket.device)
        state = ctx.state
        noise = ctx.variant.noise
        for i in plan.indices:
            p = bucket.params[i]
            w = p.detach()
            if noise:  # the backup was taken before the noise; perturb from there
                src = bucket.backups[i]
            else:
                src = w.clone()
                bucket.backups[i] = src
            g = ctx.unscaled(p.grad.to(compute), S.INV_SCALE1)
            if ctx.variant.keeps_first_grad:
                # a copy: without a scale, g may be p.grad itself, which the next pass rewrites
                bucket.scratch("first_grad")[i] = g.to(p.grad.dtype, copy=True)
            first = bucket.steps[i] == 0
            aux = self._aux(bucket, i, state, ctx, compute)
            v, new_state = ascent_direction(ctx.variant, ctx.options, g, aux, first)
            t = ascent_scale(src.to(compute), group["adaptive"], group["eta"])
            eps = perturbation(t * v, t, group["rho"], norm, ctx.variant, ctx.norm_eps)
            perturbed = (src.to(compute) + eps).to(w.dtype)
            w.copy_(torch.where(skip, src, perturbed))
            if new_state is not None:
                name = ctx.variant.state[0]
                old = state[p].get(name, torch.zeros_like(w))
                state[p][name] = torch.where(skip, old, new_state.to(w.dtype))
                bucket.scratch("state_prev")[i] = old  # for revert_state
        if noise:  # parameters that took no part go back to w (their noise is undone)
            for i in set(range(len(bucket.params))) - set(plan.indices):
                self._restore_one(bucket, i)

    # ------------------------------------------------------------------ descent
    def revert_state(self, bucket: Bucket, plan: Plan, ctx: StepContext) -> None:
        """VaSSO / F-SAM: undo this step's update of the running state if the step is skipped.

        ``perturb`` updates the state as soon as the first pass is known good; a non-finite
        second pass, found later, must still leave it as it was.
        """
        skip = ctx.skip(bucket.device)
        name = ctx.variant.state[0]
        prev = bucket.scratch("state_prev")
        for i in plan.indices:
            p = bucket.params[i]
            if prev[i] is not None:
                ctx.state[p][name] = torch.where(skip, prev[i], ctx.state[p][name])
                prev[i] = None

    def descent_stats(self, bucket: Bucket, plan: Plan, ctx: StepContext, partials: Tensor) -> None:
        """``[non-finite count of g_p, <g, g_p>, ||g_p||^2, ||g||^2]`` into ``partials[:, 0]``."""
        acc = partials.dtype
        sums = torch.zeros(4, dtype=acc, device=bucket.device)
        for i in plan.indices:
            gp_raw = bucket.params[i].grad.to(acc)
            sums[0] += (~torch.isfinite(gp_raw)).sum()
            gp = ctx.unscaled(gp_raw, S.INV_SCALE2)
            if ctx.variant.keeps_first_grad or ctx.clip:
                sums[2] += gp.square().sum()
            if ctx.variant.keeps_first_grad:
                g = bucket.scratch("first_grad")[i].to(acc)
                sums[1] += (g * gp).sum()
                sums[3] += g.square().sum()
        partials[:, 0] = sums

    def restore(self, bucket: Bucket, plan: Plan) -> None:
        """``w <- backup``: an exact copy, not ``w - eps``."""
        for i in plan.indices:
            self._restore_one(bucket, i)

    def _restore_one(self, bucket: Bucket, i: int) -> None:
        backup = bucket.backups[i]
        if backup is not None:
            bucket.params[i].detach().copy_(backup)
            bucket.backups[i] = None

    def update(
        self,
        bucket: Bucket,
        perturbed: Plan | None,
        plan: Plan,
        spec: SGDSpec | AdamSpec,
        ctx: StepContext,
        descent: int,
    ) -> None:
        """Restore the perturbed parameters, then apply the base update to ``plan``'s."""
        if perturbed is not None:
            self.restore(bucket, perturbed)
        skip = ctx.skip(bucket.device)
        compute = math_dtype(bucket.dtype)
        state = ctx.state
        for i in plan.indices:
            p = bucket.params[i]
            w_old = p.detach()
            w, gp = w_old.to(compute), ctx.unscaled(p.grad.to(compute), S.INV_SCALE2)
            st = state[p]
            aux = None
            if descent == DESCENT.GSAM:
                aux = bucket.scratch("first_grad")[i].to(compute)
            elif descent == DESCENT.LOOKSAM_REUSE:
                aux = st.get("looksam_gv", torch.zeros_like(w_old)).to(compute)
            elif descent == DESCENT.LOOKSAM_FULL:  # store g_v = g_p - (<g_p, g> / ||g||^2) g
                g = bucket.scratch("first_grad")[i].to(compute)
                g2 = ctx.status[S.G2].to(compute)
                gv = gp - torch.where(g2 > 0, ctx.status[S.DOT].to(compute) / g2, 0) * g
                old = st.get("looksam_gv", torch.zeros_like(w_old))
                st["looksam_gv"] = torch.where(skip, old, gv.to(w_old.dtype))
            d = descent_gradient(descent, ctx.options, gp, aux, ctx.status)
            if ctx.clip:  # max_grad_norm: the coefficient of the whole descent gradient
                d = d * ctx.status[S.CLIP].to(compute)
            step = bucket.steps[i]
            if isinstance(spec, SGDSpec):
                buf_old = st.get("momentum_buffer")
                if spec.momentum != 0 and buf_old is None:
                    buf_old = torch.zeros_like(w_old)
                buf = None if buf_old is None else buf_old.to(compute)
                w_new, buf = sgd_update(w, d, buf, step == 0, spec)
                if buf is not None:
                    st["momentum_buffer"] = torch.where(skip, buf_old, buf.to(w_old.dtype))
            else:
                zeros = torch.zeros_like(w_old)
                m_old = st.get("exp_avg", zeros)
                v_old = st.get("exp_avg_sq", zeros)
                vmax_old = st.get("max_exp_avg_sq", zeros) if spec.amsgrad else None
                w_new, m, v, v_max = adam_update(
                    w,
                    d,
                    m_old.to(compute),
                    v_old.to(compute),
                    None if vmax_old is None else vmax_old.to(compute),
                    step + 1,
                    spec,
                )
                st["exp_avg"] = torch.where(skip, m_old, m.to(w_old.dtype))
                st["exp_avg_sq"] = torch.where(skip, v_old, v.to(w_old.dtype))
                if spec.amsgrad:
                    st["max_exp_avg_sq"] = torch.where(skip, vmax_old, v_max.to(w_old.dtype))
                st["step"] = bucket.steps[i]
            w_old.copy_(torch.where(skip, w_old, w_new.to(w_old.dtype)))

    def state_sumsq(self, bucket: Bucket, plan: Plan, name: str, state: dict, partials: Tensor) -> None:
        """The sum of squares of a state tensor over the plan (LookSAM's ``||g_v||^2``)."""
        total = torch.zeros((), dtype=partials.dtype, device=bucket.device)
        for i in plan.indices:
            held = state[bucket.params[i]].get(name)
            if held is not None:
                total += held.to(partials.dtype).square().sum()
        partials[0, 0] = total

    def advance_steps(self, bucket: Bucket, plan: Plan, ctx: StepContext, count_skip: bool) -> None:
        """Count one update for every taking-part parameter, unless the step was skipped."""
        skip = ctx.skip(bucket.device)
        bucket.steps.add_(bucket.mask_of(plan) * (~skip))
        if count_skip:
            ctx.status[S.SKIPPED] += skip
