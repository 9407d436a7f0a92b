"""The fused base updates' element math in Triton: one function per base, one dispatch.

``update`` (called by ``descent.update_kernel`` on float32 values) picks the base by its
``BaseSpec.kernel`` number. A base's scalars ``h0..h5`` are its spec's ``kernel_scalars()``
in that order, ``OPTIONS`` its ``kernel_options()`` bits, ``s0..s2`` its state in
``state_names()`` order (unused ones are zeros). Each function mirrors its spec's
``reference_update`` (``sam_fused/base_updates.py``, ``sam_fused/lion.py``): the
specification every kernel is tested against. A new base adds its function and its branch
here, its functor in ``csrc/sam_fused_math.h``, and nothing in the kernels or backends.
"""

import triton
import triton.language as tl

from ..base_updates import AdamSpec, SGDSpec
from ..lion import LionSpec

SGD = tl.constexpr(SGDSpec.kernel)
ADAM = tl.constexpr(AdamSpec.kernel)
LION = tl.constexpr(LionSpec.kernel)


@triton.jit
def _bit(OPTIONS: tl.constexpr, k: tl.constexpr):
    return (OPTIONS >> k) & 1 == 1


@triton.jit
def sgd(w, g, buf, first, lr, momentum, one_minus_dampening, weight_decay, OPTIONS: tl.constexpr):
    """torch.optim.SGD (bits: 0 weight decay, 1 momentum, 2 nesterov, 3 maximize)."""
    if _bit(OPTIONS, 3):
        g = -g
    d = g
    if _bit(OPTIONS, 0):
        d = g + weight_decay * w
    if _bit(OPTIONS, 1):
        buf = tl.where(first, d, momentum * buf + one_minus_dampening * d)
        if _bit(OPTIONS, 2):
            d = d + momentum * buf
        else:
            d = buf
    return w - lr * d, buf


@triton.jit
def adam(w, g, m, v, vmax, step_size, bc2_sqrt, h0, h1, h2, h3, h4, h5, OPTIONS: tl.constexpr):
    """torch.optim.Adam / AdamW (h: 1 - beta1, beta2, 1 - beta2, eps, weight decay,
    1 - lr wd; bits: 0 weight decay, 1 decoupled, 2 amsgrad, 3 maximize)."""
    if _bit(OPTIONS, 3):
        g = -g
    if _bit(OPTIONS, 0):
        if _bit(OPTIONS, 1):
            w = w * h5
        else:
            g = g + h4 * w
    # torch.lerp(m, g, weight) with weight = 1 - beta1, in its two branches as torch rounds them
    m = tl.where(h0 < 0.5, m + h0 * (g - m), g - (g - m) * (1.0 - h0))
    v = h1 * v + h2 * (g * g)
    second = v
    if _bit(OPTIONS, 2):
        vmax = tl.maximum(vmax, v)
        second = vmax
    return w - step_size * (m / (tl.sqrt(second) / bc2_sqrt + h3)), m, v, vmax


@triton.jit
def lion(w, g, m, lr, h0, h1, h2, h3, h5, OPTIONS: tl.constexpr):
    """Lion (h: beta1, 1 - beta1, beta2, 1 - beta2, weight decay, 1 - lr wd; bits: 0 weight
    decay, 1 maximize)."""
    if _bit(OPTIONS, 1):
        g = -g
    if _bit(OPTIONS, 0):
        w = w * h5
    c = m * h0 + g * h1
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))  # torch.sign: (0 < c) - (c < 0), NaN -> 0
    return w - lr * sign, m * h2 + g * h3


@triton.jit
def update(
    w,
    g,
    s0,
    s1,
    s2,
    first,
    lr,
    lr64,
    steps,
    device_ptr,
    h0,
    h1,
    h2,
    h3,
    h4,
    h5,
    BASE: tl.constexpr,
    OPTIONS: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
):
    """``(w, s0, s1, s2)`` after one update of base ``BASE``. ``lr64``: the learning rate in
    float64 when it lives on the device; ``steps``: the tensor's update count (float32);
    ``device_ptr``: the base's float64 ``device_scalars``."""
    if BASE == ADAM:
        # bias corrections in float64 from the device-resident count, as PyTorch computes
        # them in double on the host: 1 - beta^t loses digits in float32
        t = steps.to(tl.float64) + 1.0
        bias_correction1 = 1.0 - tl.exp(t * tl.log(tl.load(device_ptr)))
        bias_correction2 = 1.0 - tl.exp(t * tl.log(tl.load(device_ptr + 1)))
        if LR_ON_DEVICE:
            h5 = (1.0 - lr64 * h4).to(tl.float32)  # 1 - lr wd, formed here when lr is on the device
            step_size = (lr64 / bias_correction1).to(tl.float32)
        else:
            step_size = (lr / bias_correction1).to(tl.float32)
        w, s0, s1, s2 = adam(
            w,
            g,
            s0,
            s1,
            s2,
            step_size,
            tl.sqrt(bias_correction2).to(tl.float32),
            h0,
            h1,
            h2,
            h3,
            h4,
            h5,
            OPTIONS,
        )
    elif BASE == LION:
        if LR_ON_DEVICE:
            h5 = (1.0 - lr64 * h4).to(tl.float32)
        w, s0 = lion(w, g, s0, lr, h0, h1, h2, h3, h5, OPTIONS)
    else:
        w, s0 = sgd(w, g, s0, first, lr, h0, h1, h2, OPTIONS)
    return w, s0, s1, s2
