"""The descent half of a SAM step: restore the weights and apply the base update.

Each kernel reads the weights from ``src`` (the backup, which makes the restore free, or
the parameters themselves when they were restored separately), applies the base update in
float32 and stores the parameter and its state in their own dtypes. When ``CHECK`` is set,
``status[1] + status[2] > 0`` (a non-finite gradient in either pass) keeps every stored
value bitwise as it was, with only the restore taking effect.

Every parameter of a run has the same update count; it is read from ``steps_ptr`` and
advanced afterwards by ``advance_steps_kernel``, so that a skipped step leaves it alone.
"""

import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _skip(status_ptr):
    return (tl.load(status_ptr + 1) + tl.load(status_ptr + 2)) > 0


@triton.jit
def restore_kernel(param_ptr, backup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(param_ptr + offs, tl.load(backup_ptr + offs, mask=mask), mask=mask)


@triton.jit
def sgd_kernel(
    src_ptr,
    param_ptr,
    grad_ptr,
    buf_ptr,
    steps_ptr,
    status_ptr,
    n,
    lr,
    momentum,
    one_minus_dampening,
    weight_decay,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    CHECK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w_raw = tl.load(src_ptr + offs, mask=mask)
    w = w_raw.to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    d = g
    if HAS_WEIGHT_DECAY:
        d = g + weight_decay * w
    if CHECK:
        skip = _skip(status_ptr)
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
    steps_ptr,
    betas_ptr,
    status_ptr,
    n,
    lr,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    weight_decay,
    decay_factor,
    HAS_WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    CHECK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # bias corrections in float64 from the device-resident step count, as PyTorch
    # computes them in double on the host: 1 - beta^t loses digits in float32
    t = tl.load(steps_ptr).to(tl.float64) + 1.0
    bias_correction1 = 1.0 - tl.exp(t * tl.log(tl.load(betas_ptr)))
    bias_correction2 = 1.0 - tl.exp(t * tl.log(tl.load(betas_ptr + 1)))
    step_size = (lr / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)

    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w_raw = tl.load(src_ptr + offs, mask=mask)
    w = w_raw.to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
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
    m = m + one_minus_beta1 * (g - m)  # torch.lerp(m, g, 1 - beta1)
    v = beta2 * v_raw.to(tl.float32) + one_minus_beta2 * (g * g)
    if CHECK:
        skip = _skip(status_ptr)
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
    steps_ptr, mask_ptr, status_ptr, n, CHECK: tl.constexpr, COUNT_SKIP: tl.constexpr, BLOCK: tl.constexpr
):
    # steps += taking_part * (step not skipped); the first bucket also counts skipped steps
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    inc = tl.load(mask_ptr + offs, mask=mask, other=0.0)
    if CHECK:
        skip = _skip(status_ptr)
        inc = tl.where(skip, 0.0, inc)
        if COUNT_SKIP:
            if tl.program_id(0) == 0:
                tl.store(status_ptr + 3, tl.load(status_ptr + 3) + tl.where(skip, 1.0, 0.0))
    tl.store(steps_ptr + offs, tl.load(steps_ptr + offs, mask=mask) + inc, mask=mask)
