"""The descent half of a SAM step: restore the weights and apply the base update.

``update_kernel`` is the one update kernel of every fused base: it reads the weights from
``src`` (the backup, which makes the restore free, or the parameters themselves when no
restore is due), forms the variant's descent gradient (``variants.descent_input``), and
applies the base's element math (``bases.update``, chosen by ``BASE``) in float32, storing
the parameter and its state in their own dtypes. When ``CHECK`` is set and either pass saw a
non-finite gradient, every stored value stays bitwise as it was and only the restore takes
effect. Each tensor's update count is read from ``steps`` (its chunk row says which entry)
and advanced afterwards by ``advance_steps_kernel``, so that a skipped step leaves it alone.
"""

import triton
import triton.language as tl

from .bases import update
from .common import (
    INV_SCALE2,
    SKIPPED,
    address,
    block_of,
    copy_block,
    skip_step,
    status_f32,
)
from .variants import descent_input


@triton.jit
def descent_stats_kernel(
    grad,
    first_grad,
    bad_out,
    dot_out,
    gp2_out,
    g2_out,
    status,
    table,
    like,
    WANT_GP2: tl.constexpr,
    UNSCALE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-program partials of the second pass: the non-finite count; <g, g_p>, ||g_p||^2
    and ||g||^2 when the variant keeps the first gradient (``first_grad``, GSAM and LookSAM);
    ||g_p||^2 also for clipping (WANT_GP2). Sums in float64, as the first pass's."""
    pid = tl.program_id(0).to(tl.int64)
    slot, _, offs, mask = block_of(table, BLOCK)
    grad = address(grad, slot, like, TABLE)
    first_grad = address(first_grad, slot, like, TABLE)
    gp = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(bad_out + pid, tl.sum(tl.where(tl.abs(gp) < float("inf"), 0.0, 1.0), axis=0))
    if UNSCALE:
        gp = gp * status_f32(status, INV_SCALE2)
    gp64 = gp.to(tl.float64)
    zero = tl.zeros([BLOCK], dtype=tl.float64)
    # every row is written (zeros where unused): the partials buffer is shared with the
    # first pass, and the whole second-pass slice of the status is summed from it
    dot, gp2, g2 = zero, zero, zero
    if WANT_GP2 or first_grad is not None:
        gp2 = gp64 * gp64
    if first_grad is not None:
        g = tl.load(first_grad + offs, mask=mask, other=0.0).to(tl.float64)
        dot = g * gp64
        g2 = g * g
    tl.store(gp2_out + pid, tl.sum(gp2, axis=0))
    tl.store(dot_out + pid, tl.sum(dot, axis=0))
    tl.store(g2_out + pid, tl.sum(g2, axis=0))


@triton.jit
def restore_kernel(param, backup, table, like, TABLE: tl.constexpr, BLOCK: tl.constexpr):
    """``w <- backup``, an exact copy."""
    copy_block(param, backup, table, like, TABLE, BLOCK)


@triton.jit
def update_kernel(
    src,
    param,
    grad,
    state0,
    state1,
    state2,
    aux,
    gv,
    steps,
    status,
    lr_arg,
    device_scalars,
    h0,
    h1,
    h2,
    h3,
    h4,
    h5,
    alpha,
    table,
    like,
    BASE: tl.constexpr,
    OPTIONS: tl.constexpr,
    DESCENT: tl.constexpr,
    UNSCALE: tl.constexpr,
    CLIP_GRAD: tl.constexpr,
    CHECK: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Restore (``src`` the backup) fused with the base update of every tensor of the run.
    ``state0..2``: the base's state in ``state_names()`` order (None beyond); ``aux``/``gv``:
    the descent rule's inputs (GSAM's first gradient, LookSAM's g_v)."""
    lr64 = 0.0
    if LR_ON_DEVICE:  # a device scalar that LR schedulers fill in place (CUDA graph replays)
        lr64 = tl.load(lr_arg).to(tl.float64)
        lr = lr64.to(tl.float32)
    else:
        lr = lr_arg
    slot, index, offs, mask = block_of(table, BLOCK)
    src = address(src, slot, like, TABLE)
    param = address(param, slot, like, TABLE)
    grad = address(grad, slot, like, TABLE)
    state0 = address(state0, slot, like, TABLE)
    state1 = address(state1, slot, like, TABLE)
    state2 = address(state2, slot, like, TABLE)
    aux = address(aux, slot, like, TABLE)
    gv = address(gv, slot, like, TABLE)
    count = tl.load(steps + index)
    w_raw = tl.load(src + offs, mask=mask)
    gp = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    g = descent_input(gp, aux, gv, offs, mask, status, alpha, DESCENT, UNSCALE, CLIP_GRAD, CHECK)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    s0, s1, s2 = zero, zero, zero
    if state0 is not None:
        s0_raw = tl.load(state0 + offs, mask=mask)
        s0 = s0_raw.to(tl.float32)
    if state1 is not None:
        s1_raw = tl.load(state1 + offs, mask=mask)
        s1 = s1_raw.to(tl.float32)
    if state2 is not None:
        s2_raw = tl.load(state2 + offs, mask=mask)
        s2 = s2_raw.to(tl.float32)
    w, s0, s1, s2 = update(
        w_raw.to(tl.float32),
        g,
        s0,
        s1,
        s2,
        count == 0,
        lr,
        lr64,
        count,
        device_scalars,
        h0,
        h1,
        h2,
        h3,
        h4,
        h5,
        BASE,
        OPTIONS,
        LR_ON_DEVICE,
    )
    if state0 is not None:
        tl.store(state0 + offs, _stored(s0_raw, s0, status, CHECK), mask=mask)
    if state1 is not None:
        tl.store(state1 + offs, _stored(s1_raw, s1, status, CHECK), mask=mask)
    if state2 is not None:
        tl.store(state2 + offs, _stored(s2_raw, s2, status, CHECK), mask=mask)
    tl.store(param + offs, _stored(w_raw, w, status, CHECK), mask=mask)


@triton.jit
def _stored(raw, new, status, CHECK: tl.constexpr):
    """``new`` in ``raw``'s dtype, or ``raw`` itself, bit for bit, when the step is skipped."""
    out = new.to(raw.dtype)
    if CHECK:
        out = tl.where(skip_step(status), raw, out)
    return out


@triton.jit
def advance_steps_kernel(
    steps,
    vsteps,
    taking_part,
    status,
    n,
    BASE: tl.constexpr,
    VARIANT: tl.constexpr,
    CHECK: tl.constexpr,
    COUNT_SKIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """steps (BASE) and vsteps (VARIANT) += taking_part * (step not skipped); one bucket
    also counts skipped steps."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    inc = tl.load(taking_part + offs, mask=mask, other=0.0)
    if CHECK:
        skip = skip_step(status)
        inc = tl.where(skip, 0.0, inc)
        if COUNT_SKIP:
            if tl.program_id(0) == 0:
                tl.store(status + SKIPPED, tl.load(status + SKIPPED) + tl.where(skip, 1.0, 0.0))
    if BASE:
        tl.store(steps + offs, tl.load(steps + offs, mask=mask) + inc, mask=mask)
    if VARIANT:
        tl.store(vsteps + offs, tl.load(vsteps + offs, mask=mask) + inc, mask=mask)
