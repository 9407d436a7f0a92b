"""The ascent half of a SAM step: global-norm statistics and the perturbation.

``ascent_stats_kernel`` runs over one run of a flat bucket with a fixed grid (at most
``MAX_PROGRAMS`` programs, each striding over the run) and writes one partial sum per
program: the sum of ``u^2`` in float32 and the number of non-finite gradient entries. The
host side sums the partials with one deterministic reduction: no float atomics, so the
same gradients give bitwise the same norm on every run.

``perturb_kernel`` reads ``status = [sum of u^2, non-finite count, ...]`` from device
memory (no host sync), writes the backup and ``w + eps`` in one pass.
"""

import triton
import triton.language as tl

BLOCK = 4096
MAX_PROGRAMS = 1024


def stats_programs(n: int) -> int:
    """The (deterministic) number of partial sums a run of ``n`` elements produces."""
    return max(1, min(triton.cdiv(n, BLOCK), MAX_PROGRAMS))


@triton.jit
def _direction(g, VARIANT: tl.constexpr):
    # the variant's ascent direction v (docs/variants.md); 0 = the gradient itself
    if VARIANT == 0:
        v = g
    return v


@triton.jit
def ascent_stats_kernel(
    grad_ptr,
    param_ptr,
    sumsq_ptr,
    bad_ptr,
    n,
    eta,
    VARIANT: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    WANT_SUMSQ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bad += tl.where(tl.abs(g) < float("inf"), 0.0, 1.0)  # NaN compares false too
        if WANT_SUMSQ:
            u = _direction(g, VARIANT)
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
    grad_ptr,
    backup_ptr,
    status_ptr,
    n,
    rho,
    eta,
    norm_eps,
    VARIANT: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    NORMALIZED: tl.constexpr,
    CHECK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w_raw = tl.load(param_ptr + offs, mask=mask)
    w = w_raw.to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = rho
    if NORMALIZED:
        norm = tl.sqrt(tl.load(status_ptr).to(tl.float32))
        scale = rho / (norm + norm_eps)
    u = _direction(g, VARIANT)
    if ADAPTIVE:
        t = tl.abs(w) + eta
        eps = scale * t * (t * u)
    else:
        eps = scale * u
    new_w = (w + eps).to(w_raw.dtype)
    if CHECK:
        new_w = tl.where(tl.load(status_ptr + 1) > 0, w_raw, new_w)
    tl.store(backup_ptr + offs, w_raw, mask=mask)
    tl.store(param_ptr + offs, new_w, mask=mask)
