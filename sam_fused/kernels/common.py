"""Pieces every kernel family shares: the status layout, the rule names, the skip predicate.

The status entries (``sam_fused/status.py``) and the variants' rule numbers
(``sam_fused/variants.py``) are imported from their one definition and become
compile-time constants here, so a kernel branch reads ``RULE == ASCENT_VASSO``.
"""

import triton
import triton.language as tl

from .. import status as S
from ..variants import Ascent, Descent

# the status tensor's entries, as compile-time constants
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

# the variants' rules (kernels take the rule of a launch as a constexpr argument), one name
# per member of the enums: ASCENT_GRAD, ASCENT_VASSO, ..., DESCENT_PLAIN, DESCENT_GSAM, ...
# (made here from the enums, so a new rule needs no edit in this file)
for _rule in (*Ascent, *Descent):
    globals()[f"{type(_rule).__name__.upper()}_{_rule.name}"] = tl.constexpr(int(_rule))


@triton.jit
def skip_step(status_ptr):
    """True when either pass saw a non-finite gradient: the step must change nothing."""
    return (tl.load(status_ptr + BAD1) + tl.load(status_ptr + BAD2)) > 0


@triton.jit
def status_f32(status_ptr, index):
    return tl.load(status_ptr + index).to(tl.float32)
