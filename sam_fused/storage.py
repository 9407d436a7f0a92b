"""What a bucket owns besides its parameters: optimizer state and update counts.

The buckets are the one owner of optimizer state; ``opt.state`` only shows it
(``state.py``). A flat bucket keeps each state tensor as one flat buffer (a parameter's
entry is a view of its slice); a per-parameter bucket keeps one tensor per parameter. Two
update counts per parameter live on the device: ``steps`` (base-optimizer updates that kept
state: Adam's ``t``, SGD's "first update") and ``vsteps`` (updates of the variant's running
state). On the device, a skipped step leaves them alone without a host sync; the host
reads them only when someone looks at ``opt.state`` (one sync per bucket, cached).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["BucketStorage"]


class BucketStorage:
    """The state half of :class:`~sam_fused.layout.Bucket` (a base class of it)."""

    params: list[Tensor]
    flat: bool
    device: torch.device
    dtype: torch.dtype

    def __init__(self) -> None:
        n = len(self.params)
        self.steps = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.vsteps = torch.zeros_like(self.steps)
        self.extra: list[dict[Any, Any]] = [{} for _ in range(n)]  # state of a base sam_fused does not fuse
        # entries written from outside a step (torch's own step, a checkpoint, opt.state): they
        # exist even while their count is 0, as torch.optim's do right after initialization
        self.written = [bytearray(n), bytearray(n)]  # base, variant
        self._tensors: dict[str, list[Tensor | None]] = {}  # per-parameter storage (state, scratch)
        # bumped whenever a per-parameter tensor is created or dropped: the multi-tensor
        # kernels' address tables of a table bucket are valid while it stays (tables.py)
        self.epoch = 0
        self.state_flat: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ per-parameter access
    def weight(self, i: int) -> Tensor:
        """Parameter ``i`` as the math sees it (detached; local shard; real view)."""
        p = self.params[i]
        return self._local(p).detach() if self.sharded else self._local(p.detach())

    def grad(self, i: int) -> Tensor | None:
        g = self.params[i].grad
        return None if g is None else self._local(g)

    def state_tensor(self, name: str, i: int) -> Tensor:
        """Parameter ``i``'s slice of state ``name`` (zeros where it was never written)."""
        if self.flat:
            return self.state_view(name, i)
        held = self.tensors(name)[i]
        if held is None:
            # zeros_like keeps the parameter's strides: the kernels walk both in memory order
            held = self.tensors(name)[i] = torch.zeros_like(self.weight(i))
            self.epoch += 1
        return held

    def store_state(self, name: str, i: int, value: Tensor) -> None:
        """Write ``value`` into state ``name`` of parameter ``i`` (in place where it exists)."""
        held = self.state_view(name, i) if self.flat else self.tensors(name)[i]
        if held is None:
            held = self.state_tensor(name, i)  # laid out like the parameter, whatever value's strides
        held.copy_(value)

    def clear_state(self, name: str, i: int) -> None:
        """State ``name`` of parameter ``i`` is fresh again: zeros."""
        if self.flat:
            if name in self.state_flat:
                self.state_view(name, i).zero_()
        elif name in self._tensors:
            self._tensors[name][i] = None
            self.epoch += 1

    def tensors(self, name: str) -> list[Tensor | None]:
        """Per-parameter tensors ``name`` of a per-parameter bucket (state, backups, scratch)."""
        return self._tensors.setdefault(name, [None] * len(self.params))

    # ------------------------------------------------------------------ counts
    def host_counts(self) -> tuple[list[float], list[float]]:
        """``steps`` and ``vsteps`` on the host (one sync, cached until they change)."""
        if self._host_counts is None:
            self._host_counts = (self.steps.tolist(), self.vsteps.tolist())
        return self._host_counts

    def counts_moved(self) -> None:
        """The device counts changed in a way that keeps the update classes exact."""
        self._host_counts = None

    def counts_set(self) -> None:
        """The counts were set from outside a step (a checkpoint, ``opt.state`` edits, torch's
        own step): before the next plan, equal counts form an update class again."""
        self._host_counts = None
        self._recount = True

    def _classes_from_counts(self) -> None:
        steps, vsteps = self.host_counts()
        ids: dict[tuple[float, float], int] = {}
        self.update_class = [ids.setdefault(c, len(ids)) for c in zip(steps, vsteps)]
        self.last_update_key = None
        self._plan = None
        self._recount = False
