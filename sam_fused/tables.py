"""The fused kernels' launch unit: many tensors, left where they are, in one launch.

Parameters keep their own storage (``placement.py``), so a kernel cannot walk one buffer.
Instead, in the spirit of apex's ``multi_tensor_apply``, a :class:`TableRun` describes the
tensors of a plan by their addresses: for every *role* a kernel reads or writes (``param``,
``grad``, ``backup``, a state such as ``exp_avg``) an int64 tensor holding each tensor's
address, and one *chunk table* that cuts every tensor into blocks of :data:`CHUNK`
elements, one kernel program per block. A row of the chunk table is
``(slot, start, numel, count index)``: which tensor of the role tables, where the block
starts in it, the tensor's length, and the index of its update counts in the bucket's
``steps``/``vsteps``. Nothing is copied or re-pointed.

The ``param`` role holds the parameters' own addresses (checked before every pass:
``addresses.py``); ``grad`` the gathered gradients' (slices of the bucket's flat gradient
buffer) or, for FSDP2's DTensors, the local gradient shards'; every other role the
bucket's own flat buffers (``storage.py``), which never move. Every tensor whose address is
in a table is referenced by the run or by the bucket, so no address outlives its memory.

The norm statistics write one partial sum per chunk; the number of chunks depends only on
the tensors' lengths, so their sum is reproducible bit for bit.

The C++ CPU backend (``backends/cpp.py``) reads the same role tables but not the chunk
table: its library takes one row ``(0, numel, count index)`` per tensor
(:meth:`TableRun.tensor_rows`) and cuts the tensors into its own thread-pool blocks and
norm slots (again a function of the lengths alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .storage import Storage

__all__ = ["ALIGNED", "CHUNK", "TableRun"]

# elements per kernel program. An address read from a table may not be 16-byte aligned,
# and then every element needs its own 64-bit pointer in registers (4096 spilled in the
# Adam kernel; 1024 leaves 4 elements per thread)
CHUNK = 1024
ALIGNED = 2  # TableRun.layout_code when every address is 16-byte aligned (kernels/common.py)
_ALIGN_BYTES = 16


class TableRun:
    """The tensors ``indices`` of a bucket as one multi-tensor launch.

    ``weights`` are the parameters' local real tensors, ``grads`` their gradients' (None for
    a run that reads no gradient: restores, noise), both referenced so that their
    addresses stay valid; ``storage`` holds every other role.
    """

    def __init__(
        self, storage: Storage, indices: tuple[int, ...], weights: list[Tensor], grads: list[Tensor] | None
    ) -> None:
        self.indices = indices
        self.weights = weights
        self.grads = grads
        self.storage = storage
        self.device = storage.device
        self.like = weights[0] if weights else storage.steps  # a tensor of the element type
        self._chunks: Tensor | None = None
        self._rows: Tensor | None = None
        self._centralize: tuple[Tensor, Tensor, list[int]] | None = None
        self._roles: dict[str, Tensor] = {}
        # the bucket's own buffers are 16-byte aligned slice by slice (storage.ALIGN); the
        # parameters and, under FSDP2, the gradients are wherever their owners put them
        foreign = weights + (grads or [])
        self.aligned = all(t.data_ptr() % _ALIGN_BYTES == 0 for t in foreign)

    @property
    def empty(self) -> bool:
        return not self.indices

    # ------------------------------------------------------------------ the grid
    @property
    def table(self) -> Tensor:
        """The chunk table ``(C, 4)``, int64, on the bucket's device (built on first use)."""
        if self._chunks is None:
            rows = []
            for slot, (i, w) in enumerate(zip(self.indices, self.weights)):
                n = w.numel()
                rows.extend((slot, start, n, i) for start in range(0, n, CHUNK))
            self._chunks = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(self.device)
        return self._chunks

    def programs(self) -> int:
        """Kernel programs (and partial sums) of one launch: one per chunk."""
        return self.table.shape[0]

    def tensor_rows(self) -> Tensor:
        """One row ``(0, numel, count index)`` per tensor: the C++ library's run table (CPU)."""
        if self._rows is None:
            rows = [(0, w.numel(), i) for i, w in zip(self.indices, self.weights)]
            self._rows = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
        return self._rows

    @property
    def layout_code(self) -> int:
        """The kernels' TABLE constexpr: 2 when every address in the run's tables is 16-byte
        aligned (the kernels then load vectors), 1 otherwise (kernels/common.py)."""
        return ALIGNED if self.aligned else 1

    # ------------------------------------------------------------------ roles
    def tensors(self, role: str) -> list[Tensor]:
        """The tensors of ``role`` in slot order."""
        if role == "param":
            return self.weights
        if role == "grad":
            if self.grads is None:
                raise RuntimeError("this table run reads no gradients")
            return self.grads
        return self.storage.views(role, self.indices)

    def addresses(self, role: str) -> Tensor:
        """The address table of ``role`` (int64, one entry per tensor, on the device)."""
        table = self._roles.get(role)
        if table is None:
            addresses = [t.data_ptr() for t in self.tensors(role)]
            table = self._roles[role] = torch.tensor(addresses, dtype=torch.int64).to(self.device)
        return table

    def centralize_rows(self) -> tuple[Tensor, Tensor, list[int]]:
        """GCSAM's rows of this run's gradients: (byte addresses, lengths, loose indices).

        A contiguous gradient of two or more dimensions has ``shape[0]`` rows of
        ``numel / shape[0]`` consecutive elements (a DTensor's local shard has whole rows:
        FSDP2 splits dimension 0); gradients of another memory layout (``loose``, bucket
        indices) are centralized one by one. Built on first use.
        """
        if self._centralize is None:
            starts: list[int] = []
            lengths: list[int] = []
            loose: list[int] = []
            for i, g in zip(self.indices, self.tensors("grad")):
                if g.dim() <= 1 or g.numel() == 0:
                    continue
                if not g.is_contiguous():
                    loose.append(i)
                    continue
                n_rows, row = g.shape[0], g.numel() // g.shape[0]
                base, size = g.data_ptr(), g.element_size()
                starts.extend(range(base, base + n_rows * row * size, row * size))
                lengths.extend([row] * n_rows)
            self._centralize = (
                torch.tensor(starts, dtype=torch.int64, device=self.device),
                torch.tensor(lengths, dtype=torch.int32, device=self.device),
                loose,
            )
        return self._centralize
