"""The table layout's launch unit: many tensors, left where they are, in one kernel launch.

A table bucket does not move its parameters (FSDP2's DTensor shards, shared memory, slices;
``placement.py``), so the fused kernels cannot walk one buffer. Instead, in the spirit of
apex's ``multi_tensor_apply``, a :class:`TableRun` describes the tensors of a plan by their
addresses: for every *role* a kernel reads or writes (``param``, ``grad``, ``backup``, a
state such as ``exp_avg``) an int64 tensor holding each tensor's address, and one *chunk
table* that cuts every tensor into blocks of :data:`CHUNK` elements, one kernel program per
block. A row of the chunk table is ``(slot, start, numel, count index)``: which tensor of
the role tables, where the block starts in it, the tensor's length, and the index of its
update counts in the bucket's ``steps``/``vsteps``. Nothing is copied or re-pointed.

The tables are built once per plan and cached: a plan lives as long as the gradients keep
their addresses (``TablePlans._table_plan`` compares them every pass), and the state roles as
long as the bucket's per-parameter state tensors are the same objects
(``BucketStorage.epoch``). Every tensor whose address is in a table is referenced by the
run or by the bucket, so no address outlives its memory.

The norm statistics write one partial sum per chunk; the number of chunks depends only on
the tensors' lengths, so their sum is as reproducible as the flat layout's.

The C++ CPU backend (``backends/cpp.py``) reads the same role tables but not the chunk
table: its library takes one row ``(0, numel, count index)`` per tensor and cuts the tensors
into its own thread-pool blocks and norm slots (again a function of the lengths alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .placement import LayoutError, real

if TYPE_CHECKING:
    from .layout import Bucket, Plan

__all__ = ["CHUNK", "TablePlans", "TableRun"]

# elements per kernel program. Smaller than the flat kernels' 4096: an address read from a
# table may not be 16-byte aligned, and then every element needs its own 64-bit pointer in
# registers (4096 spilled in the Adam kernel; 1024 leaves 4 elements per thread)
CHUNK = 1024


class TableRun:
    """The tensors ``indices`` of a table bucket as one multi-tensor launch.

    The same interface as the flat layout's :class:`~sam_fused.layout.Run`, so a backend
    launches both alike: ``tensor(bucket, role)`` is what a kernel's pointer argument for
    that role gets (here an address table), ``count(bucket, name)`` the update counts,
    ``programs`` the grid, ``table``/``like`` the chunk table and a tensor of the element type.
    """

    table_mode = True
    numel = 0  # the kernels' length argument: unused, each chunk row carries its tensor's length
    ALIGN_BYTES = 16

    def __init__(
        self, bucket: Bucket, indices: tuple[int, ...], weights: list[Tensor], grads: list[Tensor] | None
    ):
        self.indices = indices
        self.weights = weights  # local real views, referenced so that their addresses stay valid
        self.grads = grads  # None for runs that read no gradient (restores)
        self.like = weights[0] if weights else bucket.steps
        self._bucket_device = bucket.device
        self._chunks: Tensor | None = None
        self._roles: dict[str, tuple[int, Tensor]] = {}
        self._misaligned: set[str] = set()  # roles with an address that is not 16-byte aligned

    # ------------------------------------------------------------------ the grid
    @property
    def table(self) -> Tensor:
        """The chunk table ``(C, 4)``, int64, on the bucket's device (built on first use)."""
        if self._chunks is None:
            rows = []
            for slot, (i, w) in enumerate(zip(self.indices, self.weights)):
                n = w.numel()
                rows.extend((slot, start, n, i) for start in range(0, n, CHUNK))
            self._chunks = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(self._bucket_device)
        return self._chunks

    def programs(self, flat_block: int = CHUNK) -> int:
        """Kernel programs (and partial sums) of one launch: one per chunk."""
        return self.table.shape[0]

    @staticmethod
    def block(flat_block: int) -> int:
        """The kernels' BLOCK for this run: the chunk (``flat_block`` is a flat run's)."""
        return CHUNK

    @property
    def layout_code(self) -> int:
        """The kernels' TABLE constexpr: 2 when every address in the tables built so far is
        16-byte aligned (the kernels then load vectors), 1 otherwise (kernels/common.py)."""
        return 1 if self._misaligned else 2

    # ------------------------------------------------------------------ roles
    def tensor(self, bucket: Bucket, role: str) -> Tensor:
        """The address table of ``role`` (int64, one entry per tensor, on the device)."""
        if role == "param":
            return self._addresses(role, self.weights, None)
        if role == "grad":
            if self.grads is None:
                raise RuntimeError("this table run reads no gradients")
            return self._addresses(role, self.grads, None)
        held = self._roles.get(role)
        if held is not None and held[0] == bucket.epoch:
            return held[1]
        # state and scratch (backup, momentum_buffer, exp_avg, ...): the bucket's per-parameter
        # tensors, zeros where never written (each kernel's first-update rule ignores them)
        tensors = [bucket.state_tensor(role, i) for i in self.indices]
        return self._addresses(role, tensors, bucket.epoch)

    def tensors(self, bucket: Bucket, role: str) -> list[Tensor]:
        """The tensors of a state or scratch ``role``, in slot order (for host-side ops)."""
        return [bucket.state_tensor(role, i) for i in self.indices]

    def _addresses(self, role: str, tensors: list[Tensor], epoch: int | None) -> Tensor:
        held = self._roles.get(role)
        if held is not None and epoch is None:
            return held[1]
        addresses = [t.data_ptr() for t in tensors]
        if any(a % self.ALIGN_BYTES for a in addresses):
            self._misaligned.add(role)
        else:
            self._misaligned.discard(role)
        table = torch.tensor(addresses, dtype=torch.int64).to(self._bucket_device)
        self._roles[role] = (-1 if epoch is None else epoch, table)
        return table

    def count(self, bucket: Bucket, name: str) -> Tensor:
        """``steps`` or ``vsteps`` whole: each chunk row says which entry is its tensor's."""
        return getattr(bucket, name)


class TablePlans:
    """The table layout's part of :class:`~sam_fused.layout.Bucket`: a pass's plan is reused
    while every parameter and gradient is where it was, else checked and rebuilt."""

    def _addresses(self) -> tuple[list[int], list[int]]:
        """Where each parameter's and gradient's local memory is now (0: no gradient)."""
        if self.sharded:
            # DTensor's attribute reads go through __torch_function__ (about a quarter of a
            # microsecond each, thousands per pass); the same objects come back without it
            with torch._C.DisableTorchFunctionSubclass():
                grads_now = [p.grad for p in self.params]
                params = [p._local_tensor.data_ptr() for p in self.params]
                grads = [0 if g is None else g._local_tensor.data_ptr() for g in grads_now]
            return params, grads
        grads_now = [p.grad for p in self.params]  # one read of p.grad each
        params = [p.data_ptr() for p in self.params]
        try:
            grads = [0 if g is None else g.data_ptr() for g in grads_now]
        except RuntimeError:  # a sparse gradient has no data pointer; the plan check refuses it
            grads = [
                0 if p.grad is None else -1 if p.grad.is_sparse else p.grad.data_ptr() for p in self.params
            ]
        return params, grads

    def _table_plan(self) -> Plan:
        """The plan of a table bucket: reused while every parameter and gradient is where it
        was (O(n) address reads, no per-tensor checks), else validated and rebuilt."""
        addresses = self._addresses()
        known = self._plan_addresses
        if self._plan is not None and addresses == known:
            return self._plan
        params_moved = known is None or addresses[0] != known[0]
        taking_part = self._taking_part(check_all=True, check_params=params_moved)
        dense = not self.backend.capabilities.strided
        if params_moved:
            self._weights = [self.weight(i) for i in range(len(self.params))]
            self.cache.pop("all_run", None)
            if dense:
                self._check_state_layout()
        weights = [self._weights[i] for i in taking_part]
        grads = []
        for i, w in zip(taking_part, weights):
            g = self.grad(i)
            if dense and g.stride() != w.stride():
                g = self._regather_grad(i, w)
            grads.append(g)
        indices = tuple(taking_part)
        self._plan = self._new_plan(indices, [TableRun(self, indices, weights, grads)])
        self._plan_addresses = self._addresses()
        return self._plan

    def _check_state_layout(self) -> None:
        """Parameters that moved (``p.data`` replaced) must keep the memory layout their
        state tensors have: the kernels walk both in memory order."""
        for name, tensors in self._tensors.items():
            for i, held in enumerate(tensors):
                if held is not None and held.stride() != self._weights[i].stride():
                    raise LayoutError(
                        f"parameter {i} of param group {self.group_index} changed its memory layout "
                        f"(strides {self._weights[i].stride()}, its state {name!r} has {held.stride()}) "
                        "after the optimizer was built; convert the model (e.g. channels_last) first"
                    )

    def _regather_grad(self, i: int, w: Tensor) -> Tensor:
        """A gradient laid out unlike its parameter: the kernels walk both in memory order, so it
        is copied into the parameter's layout and ``p.grad`` re-pointed (as the flat layout
        gathers foreign gradients)."""
        p = self.params[i]
        if self.sharded:
            raise LayoutError(
                f"the gradient of parameter {i} of param group {self.group_index} has local strides "
                f"{p.grad._local_tensor.stride()}, its parameter {p._local_tensor.stride()}; SAM's "
                "multi-tensor kernels need them equal (FSDP2 makes them so)"
            )
        copy = torch.empty_like(p.detach())  # the parameter's strides
        copy.copy_(p.grad)
        p.grad = copy
        return real(copy)
