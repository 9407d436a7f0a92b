"""Where each parameter's memory is now: the check that precedes every fused pass.

The kernels reach parameters through tables of their addresses (``tables.py``), so before a
pass launches anything the optimizer must know that every parameter is still where the
tables say: ``model.share_memory()`` moves a parameter's storage to shared memory in place,
``p.data = ...`` gives it another, and a stale address would write to memory the model no
longer uses, or no longer owns.

Reading 2000 addresses from Python costs about 100 us (``Tensor.data_ptr`` is a method call
each); the C++ library does the same walk over the Python list in about 12 us
(``csrc/sam_fused_host.cpp``). It is used whenever the CPU library is loaded, and a bucket of
:data:`NATIVE_FROM` parameters or more loads it (building it on first use, as the ``cpp``
backend does); smaller buckets, and machines without a compiler, walk in Python. Both
answer the same question for the same inputs (``tests/test_storage.py``). A DTensor
(FSDP2) has no storage of its own: its local shard's address is read from Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._extension import cpu_extension

__all__ = ["NATIVE_FROM", "ParamAddresses"]

NATIVE_FROM = 128  # parameters: from here on the Python walk costs more than 10 us a pass


def _native() -> Callable[[list[Tensor], Tensor], bool] | None:
    """The C++ walk, if the CPU library is already loaded (it is never built just for this)."""
    module = cpu_extension().loaded_module()
    return getattr(module, "same_addresses", None) if module is not None else None


class ParamAddresses:
    """The parameters' addresses as last recorded, and the check that they still hold."""

    def __init__(self, params: list[Tensor], sharded: bool) -> None:
        self.params = params
        self.sharded = sharded
        self.recorded: list[int] = []
        self._host = torch.zeros(0, dtype=torch.int64)  # the same, for the C++ walk
        if len(params) >= NATIVE_FROM and not sharded:
            cpu_extension().info()  # loads the CPU library (its walk), building it on first use
        self._native = None if sharded else _native()

    def now(self) -> list[int]:
        """Every parameter's address now (its local shard's, for a DTensor)."""
        if self.sharded:
            # DTensor attribute reads go through __torch_function__; the same objects come
            # back without it, about four times faster
            with torch._C.DisableTorchFunctionSubclass():
                return [p._local_tensor.data_ptr() for p in self.params]
        return [p.data_ptr() for p in self.params]

    def record(self, addresses: list[int]) -> None:
        self.recorded = addresses
        self._host = torch.tensor(addresses, dtype=torch.int64)

    def intact(self) -> bool:
        """Whether every parameter is still at its recorded address."""
        if self._native is not None:
            return self._native(self.params, self._host)
        return self.now() == self.recorded

    def __getstate__(self) -> dict[str, Any]:
        # a copy's parameters are other tensors: it records their addresses on its first pass
        return {
            "params": self.params,
            "sharded": self.sharded,
            "recorded": [],
            "_host": torch.zeros(0, dtype=torch.int64),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._native = None if self.sharded else _native()
