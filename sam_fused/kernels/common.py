"""Pieces every kernel family shares: the status layout and the skip predicate."""

import triton
import triton.language as tl

from .. import status as S

# the status tensor's entries (sam_fused/status.py), as compile-time constants
SUMSQ = tl.constexpr(S.SUMSQ)
BAD1 = tl.constexpr(S.BAD1)
SKIPPED = tl.constexpr(S.SKIPPED)
GV2 = tl.constexpr(S.GV2)
BAD2 = tl.constexpr(S.BAD2)
DOT = tl.constexpr(S.DOT)
GP2 = tl.constexpr(S.GP2)
G2 = tl.constexpr(S.G2)
INV_SCALE1 = tl.constexpr(S.INV_SCALE1)
INV_SCALE2 = tl.constexpr(S.INV_SCALE2)
CLIP = tl.constexpr(S.CLIP)


@triton.jit
def skip_step(status_ptr):
    """True when either pass saw a non-finite gradient: the step must change nothing."""
    return (tl.load(status_ptr + BAD1) + tl.load(status_ptr + BAD2)) > 0


@triton.jit
def status_f32(status_ptr, index):
    return tl.load(status_ptr + index).to(tl.float32)
