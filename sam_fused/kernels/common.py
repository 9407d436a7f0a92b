"""Pieces every kernel family shares: the status layout, the rule names, the skip predicate,
and how a program finds its elements through the address tables.

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


@triton.jit
def status_f64(status_ptr, index):
    """An entry as float64: sums of squares may exceed float32's range (|g| > 1.8e19)."""
    return tl.load(status_ptr + index).to(tl.float64)


# ---------------------------------------------------------------------- address tables
# Every kernel runs over a run of tensors (sam_fused/tables.py): each pointer argument of a
# role is an int64 table of tensor addresses, and program p reads row p of the chunk table
# (slot, start, numel, count index) to find its tensor, its block in it, and its update
# counts. An address read from memory tells the compiler nothing about its alignment:
# TABLE=2 says that every address is 16-byte aligned, so that loads are 128-bit vectors;
# TABLE=1 makes no such promise (offset views of larger tensors).
TABLE_ALIGNED = tl.constexpr(2)


@triton.jit
def chunk_of(table_ptr):
    """This program's row of the chunk table: (slot, start, numel, count index)."""
    row = table_ptr + 4 * tl.program_id(0).to(tl.int64)
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def address(ptr, slot, like_ptr, TABLE: tl.constexpr):
    """A role's pointer for this program: the slot's tensor (an int64 address turned into a
    pointer of ``like_ptr``'s element type); None stays None (a role the launch lacks)."""
    if ptr is not None:
        ptr = tl.load(ptr + slot).to(like_ptr.dtype)
        if TABLE == TABLE_ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def block_of(table_ptr, BLOCK: tl.constexpr):
    """This program's (slot, count index, offsets, mask) in an elementwise launch."""
    slot, start, n, index = chunk_of(table_ptr)
    offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)  # chunks start at multiples of BLOCK
    return slot, index, offs, offs < n


@triton.jit
def copy_block(dst_ptr, src_ptr, table_ptr, like_ptr, TABLE: tl.constexpr, BLOCK: tl.constexpr):
    """``dst <- src`` over this program's block (restores, reverted running state)."""
    slot, _, offs, mask = block_of(table_ptr, BLOCK)
    dst_ptr = address(dst_ptr, slot, like_ptr, TABLE)
    src_ptr = address(src_ptr, slot, like_ptr, TABLE)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)
