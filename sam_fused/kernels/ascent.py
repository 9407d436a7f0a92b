"""The ascent half of a SAM step: global-norm statistics, perturbation, centralization.

Every kernel runs one program per chunk of the run's chunk table (``common.py``).
``ascent_stats_kernel`` writes one partial sum per program: the sum of ``u^2``, accumulated
in float64 (a float32 square overflows once ``|g|`` passes about 1.8e19, and a gradient that
large is finite), and the number of non-finite gradient entries. The host sums the partials
with one deterministic reduction: no float atomics, so the same gradients give bitwise the
same norm on every run.

``perturb_kernel`` reads the global sum of squares from the status tensor (no host sync)
and writes the backup, ``w + eps`` and the variant's new running state in one pass. The
variant's direction is ``variants.direction`` (one constexpr branch per rule); ``first``
(the variant's running state was never updated) comes from the tensor's ``vsteps`` count.
"""

import triton
import triton.language as tl

from .common import (
    ASCENT_GRAD,
    INV_SCALE1,
    SUMSQ,
    address,
    block_of,
    copy_block,
    skip_step,
    status_f32,
    status_f64,
)
from .variants import direction


@triton.jit
def ascent_stats_kernel(
    grad,
    param,
    aux,
    vsteps,
    status,
    sumsq_out,
    bad_out,
    eta,
    c1,
    c2,
    table,
    like,
    RULE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    UNSCALE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Partials of the first pass: sum of u^2 (u = T v) and the non-finite count of g. With
    ``aux`` and ``param`` None and RULE GRAD it sums the squares of ``grad`` alone (LookSAM's
    ``||g_v||^2`` over a state)."""
    pid = tl.program_id(0).to(tl.int64)
    slot, index, offs, mask = block_of(table, BLOCK)
    grad = address(grad, slot, like, TABLE)
    param = address(param, slot, like, TABLE)
    aux = address(aux, slot, like, TABLE)
    g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    bad = tl.where(tl.abs(g) < float("inf"), 0.0, 1.0)  # NaN compares false too
    if UNSCALE:  # GradScaler: the gradients hold scale * g
        g = g * status_f32(status, INV_SCALE1)
    u = g
    if RULE != ASCENT_GRAD:
        first = tl.load(vsteps + index) == 0
        u, _ = direction(g, tl.load(aux + offs, mask=mask, other=0.0).to(tl.float32), first, c1, c2, RULE)
    if ADAPTIVE:
        u = (tl.abs(tl.load(param + offs, mask=mask, other=0.0).to(tl.float32)) + eta) * u
    u64 = u.to(tl.float64)
    tl.store(sumsq_out + pid, tl.sum(u64 * u64, axis=0))
    tl.store(bad_out + pid, tl.sum(bad, axis=0))


@triton.jit
def perturb_kernel(
    param,
    src,
    grad,
    backup,
    aux,
    keep,
    prev,
    vsteps,
    status,
    rho_arg,
    eta,
    norm_eps,
    c1,
    c2,
    table,
    like,
    RULE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    NORMALIZED: tl.constexpr,
    CHECK: tl.constexpr,
    UNSCALE: tl.constexpr,
    RHO_ON_DEVICE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``backup <- w`` (None: RSAM's backup is the noise's), ``w <- src + eps``; ``keep <- g``
    (GSAM, LookSAM); the variant's running state ``aux`` updated with its old value in ``prev``
    (None: no running state), unless the step is skipped."""
    # rho is a float argument, or a pointer to a device scalar that schedules update in place
    # (CUDA graphs replay the launch with its arguments frozen)
    if RHO_ON_DEVICE:
        rho = tl.load(rho_arg).to(tl.float32)
    else:
        rho = rho_arg
    slot, index, offs, mask = block_of(table, BLOCK)
    param = address(param, slot, like, TABLE)
    src = address(src, slot, like, TABLE)
    grad = address(grad, slot, like, TABLE)
    backup = address(backup, slot, like, TABLE)
    aux = address(aux, slot, like, TABLE)
    keep = address(keep, slot, like, TABLE)
    prev = address(prev, slot, like, TABLE)
    w_raw = tl.load(src + offs, mask=mask)  # w, or RSAM's backup (w before the noise)
    w = w_raw.to(tl.float32)
    g_raw = tl.load(grad + offs, mask=mask, other=0.0)
    g = g_raw.to(tl.float32)
    if UNSCALE:
        g = g * status_f32(status, INV_SCALE1)
    v = g
    if RULE != ASCENT_GRAD:
        aux_raw = tl.load(aux + offs, mask=mask, other=0.0)
        first = tl.load(vsteps + index) == 0
        v, new_state = direction(g, aux_raw.to(tl.float32), first, c1, c2, RULE)
    scale = rho
    if NORMALIZED:  # the norm in float64 (the sum of squares may exceed float32), then one scale
        scale = (rho / (tl.sqrt(status_f64(status, SUMSQ)) + norm_eps)).to(tl.float32)
    if ADAPTIVE:
        t = tl.abs(w) + eta
        eps = scale * t * (t * v)
    else:
        eps = scale * v
    new_w = (w + eps).to(w_raw.dtype)
    if CHECK:
        skip = skip_step(status)
        new_w = tl.where(skip, w_raw, new_w)
    if backup is not None:
        tl.store(backup + offs, w_raw, mask=mask)
    if keep is not None:  # GSAM and LookSAM need g again in the second step (unscaled)
        tl.store(keep + offs, g.to(g_raw.dtype), mask=mask)
    if prev is not None:  # the variant's running state (VaSSO's d, F-SAM's m)
        state_out = new_state.to(aux_raw.dtype)
        if CHECK:
            state_out = tl.where(skip, aux_raw, state_out)
        # the old value too: a non-finite second pass or an abandoned step undoes this
        # update (revert_state_kernel), and neither is known yet
        tl.store(prev + offs, aux_raw, mask=mask)
        tl.store(aux + offs, state_out, mask=mask)
    tl.store(param + offs, new_w, mask=mask)


@triton.jit
def revert_state_kernel(
    state, prev, status, table, like, FORCE: tl.constexpr, TABLE: tl.constexpr, BLOCK: tl.constexpr
):
    """``state <- prev`` when the step is skipped (always with FORCE: an abandoned step);
    reads nothing else when it is not."""
    if FORCE or skip_step(status):
        copy_block(state, prev, table, like, TABLE, BLOCK)


@triton.jit
def centralize_kernel(like, row_start, row_len, BLOCK: tl.constexpr):
    """GCSAM: one program per row, g <- g - mean(g) over the row (float32 math); a row starts
    at the address of its first element."""
    row = tl.program_id(0)
    grad = tl.load(row_start + row).to(like.dtype)
    length = tl.load(row_len + row)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, length, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(grad + idx, mask=idx < length, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / length
    for off in range(0, length, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < length
        g = tl.load(grad + idx, mask=mask)
        tl.store(grad + idx, (g.to(tl.float32) - mean).to(g.dtype), mask=mask)
