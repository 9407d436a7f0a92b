"""The ascent half of a SAM step: global-norm statistics, perturbation, centralization.

``ascent_stats_kernel`` runs over one run of a flat bucket with a fixed grid (at most
``MAX_PROGRAMS`` programs, each striding over the run) and writes one partial sum per
program: the sum of ``u^2`` in float32 and the number of non-finite gradient entries. The
host side sums the partials with one deterministic reduction: no float atomics, so the
same gradients give bitwise the same norm on every run.

``perturb_kernel`` reads the global sum of squares from the status tensor (no host sync)
and writes the backup, ``w + eps`` and the variant's new running state in one pass.

The variant's ascent direction is one ``constexpr`` branch of ``direction`` (rule names
from ``sam_fused.variants.Ascent``, see ``common.py``); its two scalars ``c1, c2`` are the
variant's ``kernel_scalars``. ``first`` (the variant's running state was never updated)
comes from the bucket's ``vsteps`` count of the run.
"""

import triton
import triton.language as tl

from .common import (
    ASCENT_FSAM,
    ASCENT_GRAD,
    ASCENT_RSAM,
    ASCENT_VASSO,
    INV_SCALE1,
    SUMSQ,
    address,
    block_of,
    chunk_of,
    copy_block,
    skip_step,
    status_f32,
)

BLOCK = 4096
MAX_PROGRAMS = 1024


def stats_programs(n: int) -> int:
    """The (deterministic) number of partial sums a run of ``n`` elements produces."""
    # plain integer arithmetic: triton.cdiv is a constexpr function, ~10 us per host call
    return max(1, min(-(-n // BLOCK), MAX_PROGRAMS))


@triton.jit
def direction(g, aux, first, c1, c2, RULE: tl.constexpr):
    """The ascent direction v (docs/variants.md) and the variant's new running state."""
    if RULE == ASCENT_VASSO:  # d <- (1 - theta) d + theta g, d = g on the first update (c1 = theta)
        v = tl.where(first, g, (1.0 - c1) * aux + c1 * g)
        new_state = v
    elif RULE == ASCENT_FSAM:  # v = g - sigma m (previous m), m <- lam m + (1 - lam) g; both g at first
        v = tl.where(first, g, g - c1 * aux)
        new_state = tl.where(first, g, c2 * aux + (1.0 - c2) * g)
    elif RULE == ASCENT_RSAM:  # v = delta + lam g_hat (c1 = lam)
        v = aux + c1 * g
        new_state = v
    else:  # SAM, ASAM, USAM, GSAM, LookSAM, GCSAM (after centralization)
        v = g
        new_state = v
    return v, new_state


@triton.jit
def ascent_stats_kernel(
    grad_ptr,
    param_ptr,
    aux_ptr,
    first_ptr,
    status_ptr,
    sumsq_ptr,
    bad_ptr,
    n,
    eta,
    c1,
    c2,
    table_ptr,
    like_ptr,
    RULE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    WANT_SUMSQ: tl.constexpr,
    UNSCALE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if TABLE:  # one chunk of one tensor per program (one pass of the loop below)
        slot, begin, n, index = chunk_of(table_ptr)
        grad_ptr = address(grad_ptr, slot, like_ptr, TABLE)
        param_ptr = address(param_ptr, slot, like_ptr, TABLE)
        aux_ptr = address(aux_ptr, slot, like_ptr, TABLE)
        first_ptr += index
        begin = tl.multiple_of(begin, BLOCK)
        end = begin + 1
    else:  # at most MAX_PROGRAMS programs, each striding over the run
        begin = pid * BLOCK
        end = n
    stride = tl.num_programs(0).to(tl.int64) * BLOCK
    first = tl.load(first_ptr) == 0
    inv_scale = 1.0
    if UNSCALE:  # GradScaler: the gradients hold scale * g
        inv_scale = status_f32(status_ptr, INV_SCALE1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, stride):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bad += tl.where(tl.abs(g) < float("inf"), 0.0, 1.0)  # NaN compares false too
        if UNSCALE:
            g = g * inv_scale
        if WANT_SUMSQ:
            aux = g
            if RULE != ASCENT_GRAD:
                aux = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u, _ = direction(g, aux, first, c1, c2, RULE)
            if ADAPTIVE:
                w = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                u = (tl.abs(w) + eta) * u
            acc += u * u
    if WANT_SUMSQ:
        tl.store(sumsq_ptr + pid, tl.sum(acc, axis=0))
    tl.store(bad_ptr + pid, tl.sum(bad, axis=0))


@triton.jit
def perturb_kernel(
    param_ptr,
    src_ptr,
    grad_ptr,
    backup_ptr,
    aux_ptr,
    keep_ptr,
    prev_ptr,
    first_ptr,
    status_ptr,
    n,
    rho_arg,
    eta,
    norm_eps,
    c1,
    c2,
    table_ptr,
    like_ptr,
    RULE: tl.constexpr,
    HAS_STATE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    NORMALIZED: tl.constexpr,
    CHECK: tl.constexpr,
    WRITE_BACKUP: tl.constexpr,
    KEEP_GRAD: tl.constexpr,
    UNSCALE: tl.constexpr,
    RHO_ON_DEVICE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # rho is a float argument, or a pointer to a device scalar that schedules update in place
    # (CUDA graphs replay the launch with its arguments frozen)
    if RHO_ON_DEVICE:
        rho = tl.load(rho_arg).to(tl.float32)
    else:
        rho = rho_arg
    slot, index, offs, mask = block_of(n, table_ptr, BLOCK, TABLE)
    param_ptr = address(param_ptr, slot, like_ptr, TABLE)
    src_ptr = address(src_ptr, slot, like_ptr, TABLE)
    grad_ptr = address(grad_ptr, slot, like_ptr, TABLE)
    backup_ptr = address(backup_ptr, slot, like_ptr, TABLE)
    aux_ptr = address(aux_ptr, slot, like_ptr, TABLE)
    keep_ptr = address(keep_ptr, slot, like_ptr, TABLE)
    prev_ptr = address(prev_ptr, slot, like_ptr, TABLE)
    first_ptr += index
    w_raw = tl.load(src_ptr + offs, mask=mask)  # w, or RSAM's backup (w before the noise)
    w = w_raw.to(tl.float32)
    g_raw = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    g = g_raw.to(tl.float32)
    if UNSCALE:
        g = g * status_f32(status_ptr, INV_SCALE1)
    first = tl.load(first_ptr) == 0
    aux = g
    if RULE != ASCENT_GRAD:
        aux_raw = tl.load(aux_ptr + offs, mask=mask, other=0.0)
        aux = aux_raw.to(tl.float32)
    v, new_state = direction(g, aux, first, c1, c2, RULE)
    scale = rho
    if NORMALIZED:
        scale = rho / (tl.sqrt(tl.load(status_ptr + SUMSQ).to(tl.float32)) + norm_eps)
    if ADAPTIVE:
        t = tl.abs(w) + eta
        eps = scale * t * (t * v)
    else:
        eps = scale * v
    new_w = (w + eps).to(w_raw.dtype)
    if CHECK:
        skip = skip_step(status_ptr)
        new_w = tl.where(skip, w_raw, new_w)
    if WRITE_BACKUP:
        tl.store(backup_ptr + offs, w_raw, mask=mask)
    if KEEP_GRAD:  # GSAM and LookSAM need g again in the second step (unscaled)
        tl.store(keep_ptr + offs, g.to(g_raw.dtype), mask=mask)
    if HAS_STATE:  # the variant's running state (VaSSO's d, F-SAM's m)
        state_out = new_state.to(aux_raw.dtype)
        if CHECK:
            state_out = tl.where(skip, aux_raw, state_out)
        # the old value too: a non-finite second pass or an abandoned step undoes this
        # update (revert_state_kernel), and neither is known yet
        tl.store(prev_ptr + offs, aux_raw, mask=mask)
        tl.store(aux_ptr + offs, state_out, mask=mask)
    tl.store(param_ptr + offs, new_w, mask=mask)


@triton.jit
def revert_state_kernel(
    state_ptr,
    prev_ptr,
    status_ptr,
    n,
    table_ptr,
    like_ptr,
    FORCE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``state <- prev`` when the step is skipped (always with FORCE: an abandoned step);
    reads nothing else when it is not."""
    if FORCE or skip_step(status_ptr):
        copy_block(state_ptr, prev_ptr, n, table_ptr, like_ptr, TABLE, BLOCK)


@triton.jit
def centralize_kernel(grad_ptr, row_start_ptr, row_len_ptr, TABLE: tl.constexpr, BLOCK: tl.constexpr):
    """GCSAM: one program per row, g <- g - mean(g) over the row (float32 math). A row starts
    at an offset into the flat gradient buffer, or (TABLE) at the address of its first element."""
    row = tl.program_id(0)
    if TABLE:
        grad_ptr = tl.load(row_start_ptr + row).to(grad_ptr.dtype)
        start = 0
    else:
        start = tl.load(row_start_ptr + row)
    length = tl.load(row_len_ptr + row)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, length, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(grad_ptr + start + idx, mask=idx < length, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / length
    for off in range(0, length, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < length
        g = tl.load(grad_ptr + start + idx, mask=mask)
        tl.store(grad_ptr + start + idx, (g.to(tl.float32) - mean).to(g.dtype), mask=mask)
