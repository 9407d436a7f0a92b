"""Parameter buckets and the per-pass plans the backends launch from.

A *bucket* is the parameters of one param group with one (real) dtype and one alias layer
(``placement.alias_layers``; 0 unless parameters share memory). Parameters stay where they
are: the bucket never re-points ``p.data``, so the model, its ``state_dict()`` and every
checkpoint tool see exactly the tensors they would see with ``torch.optim``. What the
bucket owns (backups, optimizer state, the gathered gradients) lives in its flat buffers
(``storage.py``).

Every pass builds (or reuses) a :class:`Plan`: which parameters take part (those with a
gradient) and one :class:`~sam_fused.tables.TableRun` over them, the unit of one kernel
launch. The plan is cached; a pass reuses it after two checks:

* the gradients are unchanged in O(1): each taking-part gradient is a view of the bucket's
  flat gradient buffer (gathered there on first sight, so that backward accumulates into
  it), and replacing or dropping a ``p.grad`` releases one reference to that buffer's
  storage; the parameters the plan left out still have no gradient;
* every parameter is still at the address the run's tables hold (``addresses.py``: one C++
  walk over the list, about 6 ns a parameter).

When a check fails, the slow path validates every parameter and gradient (before anything
changes), gathers new gradients and builds a new plan. A parameter that moved with its
shape, dtype, device and strides intact (``model.share_memory()``, ``p.data = p.data.clone()``)
is followed; one that changed any of them is refused with :class:`LayoutError`.
FSDP2's DTensor parameters keep their gradients where FSDP2 puts them: their addresses are
read every pass instead (from Python, as DTensors have no storage of their own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .addresses import ParamAddresses
from .placement import LayoutError, dense_view, is_dtensor, local_tensor, real, use_count
from .storage import SCRATCH, Storage
from .tables import TableRun

__all__ = ["Bucket", "LayoutError", "Plan"]

_RUN_CACHE = 8  # plans (participation patterns) kept per bucket


@dataclass
class Plan:
    """Which parameters of a bucket take part in this pass, and the launch that covers them."""

    key: bytes  # one byte per parameter: 1 if it takes part
    indices: tuple[int, ...]
    run: TableRun
    epoch: int  # the bucket's address epoch the run's tables belong to
    mask: Tensor | None = None  # float 0/1 per parameter, on the device (built lazily)
    complement: TableRun | None = None  # the parameters left out (built lazily)
    cache: dict[str, Any] = field(default_factory=dict)  # what a backend derives from the plan

    @property
    def empty(self) -> bool:
        return not self.indices


class Bucket:
    """The parameters of one group with one dtype and alias layer, and what SAM keeps for them.

    Attributes:
        params: the parameters, in group order.
        group_index: which ``param_groups`` entry they belong to.
        layer: the alias layer (``placement.alias_layers``): buckets are perturbed in layer
            order and restored in reverse.
        backend: the backend object that runs this bucket's math.
        storage: the flat buffers, views and update counts (``storage.py``).
    """

    def __init__(self, params: list[Tensor], group_index: int, backend, layer: int = 0) -> None:
        self.params = params
        self.group_index = group_index
        self.backend = backend
        self.layer = layer
        self.sharded = is_dtensor(params[0])
        local = [local_tensor(p) for p in params]
        self.device = local[0].device
        self.dtype = local[0].dtype  # the real dtype of the math and the buffers
        # what each parameter must stay: moved memory is followed, nothing else
        self.built = [(p.dtype, p.device, t.shape, t.stride()) for p, t in zip(params, local)]
        self.storage = Storage(local, self.device, self.dtype)
        self.addresses = ParamAddresses(params, self.sharded)
        self._reset_caches()
        self.addresses.record(self.addresses.now())  # the layout (alias layers) was made for these

    def _reset_caches(self) -> None:
        self.epoch = 0  # bumped whenever a parameter's address changes: older runs are stale
        self.moved = False  # set with it, cleared by the engine once it has looked (aliases)
        self._plan: Plan | None = None
        self._runs: dict[bytes, TableRun] = {}  # gathered gradients: a run per participation
        self._watch: list[Tensor] = []  # parameters the plan left out
        self._expected_count = -1
        self._grad_addresses: list[int] | None = None  # FSDP2: where the plan's gradients were
        self.cache: dict[str, Any] = {}  # what a backend derives from the bucket (device scalars)

    # ------------------------------------------------------------------ per-parameter access
    @property
    def steps(self) -> Tensor:
        return self.storage.steps

    @property
    def vsteps(self) -> Tensor:
        return self.storage.vsteps

    @property
    def numels(self) -> list[int]:
        return self.storage.numels

    @property
    def extra(self) -> list[dict[Any, Any]]:
        return self.storage.extra

    @property
    def written(self) -> list[bytearray]:
        return self.storage.written

    def weight(self, i: int) -> Tensor:
        """Parameter ``i`` as the math sees it: detached, its local shard, a real view."""
        return local_tensor(self.params[i])

    def grad(self, i: int) -> Tensor | None:
        g = self.params[i].grad
        return None if g is None else local_tensor(g)

    def state_tensor(self, name: str, i: int) -> Tensor:
        """Parameter ``i``'s slice of state or scratch ``name`` (zeros where never written)."""
        return self.storage.view(name, i)

    def store_state(self, name: str, i: int, value: Tensor) -> None:
        """Write ``value`` into state ``name`` of parameter ``i``."""
        self.storage.view(name, i).copy_(value)

    def clear_state(self, name: str, i: int) -> None:
        """State ``name`` of parameter ``i`` is fresh again: zeros."""
        if name in self.storage.buffers:
            self.storage.view(name, i).zero_()

    def host_counts(self) -> tuple[list[float], list[float]]:
        return self.storage.host_counts()

    def counts_moved(self) -> None:
        self.storage.counts_moved()

    counts_set = counts_moved  # counts written from outside a step: nothing more is derived from them

    # ------------------------------------------------------------------ plans
    def plan(self) -> Plan:
        """The plan for this pass; raises LayoutError/ValueError before changing anything."""
        if self._plan is not None and self._intact():
            return self._plan
        return self._rebuild_plan()

    def _intact(self) -> bool:
        """The cheap check that the cached plan still describes the parameters."""
        if self.sharded:  # FSDP2 places gradients itself: read where they are
            return self._sharded_grads() == self._grad_addresses and self.addresses.intact()
        return self._grads_intact() and self.addresses.intact()

    def _sharded_grads(self) -> list[int]:
        with torch._C.DisableTorchFunctionSubclass():
            grads = [p.grad for p in self.params]
            return [0 if g is None else g._local_tensor.data_ptr() for g in grads]

    def follow(self) -> None:
        """Validate every parameter (not the gradients); if one moved, the tables follow it."""
        self._follow_params()

    def _follow_params(self) -> None:
        """Validate every parameter; if one moved, the address tables are made anew."""
        for i, p in enumerate(self.params):
            self._check_param(i, p)
        now = self.addresses.now()
        if now != self.addresses.recorded:  # the first pass, or a parameter moved
            self.addresses.record(now)
            self.epoch += 1
            self.moved = True
            self._plan = None
            self._runs.clear()
            self.cache.pop("all_run", None)

    def _rebuild_plan(self) -> Plan:
        # validate everything first: a refused pass must change nothing
        self._follow_params()
        taking_part = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is not None:
                self._check_grad(i, p, g)
                taking_part.append(i)
        indices = tuple(taking_part)
        key = bytes(1 if p.grad is not None else 0 for p in self.params)
        weights = [self.weight(i) for i in indices]
        if self.sharded:
            run = TableRun(self.storage, indices, weights, [self.grad(i) for i in indices])
            self._grad_addresses = self._sharded_grads()
        else:
            self._gather(indices)
            run = self._runs.get(key)
            if run is None:
                if len(self._runs) >= _RUN_CACHE:
                    self._runs.clear()
                run = self._runs[key] = TableRun(
                    self.storage, indices, weights, self.storage.views("grad", indices)
                )
            self._expected_count = use_count(self.storage.buffer("grad"))
        self._watch = [p for p in self.params if p.grad is None]
        self._plan = Plan(key, indices, run, self.epoch)
        return self._plan

    def refresh(self, plan: Plan) -> Plan:
        """``plan`` (from an earlier pass of this step) with tables of the parameters' current
        addresses: the plan itself while none moved, else the current plan when it covers the
        same parameters, else a new run over them (for restores: it reads no gradients)."""
        if plan.epoch == self.epoch:
            return plan
        self._follow_params()
        current = self._plan
        if current is not None and current.key == plan.key and current.epoch == self.epoch:
            return current
        run = TableRun(self.storage, plan.indices, [self.weight(i) for i in plan.indices], None)
        return Plan(plan.key, plan.indices, run, self.epoch)

    def _gather(self, indices: tuple[int, ...]) -> None:
        """Copy each gradient that is not yet a slice of the flat gradient buffer into it, and
        point ``p.grad`` there (the next backward then accumulates in place). ``p.grad`` gets
        a view of its own: dropping or replacing it then releases a reference to the
        buffer's storage, which is what the O(1) check counts."""
        buffer = self.storage.buffer("grad")
        for i in indices:
            p, g = self.params[i], real(self.params[i].grad)
            slot = self.storage.view("grad", i)
            if g.data_ptr() == slot.data_ptr() and g.stride() == slot.stride():
                continue
            slot.copy_(g)
            own = dense_view(buffer, self.storage.offsets[i], slot)
            p.grad = torch.view_as_complex(own) if p.is_complex() else own

    def _check_param(self, i: int, p: Tensor) -> None:
        dtype, device, shape, stride = self.built[i]
        local = local_tensor(p)
        if p.dtype != dtype or p.device != device or local.shape != shape or local.stride() != stride:
            error = LayoutError(
                f"parameter {i} of param group {self.group_index} is no longer the tensor the optimizer "
                f"was built on: it is now {p.dtype}{list(local.shape)} (strides {local.stride()}) on "
                f"{p.device}, was {dtype}{list(shape)} (strides {stride}) on {device}. The optimizer follows "
                "a parameter whose memory moves (model.share_memory(), p.data = p.data.clone()), but its "
                "state cannot follow a new shape, dtype, device or memory layout: build the optimizer "
                "after moving or casting the model (model.to(...), .half(), channels_last), or build a "
                "new one and load this one's state_dict() into it"
            )
            error.convertible = local.shape == shape
            raise error

    def _check_grad(self, i: int, p: Tensor, g: Tensor) -> None:
        if g.is_sparse:
            raise ValueError(
                f"parameter {i} of param group {self.group_index} has a sparse gradient; "
                "SAM needs dense gradients (use sparse=False in nn.Embedding)"
            )
        if g.shape != p.shape or g.device != p.device or g.dtype != p.dtype:
            raise ValueError(
                f"the gradient of parameter {i} of param group {self.group_index} is "
                f"{g.dtype}{list(g.shape)} on {g.device}, but the parameter is "
                f"{p.dtype}{list(p.shape)} on {p.device}"
            )
        if self.sharded and local_tensor(g).stride() != local_tensor(p).stride():
            raise LayoutError(
                f"the gradient of parameter {i} of param group {self.group_index} has local strides "
                f"{local_tensor(g).stride()}, its parameter {local_tensor(p).stride()}; SAM's "
                "multi-tensor kernels need them equal (FSDP2 makes them so)"
            )

    def complement_run(self, plan: Plan) -> TableRun | None:
        """A run over the parameters the plan leaves out (cached on the plan), or None."""
        if plan.complement is None:
            left_out = tuple(i for i in range(len(self.params)) if not plan.key[i])
            weights = [self.weight(i) for i in left_out]
            plan.complement = TableRun(self.storage, left_out, weights, None)
        return None if plan.complement.empty else plan.complement

    def all_run(self) -> TableRun:
        """A run over every parameter (RSAM's noise and its restore move them all)."""
        if not self.addresses.intact():
            self._follow_params()
        run = self.cache.get("all_run")
        if run is None:
            indices = tuple(range(len(self.params)))
            run = self.cache["all_run"] = TableRun(
                self.storage, indices, [self.weight(i) for i in indices], None
            )
        return run

    def mask_of(self, plan: Plan) -> Tensor:
        """The plan's participation as a float 0/1 tensor on the device (cached)."""
        if plan.mask is None:
            plan.mask = torch.tensor(list(plan.key), dtype=torch.float32, device=self.device)
        return plan.mask

    # ------------------------------------------------------------------ gradients
    def zero_grad(self, set_to_none: bool | None) -> None:
        """Zero gradients in place (default) or set them to None (``set_to_none=True``)."""
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        if not self.sharded and self._plan is not None and self._grads_intact():
            self.storage.buffers["grad"].zero_()  # every gradient is a view of it
            return
        for p in self.params:
            g = p.grad
            if g is not None:
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                g.zero_()

    def _grads_intact(self) -> bool:
        """O(1): every taking-part gradient is still its slice of the gradient buffer (one
        that was replaced or dropped released its reference to the buffer's storage; the
        first and last are looked at too, in case the caller keeps the old ones alive), and
        the parameters left out still have none."""
        grads = self.storage.buffers.get("grad")
        if grads is None or use_count(grads) != self._expected_count:
            return False
        indices = self._plan.indices
        for i in (indices[0], indices[-1]) if indices else ():
            g = self.params[i].grad
            if g is None or g.is_sparse or g.data_ptr() != self.storage.view("grad", i).data_ptr():
                return False
        return all(p.grad is None for p in self._watch)

    # ------------------------------------------------------------------ moving state
    def export_state(self, i: int) -> dict[str, Any]:
        """Parameter ``i``'s persistent state (copies), for a bucket laid out anew."""
        buffers = self.storage.buffers
        return {
            "tensors": {role: self.storage.view(role, i).clone() for role in buffers if role not in SCRATCH},
            "counts": (self.steps[i].clone(), self.vsteps[i].clone()),
            "written": (self.written[0][i], self.written[1][i]),
            "extra": self.extra[i],
        }

    def import_state(self, i: int, entry: dict[str, Any]) -> None:
        """Take :meth:`export_state`'s ``entry`` for parameter ``i``, converted to this bucket's
        dtype and device as ``load_state_dict`` converts a checkpoint's state."""
        for role, value in entry["tensors"].items():
            self.storage.view(role, i).copy_(value)
        self.steps[i] = entry["counts"][0]
        self.vsteps[i] = entry["counts"][1]
        self.written[0][i], self.written[1][i] = entry["written"]
        self.extra[i] = entry["extra"]
        self.counts_moved()

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        # plans and runs hold addresses and host caches: a copy derives its own; the backend
        # (one object per process) travels by name (Buckets.__setstate__ looks it up)
        state = self.__dict__.copy()
        state["backend"] = self.backend.name
        derived = ("_plan", "_runs", "_watch", "_expected_count", "_grad_addresses", "cache")
        derived += ("epoch", "moved")
        for name in derived:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()
