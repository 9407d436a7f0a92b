"""The variants' element math in Triton: one branch per rule, the only place a variant's
direction or descent correction is written for the Triton kernels.

The rules are ``sam_fused.variants.Ascent`` and ``Descent`` (``common.py`` turns them into
constexpr names). Each branch mirrors the PyTorch method of the same variant in
``sam_fused/variants.py`` (the specification); a new variant adds its branch here, its
functor in ``csrc/sam_fused_math.h``, and nothing in the kernels or backends.
"""

import triton
import triton.language as tl

from .common import (
    ASCENT_FSAM,
    ASCENT_RSAM,
    ASCENT_VASSO,
    CLIP,
    DESCENT_GSAM,
    DESCENT_LOOKSAM_FULL,
    DESCENT_LOOKSAM_REUSE,
    DOT,
    G2,
    GP2,
    GV2,
    INV_SCALE2,
    SUMSQ,
    skip_step,
    status_f32,
    status_f64,
)


@triton.jit
def direction(g, aux, first, c1, c2, RULE: tl.constexpr):
    """The ascent direction v and the variant's new running state (``c1, c2``: the variant's
    ``kernel_scalars``; ``aux``: its running state, or RSAM's noise; ``first``: the running
    state was never updated)."""
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
def _ratio(status_ptr, num, den):
    """``status[num] / status[den]`` (0 where the denominator is 0), formed in float64."""
    d = status_f64(status_ptr, den)
    return tl.where(d > 0, status_f64(status_ptr, num) / d, 0.0).to(tl.float32)


@triton.jit
def descent_gradient(
    gp, aux_ptr, gv_ptr, offs, mask, status_ptr, alpha, RULE: tl.constexpr, CHECK: tl.constexpr
):
    """The gradient the base update receives (rules: sam_fused.variants.Descent)."""
    if RULE == DESCENT_GSAM:  # GSAM: g_p - alpha (g - (<g, g_p> / ||g_p||^2) g_p), aux = g
        g = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = gp - alpha * (g - _ratio(status_ptr, DOT, GP2) * gp)
    elif RULE == DESCENT_LOOKSAM_FULL:  # descend along g_p, store g_v = g_p - (<g_p, g> / ||g||^2) g
        g = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gv_raw = tl.load(gv_ptr + offs, mask=mask)
        gv = (gp - _ratio(status_ptr, DOT, G2) * g).to(gv_raw.dtype)
        if CHECK:
            gv = tl.where(skip_step(status_ptr), gv_raw, gv)
        tl.store(gv_ptr + offs, gv, mask=mask)
        d = gp
    elif RULE == DESCENT_LOOKSAM_REUSE:  # one pass: g + alpha (||g|| / ||g_v||) g_v, aux = g_v
        gv = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gv2 = status_f64(status_ptr, GV2)
        scale = tl.where(gv2 > 0, tl.sqrt(status_f64(status_ptr, SUMSQ)) / tl.sqrt(gv2), 0.0)
        d = gp + alpha * scale.to(tl.float32) * gv
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
