"""MSAM's kernels (``sam_fused/msam_rules.py`` is their specification).

Each runs one program per chunk of a run's chunk table (``common.py``). ``msam_stats_kernel``
writes one partial sum per program: the squares of the new first moment ``v'`` in float64,
and the count of non-finite gradient entries; the host sums them with one deterministic
reduction. ``msam_apply_kernel`` is the whole rest of the step in one pass over memory: it
reads ``w`` from the stored copy (the parameter itself while the count is 0), updates the
moments and ``w``, stores them, and writes ``w~ = w' - c v'`` into the parameter; when the
status says the step is skipped its stores are masked off, so nothing moves.
``msam_restore_kernel`` and ``msam_perturb_kernel`` move the parameters between ``w`` and
``w~`` (``unperturbed()``); the latter shares :func:`perturbed` with the apply kernel, so
it writes the same bits.
"""

import triton
import triton.language as tl

from .common import address, block_of

BAD = tl.constexpr(1)  # msam_backends.BAD


@triton.jit
def first_moment(g, p, s0, momentum, weight_decay, one_minus_beta1, ADAM: tl.constexpr):
    """SGD: ``mu v + g + wd p``; AdamW: ``b1 m + (1 - b1) g`` (``momentum`` holds b1)."""
    if ADAM:
        return momentum * s0 + one_minus_beta1 * g
    return momentum * s0 + (g + weight_decay * p)


@triton.jit
def perturbed(w, v, scale_ptr, group):
    """``w - c v`` with ``c`` the group's float64 scale, in float32."""
    return w - tl.load(scale_ptr + group).to(tl.float32) * v


@triton.jit
def masked_if(mask, condition, offs):
    """``mask`` where the scalar ``condition`` holds, all False otherwise (a block-shaped
    mask: the interpreter does not combine a block with a scalar boolean)."""
    return mask & ((offs * 0 + tl.where(condition, 1, 0)) > 0)


@triton.jit
def msam_stats_kernel(
    grad,
    param,
    s0,
    sumsq_out,
    bad_out,
    momentum,
    weight_decay,
    one_minus_beta1,
    table,
    like,
    ADAM: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    slot, _, offs, mask = block_of(table, BLOCK)
    grad = address(grad, slot, like, TABLE)
    param = address(param, slot, like, TABLE)
    s0 = address(s0, slot, like, TABLE)
    g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(param + offs, mask=mask, other=0.0).to(tl.float32)
    v = first_moment(
        g,
        p,
        tl.load(s0 + offs, mask=mask, other=0.0).to(tl.float32),
        momentum,
        weight_decay,
        one_minus_beta1,
        ADAM,
    )
    v64 = v.to(tl.float64)
    tl.store(sumsq_out + pid, tl.sum(v64 * v64, axis=0))
    tl.store(bad_out + pid, tl.sum(tl.where(tl.abs(g) < float("inf"), 0.0, 1.0), axis=0))


@triton.jit
def msam_apply_kernel(
    param,
    grad,
    weight,
    s0,
    s1,
    steps,
    status,
    scale,
    device_scalars,
    group,
    lr,
    momentum,
    weight_decay,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    decay,
    table,
    like,
    ADAM: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``device_scalars``: float64 ``(beta1, beta2, lr)`` for AdamW's bias corrections;
    ``decay``: ``1 - lr wd`` (AdamW); ``momentum`` holds ``beta1`` for AdamW."""
    slot, index, offs, mask = block_of(table, BLOCK)
    param = address(param, slot, like, TABLE)
    grad = address(grad, slot, like, TABLE)
    weight = address(weight, slot, like, TABLE)
    s0 = address(s0, slot, like, TABLE)
    s1 = address(s1, slot, like, TABLE)
    keep = masked_if(mask, tl.load(status + BAD) == 0, offs)  # a skipped step stores nothing
    count = tl.load(steps + index)
    p = tl.load(param + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.where(count > 0, w, p)  # no stored w yet: the parameter is w
    v = first_moment(
        g,
        p,
        tl.load(s0 + offs, mask=mask, other=0.0).to(tl.float32),
        momentum,
        weight_decay,
        one_minus_beta1,
        ADAM,
    )
    if ADAM:
        s = beta2 * tl.load(s1 + offs, mask=mask, other=0.0).to(tl.float32) + one_minus_beta2 * (g * g)
        t = count.to(tl.float64) + 1.0
        bias_correction1 = 1.0 - tl.exp(t * tl.log(tl.load(device_scalars)))
        bias_correction2 = 1.0 - tl.exp(t * tl.log(tl.load(device_scalars + 1)))
        step_size = (tl.load(device_scalars + 2) / bias_correction1).to(tl.float32)
        denom = tl.sqrt(s) / tl.sqrt(bias_correction2).to(tl.float32) + eps
        w = (w - step_size * (v / denom)) * decay
        tl.store(s1 + offs, s.to(s1.dtype.element_ty), mask=keep)
    else:
        w = w - lr * v
    w = w.to(weight.dtype.element_ty)
    v = v.to(s0.dtype.element_ty)
    tl.store(weight + offs, w, mask=keep)
    tl.store(s0 + offs, v, mask=keep)
    p_new = perturbed(w.to(tl.float32), v.to(tl.float32), scale, group)
    tl.store(param + offs, p_new.to(param.dtype.element_ty), mask=keep)


@triton.jit
def msam_restore_kernel(param, weight, steps, table, like, TABLE: tl.constexpr, BLOCK: tl.constexpr):
    """``p <- w`` where a ``w`` is stored (the count is positive)."""
    slot, index, offs, mask = block_of(table, BLOCK)
    param = address(param, slot, like, TABLE)
    weight = address(weight, slot, like, TABLE)
    held = masked_if(mask, tl.load(steps + index) > 0, offs)
    tl.store(param + offs, tl.load(weight + offs, mask=held), mask=held)


@triton.jit
def msam_perturb_kernel(
    param, weight, s0, steps, scale, group, table, like, TABLE: tl.constexpr, BLOCK: tl.constexpr
):
    """``p <- w - c v`` where a ``w`` is stored, as ``msam_apply_kernel`` writes it."""
    slot, index, offs, mask = block_of(table, BLOCK)
    param = address(param, slot, like, TABLE)
    weight = address(weight, slot, like, TABLE)
    s0 = address(s0, slot, like, TABLE)
    held = masked_if(mask, tl.load(steps + index) > 0, offs)
    w = tl.load(weight + offs, mask=held, other=0.0).to(tl.float32)
    v = tl.load(s0 + offs, mask=held, other=0.0).to(tl.float32)
    tl.store(param + offs, perturbed(w, v, scale, group).to(param.dtype.element_ty), mask=held)
