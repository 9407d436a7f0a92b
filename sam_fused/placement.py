"""Which parameters may move into a flat buffer, and the views that put them there.

Re-pointing ``p.data`` into a bucket's flat buffer is safe only for a parameter that alone
owns exactly its own dense storage: a slice of a larger tensor would be cut off from it,
shared memory must stay shared, a storage another tensor aliases would silently stop being
shared, and FSDP2 owns its DTensor shards. :func:`flat_layout_refusal` says which rule a
parameter breaks; such parameters run in table buckets, where nothing moves: through the
multi-tensor kernels when their memory is dense (:func:`table_layout_refusal`), parameter by
parameter (the reference backend) when it is not.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHEAP_CHECK",
    "LayoutError",
    "dense_view",
    "flat_layout_refusal",
    "is_dtensor",
    "real",
    "table_layout_refusal",
    "use_count",
]

_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
CHEAP_CHECK = _STORAGE_USE_COUNT is not None  # whether a plan can be checked in O(1)


class LayoutError(RuntimeError):
    """A parameter or gradient no longer matches the layout the optimizer built."""


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


def _is_dense(p: Tensor) -> bool:
    """Whether ``p`` covers exactly ``numel`` consecutive elements (in some dim order)."""
    if p.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(p.stride(), p.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_layout_refusal(p: Tensor) -> str | None:
    """Why ``p`` cannot move into a flat buffer (re-pointing its storage), or None."""
    if is_dtensor(p):
        return "it is a DTensor (FSDP2), whose local shards FSDP2 owns"
    # two references: the parameter's own and the temporary that asks; more means another
    # tensor aliases this storage and would silently stop seeing the parameter's values
    aliased = use_count(p) > 2
    view = real(p.detach())
    whole = p.storage_offset() == 0 and p.untyped_storage().nbytes() == view.numel() * view.element_size()
    if not (_is_dense(view) and whole):
        return (
            "it is a view of a larger tensor (a slice, or a parameter another sam_fused optimizer already "
            "holds in its flat buffer): re-pointing it would cut it off from that tensor"
        )
    if p.device.type == "cpu" and p.is_shared():
        return "it is in shared memory (model.share_memory()), which must stay shared"
    if aliased:
        return "another tensor shares its storage and would stop seeing its values"
    return None


def table_layout_refusal(p: Tensor) -> str | None:
    """Why the multi-tensor (table) kernels cannot run ``p`` in place, or None.

    They walk each tensor as ``numel`` consecutive elements from its address, so its memory
    (a DTensor's local shard) must be dense; a strided view runs in a per-parameter bucket.
    """
    local = real(p.to_local() if is_dtensor(p) else p.detach())
    if not _is_dense(local):
        return "it is a strided view with gaps between its elements (e.g. a column slice)"
    return None


def dense_view(flat: Tensor, start: int, like: Tensor) -> Tensor:
    """A view of ``flat[start:start + n]`` shaped and strided like ``like`` (complex too)."""
    shape = real(like)
    view = flat.as_strided(shape.shape, shape.stride(), flat.storage_offset() + start)
    return torch.view_as_complex(view) if like.is_complex() else view
