"""The foreach backend's statistics over flat tensors: sums in an order fixed by the
lengths alone, and what reading them on the host allows.

Every sum here is cut into rows whose number depends only on the tensor's length, each row
reduced by one thread and the row results summed the same way, so the result is the same
for any number of torch threads. Host values (CPU tensors, see ``foreach.py``) come back as
Python floats, device values as 0-d tensors (nothing is read).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .reference import ROW, sum_of_squares

__all__ = ["fixed_sum", "nonfinite_count", "sum_of_squares_in"]

# the host's sum of squares: float32 norms of rows this long (short rows keep each row's
# float32 rounding small: about 1e-9 relative over 2M elements, where rows of 4096 gave
# 1e-7 over one row), their squares summed in float64, as the C++ kernels sum float32 lanes
# into doubles. A float32 row norm may lose squares below float32's smallest normal
# (2^-126): when the sum is at least numel * 2^-100 what was lost is below 2^-26 of it,
# else float64 squares are taken
FAST_ROW = 64
SMALLEST_TRUSTED = 2.0**-100


def fixed_sum(x: Tensor) -> Tensor:
    """``x.sum()`` in an order fixed by ``x.numel()`` alone: rows of ROW, then their sums."""
    flat = x.reshape(-1)
    while flat.numel() > ROW:
        rows = flat.numel() // ROW
        head = flat[: rows * ROW].view(rows, ROW).sum(dim=1)
        flat = torch.cat([head, flat[rows * ROW :].sum().reshape(1)])
    return flat.sum()


def sum_of_squares_in(u: Tensor, acc: torch.dtype, host: bool) -> Any:
    """``sum(u^2)`` summed in ``acc`` (float64 unless the device has none).

    On the host, for float32 ``u``: the float32 norm of every row of FAST_ROW elements
    (about 4x faster than squaring in float64), squared and summed in float64. A row norm
    overflows only where float64 squares are needed (float32 squares overflowing), and squares
    below 2^-126 are lost only where they could matter: then the float64 squares are taken.
    Elsewhere the reference's :func:`~sam_fused.backends.reference.sum_of_squares`."""
    if host and u.dtype == torch.float32 and acc == torch.float64 and u.numel() >= FAST_ROW:
        rows = u.numel() // FAST_ROW
        norms = torch.linalg.vector_norm(u[: rows * FAST_ROW].view(rows, FAST_ROW), dim=1)
        head = float(fixed_sum(norms.to(acc).square()))
        total = head + float(u[rows * FAST_ROW :].to(acc).square().sum())
        if math.isfinite(total) and total >= u.numel() * SMALLEST_TRUSTED:
            return total
    exact = sum_of_squares(u.to(acc))
    return float(exact) if host else exact


def nonfinite_count(g_raw: Tensor, host: bool, known_finite: float | None = None) -> Any:
    """How many entries of ``g_raw`` are NaN or infinite. On the host a finite sum over them
    (``known_finite``: a sum that would not be finite if one of them were not; else one
    float32 sum) proves there are none, and only then is nothing counted."""
    if host:
        probe = float(g_raw.sum()) if known_finite is None else known_finite
        return 0.0 if math.isfinite(probe) else float((~torch.isfinite(g_raw)).sum())
    return (~torch.isfinite(g_raw)).sum()
