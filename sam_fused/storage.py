"""What a bucket owns: flat buffers for everything the optimizer keeps, and update counts.

Parameters stay where they are (``placement.py``); what the optimizer itself keeps lives in
one flat buffer per *role*: ``backup`` (the weights before the perturbation), ``grad`` (the
gradients, gathered once so that backward accumulates into the buffer), the base
optimizer's state (``momentum_buffer``, ``exp_avg``, ...), the variant's running state and
per-step scratch (``first_grad``, ``state_prev``, ``rsam_delta``). Parameter ``i`` owns the
slice ``[offsets[i], offsets[i] + numel)`` of every buffer, starting at a multiple of
:data:`ALIGN` elements so that every slice is 16-byte aligned; its view is shaped and
strided like the parameter (contiguous where the parameter has gaps), so a kernel walks a
parameter and its slices in the same memory order. A buffer is allocated, zero-filled, the
first time its role is used, and never reallocated: views and the kernels' address tables
stay valid for the bucket's life.

Two update counts per parameter live on the device: ``steps`` (base-optimizer updates that
kept state: Adam's ``t``, SGD's "first update") and ``vsteps`` (updates of the variant's
running state). A skipped step leaves them alone on the device without a host sync; the
host reads them only when someone looks at ``opt.state`` (one sync, cached).

The buckets are the one owner of optimizer state; ``opt.state`` only shows it (``state.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .placement import dense_view

__all__ = ["ALIGN", "SCRATCH", "Storage"]

ALIGN = 16  # elements; 16 fp16 elements = 32 bytes, so every slice starts 16-byte aligned
# roles a step writes before it reads them: nothing of them outlives a step
SCRATCH = frozenset({"grad", "backup", "first_grad", "state_prev", "rsam_delta"})


class Storage:
    """The flat buffers, per-parameter views and update counts of one bucket.

    ``shapes`` are the parameters' local real tensors (a DTensor's shard, a complex
    parameter's real view): only their shapes, strides and dtype are used.
    """

    def __init__(self, tensors: list[Tensor], device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.like = [torch.empty_strided(t.shape, t.stride(), dtype=dtype, device="meta") for t in tensors]
        self.numels = [t.numel() for t in tensors]
        self.offsets: list[int] = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += -(-n // ALIGN) * ALIGN
        self.total = max(total, ALIGN)
        self.buffers: dict[str, Tensor] = {}
        self._views: dict[str, list[Tensor | None]] = {}
        n = len(tensors)
        self.steps = torch.zeros(n, dtype=torch.float32, device=device)
        self.vsteps = torch.zeros_like(self.steps)
        self.extra: list[dict[Any, Any]] = [{} for _ in range(n)]  # state of a base sam_fused does not fuse
        # entries written from outside a step (torch's own step, a checkpoint, opt.state): they
        # exist even while their count is 0, as torch.optim's do right after initialization
        self.written = [bytearray(n), bytearray(n)]  # base, variant
        self._host_counts: tuple[list[float], list[float]] | None = None

    # ------------------------------------------------------------------ buffers and views
    def buffer(self, role: str) -> Tensor:
        """The flat buffer of ``role`` (zeros when first used)."""
        buf = self.buffers.get(role)
        if buf is None:
            buf = self.buffers[role] = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        return buf

    def view(self, role: str, i: int) -> Tensor:
        """Parameter ``i``'s slice of ``role``, shaped and strided like the parameter (cached)."""
        views = self._views.get(role)
        if views is None:
            views = self._views[role] = [None] * len(self.numels)
        view = views[i]
        if view is None:
            view = views[i] = dense_view(self.buffer(role), self.offsets[i], self.like[i])
        return view

    def views(self, role: str, indices: tuple[int, ...] | list[int]) -> list[Tensor]:
        return [self.view(role, i) for i in indices]

    def span(self, role: str, indices: tuple[int, ...]) -> Tensor | None:
        """The one slice of ``role``'s buffer that covers exactly ``indices`` with their
        padding (they are consecutive), or None when they are not consecutive."""
        if not indices or list(indices) != list(range(indices[0], indices[-1] + 1)):
            return None
        stop = self.offsets[indices[-1]] + -(-self.numels[indices[-1]] // ALIGN) * ALIGN
        return self.buffer(role)[self.offsets[indices[0]] : stop]

    # ------------------------------------------------------------------ counts
    def host_counts(self) -> tuple[list[float], list[float]]:
        """``steps`` and ``vsteps`` on the host (one sync, cached until they change)."""
        if self._host_counts is None:
            self._host_counts = (self.steps.tolist(), self.vsteps.tolist())
        return self._host_counts

    def counts_moved(self) -> None:
        """The device counts changed (a step, a checkpoint, ``opt.state`` edits)."""
        self._host_counts = None

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_views"] = {}  # views are derived; a copy makes its own over its own buffers
        state["_host_counts"] = None
        return state
