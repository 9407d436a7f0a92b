"""The descent half of a SAM step: restore the weights and apply the base update.

Each update kernel reads the weights from ``src`` (the backup, which makes the restore
free, or the parameters themselves when no restore is due), forms the variant's descent
gradient (``descent_gradient``: the second-pass gradient, GSAM's or LookSAM's
correction), applies the base update in float32 and stores the parameter and its state in
their own dtypes. When ``CHECK`` is set and either pass saw a non-finite gradient, every
stored value stays bitwise as it was and only the restore takes effect.

Every parameter of a run has the same update count (a table launch reads each tensor's
own); it is read from ``steps_ptr`` and advanced afterwards by ``advance_steps_kernel``, so
that a skipped step leaves it alone.
"""

import triton
import triton.language as tl

from .common import (
    CLIP,
    DESCENT_GSAM,
    DESCENT_LOOKSAM_FULL,
    DESCENT_LOOKSAM_REUSE,
    DOT,
    G2,
    GP2,
    GV2,
    INV_SCALE2,
    SKIPPED,
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


@triton.jit
def descent_stats_kernel(
    grad_ptr,
    first_grad_ptr,
    bad_ptr,
    dot_ptr,
    gp2_ptr,
    g2_ptr,
    status_ptr,
    n,
    table_ptr,
    like_ptr,
    INNER: tl.constexpr,
    WANT_GP2: tl.constexpr,
    UNSCALE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-program partials of the second pass: non-finite count, and <g, g_p>, ||g_p||^2,
    ||g||^2 when the variant needs them (INNER); ||g_p||^2 also for clipping (WANT_GP2)."""
    pid = tl.program_id(0).to(tl.int64)
    inv_scale = 1.0
    if UNSCALE:
        inv_scale = status_f32(status_ptr, INV_SCALE2)
    if TABLE:  # one chunk of one tensor per program (one pass of the loop below)
        slot, begin, n, _ = chunk_of(table_ptr)
        grad_ptr = address(grad_ptr, slot, like_ptr, TABLE)
        first_grad_ptr = address(first_grad_ptr, slot, like_ptr, TABLE)
        begin = tl.multiple_of(begin, BLOCK)
        end = begin + 1
    else:
        begin = pid * BLOCK
        end = n
    stride = tl.num_programs(0).to(tl.int64) * BLOCK
    bad = tl.zeros([BLOCK], dtype=tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    gp2 = tl.zeros([BLOCK], dtype=tl.float32)
    g2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, stride):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        gp = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bad += tl.where(tl.abs(gp) < float("inf"), 0.0, 1.0)
        if UNSCALE:
            gp = gp * inv_scale
        if INNER or WANT_GP2:
            gp2 += gp * gp
        if INNER:
            g = tl.load(first_grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dot += g * gp
            g2 += g * g
    # every row is written (zeros where unused): the partials buffer is shared with the
    # first pass, and the whole second-pass slice of the status is summed from it
    tl.store(bad_ptr + pid, tl.sum(bad, axis=0))
    tl.store(gp2_ptr + pid, tl.sum(gp2, axis=0))
    tl.store(dot_ptr + pid, tl.sum(dot, axis=0))
    tl.store(g2_ptr + pid, tl.sum(g2, axis=0))


@triton.jit
def descent_gradient(
    gp, aux_ptr, gv_ptr, offs, mask, status_ptr, alpha, RULE: tl.constexpr, CHECK: tl.constexpr
):
    """The gradient the base update receives (rules: sam_fused.variants.Descent)."""
    if RULE == DESCENT_GSAM:  # GSAM: g_p - alpha (g - (<g, g_p> / ||g_p||^2) g_p), aux = g
        g = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gp2 = status_f32(status_ptr, GP2)
        coef = tl.where(gp2 > 0, status_f32(status_ptr, DOT) / gp2, 0.0)
        d = gp - alpha * (g - coef * gp)
    elif (
        RULE == DESCENT_LOOKSAM_FULL
    ):  # LookSAM full step: descend along g_p, store g_v = g_p - (<g_p,g>/||g||^2) g
        g = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g2 = status_f32(status_ptr, G2)
        coef = tl.where(g2 > 0, status_f32(status_ptr, DOT) / g2, 0.0)
        gv_raw = tl.load(gv_ptr + offs, mask=mask)
        gv = (gp - coef * g).to(gv_raw.dtype)
        if CHECK:
            gv = tl.where(skip_step(status_ptr), gv_raw, gv)
        tl.store(gv_ptr + offs, gv, mask=mask)
        d = gp
    elif RULE == DESCENT_LOOKSAM_REUSE:  # LookSAM reuse step: g + alpha (||g|| / ||g_v||) g_v, aux = g_v
        gv = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gv2 = status_f32(status_ptr, GV2)
        scale = tl.where(gv2 > 0, tl.sqrt(status_f32(status_ptr, SUMSQ)) / tl.sqrt(gv2), 0.0)
        d = gp + alpha * scale * gv
    else:
        d = gp
    return d


@triton.jit
def descent_input(
    gp,
    aux_ptr,
    gv_ptr,
    offs,
    mask,
    status_ptr,
    alpha,
    RULE: tl.constexpr,
    UNSCALE: tl.constexpr,
    CLIP_GRAD: tl.constexpr,
    CHECK: tl.constexpr,
):
    """The unscaled second-pass gradient -> the variant's descent gradient -> clipped."""
    if UNSCALE:
        gp = gp * status_f32(status_ptr, INV_SCALE2)
    d = descent_gradient(gp, aux_ptr, gv_ptr, offs, mask, status_ptr, alpha, RULE, CHECK)
    if CLIP_GRAD:
        d = d * status_f32(status_ptr, CLIP)
    return d


@triton.jit
def restore_kernel(param_ptr, backup_ptr, n, table_ptr, like_ptr, TABLE: tl.constexpr, BLOCK: tl.constexpr):
    """``w <- backup``, an exact copy."""
    copy_block(param_ptr, backup_ptr, n, table_ptr, like_ptr, TABLE, BLOCK)


@triton.jit
def update_block(
    src_ptr,
    param_ptr,
    grad_ptr,
    aux_ptr,
    gv_ptr,
    steps_ptr,
    n,
    table_ptr,
    like_ptr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The roles every update kernel has, resolved for this program (see common.block_of)."""
    slot, index, offs, mask = block_of(n, table_ptr, BLOCK, TABLE)
    src_ptr = address(src_ptr, slot, like_ptr, TABLE)
    param_ptr = address(param_ptr, slot, like_ptr, TABLE)
    grad_ptr = address(grad_ptr, slot, like_ptr, TABLE)
    aux_ptr = address(aux_ptr, slot, like_ptr, TABLE)
    gv_ptr = address(gv_ptr, slot, like_ptr, TABLE)
    return slot, offs, mask, src_ptr, param_ptr, grad_ptr, aux_ptr, gv_ptr, steps_ptr + index


@triton.jit
def sgd_kernel(
    src_ptr,
    param_ptr,
    grad_ptr,
    buf_ptr,
    aux_ptr,
    gv_ptr,
    steps_ptr,
    status_ptr,
    n,
    lr_arg,
    momentum,
    one_minus_dampening,
    weight_decay,
    alpha,
    table_ptr,
    like_ptr,
    DESCENT: tl.constexpr,
    UNSCALE: tl.constexpr,
    CLIP_GRAD: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    CHECK: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if LR_ON_DEVICE:  # a device scalar that LR schedulers fill in place (CUDA graph replays)
        lr = tl.load(lr_arg).to(tl.float32)
    else:
        lr = lr_arg
    slot, offs, mask, src_ptr, param_ptr, grad_ptr, aux_ptr, gv_ptr, steps_ptr = update_block(
        src_ptr, param_ptr, grad_ptr, aux_ptr, gv_ptr, steps_ptr, n, table_ptr, like_ptr, TABLE, BLOCK
    )
    buf_ptr = address(buf_ptr, slot, like_ptr, TABLE)
    w_raw = tl.load(src_ptr + offs, mask=mask)
    w = w_raw.to(tl.float32)
    gp = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = descent_input(gp, aux_ptr, gv_ptr, offs, mask, status_ptr, alpha, DESCENT, UNSCALE, CLIP_GRAD, CHECK)
    if MAXIMIZE:
        g = -g
    d = g
    if HAS_WEIGHT_DECAY:
        d = g + weight_decay * w
    if CHECK:
        skip = skip_step(status_ptr)
    if HAS_MOMENTUM:
        buf_raw = tl.load(buf_ptr + offs, mask=mask)
        first = tl.load(steps_ptr) == 0
        buf = tl.where(first, d, momentum * buf_raw.to(tl.float32) + one_minus_dampening * d)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
        buf_out = buf.to(buf_raw.dtype)
        if CHECK:
            buf_out = tl.where(skip, buf_raw, buf_out)
        tl.store(buf_ptr + offs, buf_out, mask=mask)
    w_out = (w - lr * d).to(w_raw.dtype)
    if CHECK:
        w_out = tl.where(skip, w_raw, w_out)
    tl.store(param_ptr + offs, w_out, mask=mask)


@triton.jit
def adam_kernel(
    src_ptr,
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    aux_ptr,
    gv_ptr,
    steps_ptr,
    betas_ptr,
    status_ptr,
    n,
    lr_arg,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    weight_decay,
    decay_factor,
    alpha,
    table_ptr,
    like_ptr,
    DESCENT: tl.constexpr,
    UNSCALE: tl.constexpr,
    CLIP_GRAD: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    CHECK: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    slot, offs, mask, src_ptr, param_ptr, grad_ptr, aux_ptr, gv_ptr, steps_ptr = update_block(
        src_ptr, param_ptr, grad_ptr, aux_ptr, gv_ptr, steps_ptr, n, table_ptr, like_ptr, TABLE, BLOCK
    )
    exp_avg_ptr = address(exp_avg_ptr, slot, like_ptr, TABLE)
    exp_avg_sq_ptr = address(exp_avg_sq_ptr, slot, like_ptr, TABLE)
    max_exp_avg_sq_ptr = address(max_exp_avg_sq_ptr, slot, like_ptr, TABLE)
    # bias corrections in float64 from the device-resident step count, as PyTorch
    # computes them in double on the host: 1 - beta^t loses digits in float32
    t = tl.load(steps_ptr).to(tl.float64) + 1.0
    bias_correction1 = 1.0 - tl.exp(t * tl.log(tl.load(betas_ptr)))
    bias_correction2 = 1.0 - tl.exp(t * tl.log(tl.load(betas_ptr + 1)))
    if LR_ON_DEVICE:  # the decay factor 1 - lr wd is then formed here, not on the host
        lr = tl.load(lr_arg).to(tl.float64)
        decay_factor = (1.0 - lr * weight_decay).to(tl.float32)
    else:
        lr = lr_arg
    step_size = (lr / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)

    w_raw = tl.load(src_ptr + offs, mask=mask)
    w = w_raw.to(tl.float32)
    gp = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = descent_input(gp, aux_ptr, gv_ptr, offs, mask, status_ptr, alpha, DESCENT, UNSCALE, CLIP_GRAD, CHECK)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            w = w * decay_factor
        else:
            g = g + weight_decay * w
    m_raw = tl.load(exp_avg_ptr + offs, mask=mask)
    v_raw = tl.load(exp_avg_sq_ptr + offs, mask=mask)
    m = m_raw.to(tl.float32)
    # torch.lerp(m, g, weight) with weight = 1 - beta1, in its two branches as torch rounds them
    m = tl.where(one_minus_beta1 < 0.5, m + one_minus_beta1 * (g - m), g - (g - m) * (1.0 - one_minus_beta1))
    v = beta2 * v_raw.to(tl.float32) + one_minus_beta2 * (g * g)
    if CHECK:
        skip = skip_step(status_ptr)
    if AMSGRAD:
        vmax_raw = tl.load(max_exp_avg_sq_ptr + offs, mask=mask)
        vmax = tl.maximum(vmax_raw.to(tl.float32), v)
        denom = tl.sqrt(vmax) / bias_correction2_sqrt + eps
        vmax_out = vmax.to(vmax_raw.dtype)
        if CHECK:
            vmax_out = tl.where(skip, vmax_raw, vmax_out)
        tl.store(max_exp_avg_sq_ptr + offs, vmax_out, mask=mask)
    else:
        denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    w_out = (w - step_size * (m / denom)).to(w_raw.dtype)
    m_out = m.to(m_raw.dtype)
    v_out = v.to(v_raw.dtype)
    if CHECK:
        w_out = tl.where(skip, w_raw, w_out)
        m_out = tl.where(skip, m_raw, m_out)
        v_out = tl.where(skip, v_raw, v_out)
    tl.store(exp_avg_ptr + offs, m_out, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v_out, mask=mask)
    tl.store(param_ptr + offs, w_out, mask=mask)


@triton.jit
def advance_steps_kernel(
    steps_ptr,
    vsteps_ptr,
    mask_ptr,
    status_ptr,
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
    inc = tl.load(mask_ptr + offs, mask=mask, other=0.0)
    if CHECK:
        skip = skip_step(status_ptr)
        inc = tl.where(skip, 0.0, inc)
        if COUNT_SKIP:
            if tl.program_id(0) == 0:
                tl.store(status_ptr + SKIPPED, tl.load(status_ptr + SKIPPED) + tl.where(skip, 1.0, 0.0))
    if BASE:
        tl.store(steps_ptr + offs, tl.load(steps_ptr + offs, mask=mask) + inc, mask=mask)
    if VARIANT:
        tl.store(vsteps_ptr + offs, tl.load(vsteps_ptr + offs, mask=mask) + inc, mask=mask)
