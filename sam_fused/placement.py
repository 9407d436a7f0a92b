"""Where a parameter's memory is, and what the kernels may assume about it.

sam_fused never moves a parameter: each keeps the storage it had (``p.data`` is never
re-pointed), as with any ``torch.optim`` optimizer. The fused kernels reach parameters
through tables of their addresses, so this module answers three questions about them:

* :func:`kernel_refusal`: can the multi-tensor kernels walk this tensor as ``numel``
  consecutive elements from its address? A view with gaps (a column slice) cannot; it runs
  on the foreach backend (``torch._foreach_*`` handles any strides).
* :func:`memory_span`: which bytes a tensor may touch, for finding parameters that share
  memory (two Parameters over one storage, overlapping views of one tensor).
* :func:`alias_layers`: a *layer* per parameter, such that parameters sharing memory are in
  different layers. Layers are perturbed in order and restored in reverse order, so every
  memory location gets back exactly the value it had before the step (``docs/design.md``,
  "Parameters that share memory").
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LayoutError",
    "alias_layers",
    "dense_view",
    "is_dense",
    "is_dtensor",
    "kernel_refusal",
    "local_tensor",
    "memory_span",
    "real",
    "use_count",
]

_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


class LayoutError(RuntimeError):
    """A parameter or gradient no longer matches what the optimizer was built on.

    ``convertible``: the parameter kept its shape, so the optimizer can lay its buckets out
    again and convert the state, as ``load_state_dict`` converts a checkpoint's."""

    convertible = False


def use_count(t: Tensor) -> int:
    """How many tensors share ``t``'s storage (-1 where torch does not expose it)."""
    if _STORAGE_USE_COUNT is None:
        return -1
    return _STORAGE_USE_COUNT(t.untyped_storage()._cdata)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (no import: none can exist before torch.distributed.tensor is)."""
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(t, cls)


def real(t: Tensor) -> Tensor:
    """``t`` itself, or its real view ``(..., 2)`` when it is complex."""
    return torch.view_as_real(t) if t.is_complex() else t


def local_tensor(t: Tensor) -> Tensor:
    """The memory a parameter's math runs on: its local shard if it is a DTensor, as a real
    tensor, detached. ``DTensor._local_tensor`` is what ``to_local()`` returns, without its
    autograd bookkeeping (about 10 us a call, and a plan reads thousands)."""
    if is_dtensor(t):
        return real(t._local_tensor.detach())
    return real(t.detach())


def is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` consecutive elements (in some dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def kernel_refusal(p: Tensor) -> str | None:
    """Why the multi-tensor kernels cannot run ``p`` in place, or None.

    They walk each tensor as ``numel`` consecutive elements from its address, so its memory
    (a DTensor's local shard) must be dense; a view with gaps runs on the foreach backend.
    """
    if not is_dense(local_tensor(p)):
        return "it is a strided view with gaps between its elements (e.g. a column slice)"
    return None


def memory_span(t: Tensor) -> tuple[int, int]:
    """The bytes ``[start, stop)`` that ``t`` (a local, real tensor) may read or write."""
    if t.numel() == 0:
        return (0, 0)
    reach = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return (start, start + (reach + 1) * t.element_size())


def alias_layers(spans: Sequence[tuple[int, int]]) -> list[int]:
    """A layer per span, the lowest one no overlapping span of an earlier index holds.

    Non-overlapping spans (the usual case: every parameter its own storage) are all in
    layer 0. Two parameters over the same memory (``dec.weight.data = enc.weight.data``)
    get layers 0 and 1, in parameter order. Sorting by start makes this O(n log n) for
    models without aliases; only overlapping spans are compared with each other.
    """
    order = sorted((start, stop, i) for i, (start, stop) in enumerate(spans) if stop > start)
    layers = [0] * len(spans)
    overlaps: dict[int, list[int]] = {}
    starts = [start for start, _, _ in order]
    for k, (_, stop, i) in enumerate(order):
        # the spans starting inside this one overlap it (and it overlaps them)
        for _, _, j in order[k + 1 : bisect.bisect_left(starts, stop, lo=k + 1)]:
            overlaps.setdefault(i, []).append(j)
            overlaps.setdefault(j, []).append(i)
    for i in sorted(overlaps):  # parameter order: the first of a set of aliases keeps layer 0
        taken = {layers[j] for j in overlaps[i] if j < i}
        layers[i] = next(layer for layer in range(len(taken) + 1) if layer not in taken)
    return layers


def dense_view(flat: Tensor, start: int, like: Tensor) -> Tensor:
    """A view of ``flat[start:start + n]`` shaped and strided like ``like`` when ``like`` is
    dense (its element order in memory is then the same), contiguous otherwise."""
    strides = like.stride() if is_dense(like) else torch.empty(like.shape, device="meta").stride()
    return flat.as_strided(like.shape, strides, flat.storage_offset() + start)
