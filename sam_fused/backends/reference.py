"""The reference backend: SAM in plain PyTorch, one parameter at a time.

This file is the specification. Every fused kernel is tested against it, and it is the
path CPU tensors take. It reads top to bottom as the math of ``docs/variants.md``:

1. ``ascent_stats``: the sum of squares of ``u = T * v`` over every parameter with a
   gradient (accumulated in float32, float64 for float64 parameters), and a count of
   non-finite gradient entries.
2. ``perturb``: back ``w`` up, then ``w <- w + eps`` with
   ``eps = rho * T * u / (||u|| + norm_eps)``.
3. ``count_nonfinite``: the same count for the second-pass gradient.
4. ``update``: ``w <- backup`` (an exact copy), then the base update (SGD or Adam/AdamW).

Non-finite gradients: when either pass saw a NaN or an infinity and the optimizer was
built with ``skip_nonfinite=True`` (the default), the step is skipped *on the device*: the
perturbation is zero, the weights are restored bit for bit and no optimizer state moves.
The kernels do the same with ``tl.where``; here ``torch.where`` keeps the logic visible and
free of host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base_updates import AdamSpec, SGDSpec
from ..layout import Bucket, Plan
from ..variants import Variant

__all__ = ["ReferenceBackend", "math_dtype"]


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters keep float64 math; everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ascent_scale(weight: Tensor, adaptive: bool, eta: float) -> Tensor | float:
    """ASAM's ``T = |w| + eta`` (elementwise), or 1 for a non-adaptive group."""
    if adaptive:
        return weight.abs() + eta
    return 1.0


def perturbation(
    grad: Tensor,
    weight: Tensor,
    variant: Variant,
    rho: float,
    adaptive: bool,
    eta: float,
    global_norm: Tensor,
    norm_eps: float,
) -> Tensor:
    """``eps`` for one parameter, in its math dtype, given the global norm of ``u``."""
    t = ascent_scale(weight, adaptive, eta)
    u = t * variant.direction(grad)
    if variant.normalized:
        return rho * t * u / (global_norm + norm_eps)
    return rho * t * u


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

    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        return 1

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, variant: Variant, group: dict, partials: Tensor
    ) -> None:
        """Write ``[sum of u^2, non-finite count]`` of this bucket into ``partials[:, 0]``."""
        acc = partials.dtype
        sumsq = torch.zeros((), dtype=acc, device=bucket.device)
        bad = torch.zeros((), dtype=acc, device=bucket.device)
        for i in plan.indices:
            p = bucket.params[i]
            g = p.grad.to(acc)
            u = ascent_scale(p.detach().to(acc), group["adaptive"], group["eta"]) * variant.direction(g)
            sumsq += u.square().sum()
            bad += (~torch.isfinite(g)).sum()
        partials[0, 0] = sumsq
        partials[1, 0] = bad

    def perturb(
        self,
        bucket: Bucket,
        plan: Plan,
        variant: Variant,
        group: dict,
        status: Tensor,
        norm_eps: float,
        check: bool,
    ) -> None:
        """Back every taking-part parameter up and move it to ``w + eps``."""
        compute = math_dtype(bucket.dtype)
        norm = status[0].to(compute).sqrt()
        skip = status[1] > 0 if check else None
        for i in plan.indices:
            p = bucket.params[i]
            w = p.detach()
            bucket.backups[i] = w.clone()
            eps = perturbation(
                p.grad.to(compute),
                w.to(compute),
                variant,
                group["rho"],
                group["adaptive"],
                group["eta"],
                norm,
                norm_eps,
            )
            perturbed = (w.to(compute) + eps).to(w.dtype)
            w.copy_(perturbed if skip is None else torch.where(skip, w, perturbed))

    def count_nonfinite(self, bucket: Bucket, plan: Plan, out: Tensor) -> None:
        bad = torch.zeros((), dtype=out.dtype, device=bucket.device)
        for i in plan.indices:
            bad += (~torch.isfinite(bucket.params[i].grad)).sum()
        out[0] = bad

    def restore(self, bucket: Bucket, plan: Plan) -> None:
        """``w <- backup``: an exact copy, not ``w - eps``."""
        for i in plan.indices:
            backup = bucket.backups[i]
            if backup is not None:
                bucket.params[i].detach().copy_(backup)
                bucket.backups[i] = None

    def update(
        self,
        bucket: Bucket,
        perturbed: Plan,
        plan: Plan,
        spec: SGDSpec | AdamSpec,
        state: dict,
        status: Tensor,
        check: bool,
    ) -> None:
        """Restore the perturbed parameters, then apply the base update to ``plan``'s."""
        self.restore(bucket, perturbed)
        skip = status[1] + status[2] > 0 if check else torch.zeros((), dtype=torch.bool)
        skip = skip.to(bucket.device)
        compute = math_dtype(bucket.dtype)
        for i in plan.indices:
            p = bucket.params[i]
            w_old = p.detach()
            w, g = w_old.to(compute), p.grad.to(compute)
            st = state[p]
            step = bucket.steps[i]
            if isinstance(spec, SGDSpec):
                buf_old = st.get("momentum_buffer")
                if spec.momentum != 0 and buf_old is None:
                    buf_old = torch.zeros_like(w_old)
                buf = None if buf_old is None else buf_old.to(compute)
                w_new, buf = sgd_update(w, g, buf, step == 0, spec)
                if buf is not None:
                    st["momentum_buffer"] = torch.where(skip, buf_old, buf.to(w_old.dtype))
            else:
                zeros = torch.zeros_like(w_old)
                m_old = st.get("exp_avg", zeros)
                v_old = st.get("exp_avg_sq", zeros)
                vmax_old = st.get("max_exp_avg_sq", zeros) if spec.amsgrad else None
                w_new, m, v, v_max = adam_update(
                    w,
                    g,
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

    def advance_steps(
        self, bucket: Bucket, plan: Plan, status: Tensor, check: bool, count_skip: bool
    ) -> None:
        """Count one update for every taking-part parameter, unless the step was skipped."""
        skip = (status[1] + status[2] > 0) if check else torch.zeros((), dtype=torch.bool)
        skip = skip.to(bucket.device)
        bucket.steps.add_(bucket.mask_of(plan) * (~skip))
        if count_skip:
            status[3] += skip
