"""Parameter buckets: the flat-buffer layout the fused kernels run over, and per-step plans.

A *bucket* is the parameters of one param group with one (real) dtype. A **flat** bucket
moves its parameters into one contiguous buffer: each ``p.data`` becomes a view of it, so
the model keeps working (``model.state_dict()``, ``load_state_dict``, ``torch.save``) and
nothing is stored twice. Gradients are gathered once into a flat gradient buffer and
``p.grad`` is re-pointed to views of it, so the next backward pass accumulates straight
into the buffer. Each parameter starts at a multiple of :data:`ALIGN` elements (zero padding
between them), which keeps every kernel pointer 16-byte aligned. A parameter whose storage
sam_fused must not move (``placement.py``) goes to a **per-parameter** bucket instead:
nothing is re-pointed and the math runs tensor by tensor. A complex parameter is optimized as its real view
(``torch.view_as_real``), as torch.optim does.

A bucket also owns its optimizer state and update counts (``storage.py``).

Every step builds (or reuses) a :class:`Plan`: which parameters take part (those with a
gradient) cut into :class:`Run` objects, contiguous spans of the buffer that one kernel
launch covers. The plan is cached and a step checks in O(1) that nothing moved:

* the reference counts of the parameter and gradient storages are unchanged (setting a
  ``p.grad`` to None or moving a parameter to another tensor drops a reference);
* the first and last parameters still sit where the plan put them;
* every parameter the plan left out still has no gradient.

When a check fails, the slow path walks every parameter, gathers foreign gradients into
the buffer, and builds a new plan. See ``docs/design.md`` for what that check cannot see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .placement import CHEAP_CHECK, LayoutError, dense_view, flat_layout_refusal, is_dtensor, real, use_count
from .storage import BucketStorage
from .tables import TablePlans, TableRun

__all__ = ["ALIGN", "Bucket", "LayoutError", "Plan", "Run", "flat_layout_refusal", "is_dtensor"]

ALIGN = 16  # elements; 16 fp16 elements = 32 bytes, so every run start is 16-byte aligned


@dataclass
class Run:
    """A contiguous span of a bucket that one kernel launch covers.

    ``first`` is the index of the span's first parameter; every parameter in a run has the
    same update counts, so the kernels read them once, from ``steps[first]``.
    """

    start: int
    stop: int
    first: int
    views: dict[str, Tensor] = field(default_factory=dict)

    table_mode = False  # tables.TableRun is the other kind
    layout_code = 0  # the kernels' TABLE constexpr: a flat run

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def tensor(self, bucket: Bucket, role: str) -> Tensor:
        """What a kernel's pointer argument for ``role`` gets: the run's slice of that buffer."""
        view = self.views.get(role)
        return view if view is not None else bucket.run_view(self, role)

    def count(self, bucket: Bucket, name: str) -> Tensor:
        """The run's update count (``steps`` or ``vsteps``) as a pointer to its first entry."""
        view = self.views.get(name)
        if view is None:
            view = self.views[name] = getattr(bucket, name)[self.first :]
        return view

    def programs(self, block: int) -> int:
        """Programs of an elementwise launch: one per block."""
        return max(1, -(-self.numel // block))

    @staticmethod
    def block(flat_block: int) -> int:
        """The kernels' BLOCK for this run."""
        return flat_block

    @property
    def table(self) -> Tensor:
        return self.views["param"]  # a placeholder: flat launches read no chunk table

    @property
    def like(self) -> Tensor:
        return self.views["param"]


@dataclass
class Plan:
    """Which parameters of a bucket take part in this pass, and how kernels cover them."""

    key: bytes  # one byte per parameter: 1 if it takes part
    indices: tuple[int, ...]
    runs: list[Run]
    mask: Tensor | None = None  # float 0/1 per parameter, on the device (built lazily)
    rows: tuple | None = None  # gradient-centralization row table (built lazily)
    complement: list[Run] | None = None  # runs over the parameters left out (built lazily)
    cache: dict[str, Any] = field(default_factory=dict)  # what a backend derives from the plan

    @property
    def empty(self) -> bool:
        return not self.indices


class Bucket(TablePlans, BucketStorage):
    """The parameters of one group with one dtype, and everything SAM keeps for them.

    Attributes:
        params: the parameters, in group order.
        group_index: which ``param_groups`` entry they belong to.
        layout: ``"flat"`` (they live in a flat buffer) or ``"table"`` (they stay where they are).
        flat: ``layout == "flat"``.
        backend: the backend object that runs this bucket's math.
        steps, vsteps: float32 per-parameter update counts on the device (see above).
            Adam's ``state['step']`` entries are 0-d views of ``steps``.
    """

    def __init__(self, params: list[Tensor], group_index: int, layout: str, backend) -> None:
        self.params = params
        self.group_index = group_index
        self.layout = layout
        self.flat = layout == "flat"
        self.backend = backend
        self.sharded = is_dtensor(params[0])
        local = [self._local(p) for p in params]
        self.device = local[0].device
        self.dtype = local[0].dtype  # the real dtype the math and the flat buffers use
        self.param_dtypes = tuple(p.dtype for p in params)
        self.numels = [v.numel() for v in local]
        BucketStorage.__init__(self)
        self.backup_flat: Tensor | None = None
        # update classes: parameters with equal update histories share an id, so their
        # counts are equal and one run can cover them
        self.update_class: list[int] = [0] * len(params)
        self.last_update_key: bytes | None = None
        self._reset_caches()
        if self.flat:
            self._flatten()

    def _reset_caches(self) -> None:
        self._plan: Plan | None = None
        self._watch: list[Tensor] = []  # parameters the plan left out
        self._expected_counts: tuple[int, int] = (-1, -1)
        self._valid_index: Tensor | None = None
        self._plan_addresses: tuple[list[int], list[int]] | None = None  # table layout
        self._weights: list[Tensor] = []  # table layout: each parameter's local real view
        self._host_counts: tuple[list[float], list[float]] | None = None
        self._recount = False  # counts were set from outside: update classes are due
        self.cache: dict[str, Any] = {}  # what a backend derives from the bucket (device scalars)

    def _local(self, t: Tensor) -> Tensor:
        """The tensor the math runs on: the local shard of a DTensor, the real view of a complex."""
        # DTensor._local_tensor is what to_local() returns, without its autograd bookkeeping
        # (~10 us a call: the table plan reads thousands per pass)
        return real(t._local_tensor if self.sharded else t)

    # ------------------------------------------------------------------ flat layout
    def _flatten(self) -> None:
        offsets, total = [], 0
        for n in self.numels:
            offsets.append(total)
            total += -(-n // ALIGN) * ALIGN
        self.offsets = offsets
        self.total = max(total, ALIGN)
        flat = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        for i, p in enumerate(self.params):
            dense_view(flat, offsets[i], p).copy_(p.detach())
        self.param_flat = flat
        self.grad_flat = torch.zeros_like(flat)
        self._attach_params()

    def _attach_params(self) -> None:
        for i, p in enumerate(self.params):
            p.data = dense_view(self.param_flat, self.offsets[i], p)
        size = self.param_flat.element_size()
        self.param_ptrs = [p.data_ptr() for p in self.params]
        self.grad_ptrs = [self.grad_flat.data_ptr() + off * size for off in self.offsets]

    def state_view(self, name: str, i: int) -> Tensor:
        """Parameter ``i``'s slice of flat state buffer ``name``, shaped like the parameter."""
        return dense_view(self.flat_buffer(name), self.offsets[i], real(self.params[i].detach()))

    def flat_buffer(self, name: str) -> Tensor:
        """A zero-initialised flat buffer (allocated on first use)."""
        buf = self.state_flat.get(name)
        if buf is None:
            buf = self.state_flat[name] = torch.zeros_like(self.param_flat)
        return buf

    def backup_buffer(self) -> Tensor:
        if self.backup_flat is None:
            self.backup_flat = torch.empty_like(self.param_flat)
        return self.backup_flat

    def valid_index(self) -> Tensor:
        """Flat indices of the real (non-padding) elements, in parameter order (cached)."""
        if self._valid_index is None:
            parts = [torch.arange(o, o + n, device=self.device) for o, n in zip(self.offsets, self.numels)]
            self._valid_index = (
                torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=self.device)
            )
        return self._valid_index

    def run_view(self, run: Run, name: str) -> Tensor:
        """The slice of flat buffer ``name`` that ``run`` covers (cached on the run)."""
        view = run.views.get(name)
        if view is None:
            source = self.backup_buffer() if name == "backup" else self.flat_buffer(name)
            view = run.views[name] = source[run.start : run.stop]
        return view

    def note_update(self, plan: Plan) -> None:
        """Refine the update classes after an update with ``plan`` (host-side, cheap).

        Parameters that took part and those that did not can no longer share a count, so
        they stop sharing a class. Repeating the same plan changes nothing, so the steady
        state does no work here.
        """
        self._host_counts = None
        if plan.key == self.last_update_key:
            return
        classes_before = len(set(self.update_class))
        relabel: dict[tuple[int, int], int] = {}
        self.update_class = [
            relabel.setdefault((cls, took), len(relabel)) for cls, took in zip(self.update_class, plan.key)
        ]
        self.last_update_key = plan.key
        if len(relabel) != classes_before:
            self._plan = None  # a class split: runs must be cut again

    # ------------------------------------------------------------------ plans
    def plan(self) -> Plan:
        """The plan for this pass; raises LayoutError/ValueError before changing anything."""
        if self._recount:
            self._classes_from_counts()
        if self.flat:
            if self._plan is not None and self._intact():
                return self._plan
            return self._rebuild_flat_plan()
        return self._table_plan()

    def _intact(self) -> bool:
        """The O(1) check that the cached plan still describes the parameters."""
        if not CHEAP_CHECK:
            return False  # no cheap check available: always take the slow path
        if (use_count(self.param_flat), use_count(self.grad_flat)) != self._expected_counts:
            return False
        plan = self._plan
        for i in (plan.indices[0], plan.indices[-1]) if plan.indices else ():
            p = self.params[i]
            g = p.grad
            if (
                g is None
                or g.is_sparse
                or g.data_ptr() != self.grad_ptrs[i]
                or p.data_ptr() != self.param_ptrs[i]
            ):
                return False
        return all(p.grad is None for p in self._watch)

    def _check_param(self, i: int, p: Tensor) -> None:
        moved = p.device != self.device or p.dtype != self.param_dtypes[i]
        if moved or (self.flat and p.data_ptr() != self.param_ptrs[i]):
            raise LayoutError(
                f"parameter {i} of param group {self.group_index} (shape {tuple(p.shape)}) is no "
                f"longer the tensor the optimizer was built on: it is now {p.dtype} on "
                f"{p.device}, was {self.param_dtypes[i]} on {self.device}. This happens when the model "
                "is moved or cast (model.to(), .half(), .cuda()) or p.data is replaced after the "
                "optimizer was created; create the SAM optimizer after moving the model."
            )

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

    def _taking_part(self, check_all: bool, check_params: bool = True) -> list[int]:
        # validate everything first: a refused step must change nothing
        taking_part = []
        for i, p in enumerate(self.params):
            if check_params:
                self._check_param(i, p)
            g = p.grad
            if g is not None:
                if check_all or g.is_sparse or g.data_ptr() != self.grad_ptrs[i]:
                    self._check_grad(i, p, g)
                taking_part.append(i)
        return taking_part

    def _rebuild_flat_plan(self) -> Plan:
        taking_part = self._taking_part(check_all=False)
        # gather foreign gradients into the flat buffer and attach views
        for i in taking_part:
            p = self.params[i]
            if p.grad.data_ptr() != self.grad_ptrs[i] or p.grad.stride() != p.stride():
                view = dense_view(self.grad_flat, self.offsets[i], p)
                view.copy_(p.grad)
                p.grad = view
        plan = self._new_plan(tuple(taking_part), self._runs(taking_part))
        for run in plan.runs:  # cached once per plan: per-step launches then create no tensors
            run.views["param"] = self.param_flat[run.start : run.stop]
            run.views["grad"] = self.grad_flat[run.start : run.stop]
        self._plan = plan
        self._watch = [p for p in self.params if p.grad is None]
        self._expected_counts = (use_count(self.param_flat), use_count(self.grad_flat))
        return plan

    def _new_plan(self, indices: tuple[int, ...], runs: list) -> Plan:
        return Plan(self._key(), indices, runs)

    def _key(self) -> bytes:
        return bytes(0 if p.grad is None else 1 for p in self.params)

    def _runs(self, taking_part: list[int]) -> list[Run]:
        """Cut the taking-part parameters into maximal spans of equal update class."""
        runs: list[Run] = []
        prev = None
        for i in taking_part:
            start = self.offsets[i]
            stop = start + -(-self.numels[i] // ALIGN) * ALIGN
            cls = self.update_class[i]
            if runs and prev is not None and prev[0] == i - 1 and prev[1] == cls:
                runs[-1].stop = stop
            else:
                runs.append(Run(start, stop, i))
            prev = (i, cls)
        return runs

    def complement_runs(self, plan: Plan) -> list[Run]:
        """Runs over the parameters the plan leaves out (cached on the plan)."""
        if not self.flat:
            if plan.complement is None:
                left_out = tuple(i for i in range(len(self.params)) if i not in set(plan.indices))
                weights = [self.weight(i) for i in left_out]
                plan.complement = [TableRun(self, left_out, weights, None)] if left_out else []
            return plan.complement
        if plan.complement is None:
            taking, runs = set(plan.indices), []
            for i, n in enumerate(self.numels):
                if i in taking:
                    continue
                start = self.offsets[i]
                stop = start + -(-n // ALIGN) * ALIGN
                if runs and runs[-1].stop == start:
                    runs[-1].stop = stop
                else:
                    runs.append(Run(start, stop, i))
            for run in runs:
                run.views["param"] = self.param_flat[run.start : run.stop]
            plan.complement = runs
        return plan.complement

    def all_run(self) -> TableRun:
        """A table run over every parameter (RSAM's noise and its restore move them all)."""
        run = self.cache.get("all_run")
        if run is None:
            indices = tuple(range(len(self.params)))
            run = self.cache["all_run"] = TableRun(self, indices, [self.weight(i) for i in indices], None)
        return run

    def row_table(self, plan: Plan) -> tuple[Tensor, Tensor, list[int]]:
        """Gradient centralization rows of the plan: (starts, lengths, loose params).

        A contiguous parameter of two or more dimensions has ``shape[0]`` rows of
        ``numel / shape[0]`` consecutive elements. A row starts at an offset into the flat
        gradient buffer (flat layout) or at a byte address (table layout: the gradient
        tensors themselves). Parameters of another memory layout (``loose``) are
        centralized one by one.
        """
        if plan.rows is None:
            starts: list[int] = []
            lengths: list[int] = []
            loose: list[int] = []
            for i in plan.indices:
                w = self.weight(i)  # the local shard of a DTensor: its rows are whole (FSDP2 splits dim 0)
                if w.dim() <= 1 or w.numel() == 0:
                    continue
                if not w.is_contiguous():
                    loose.append(i)
                    continue
                n_rows = w.shape[0]
                row = w.numel() // n_rows
                if self.flat:
                    starts.extend(range(self.offsets[i], self.offsets[i] + n_rows * row, row))
                else:
                    g = self.grad(i)
                    base, size = g.data_ptr(), g.element_size()
                    starts.extend(range(base, base + n_rows * row * size, row * size))
                lengths.extend([row] * n_rows)
            plan.rows = (
                torch.tensor(starts, dtype=torch.int64, device=self.device),
                torch.tensor(lengths, dtype=torch.int32, device=self.device),
                loose,
            )
        return plan.rows

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
        if self.flat and self._plan is not None and self._intact():
            self.grad_flat.zero_()
            return
        for p in self.params:
            g = p.grad
            if g is not None:
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                g.zero_()

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        # addresses, plans and host caches are derived: a copy computes its own
        state = self.__dict__.copy()
        derived = (
            "_plan",
            "_watch",
            "_expected_counts",
            "_valid_index",
            "_host_counts",
            "cache",
            "param_ptrs",
            "grad_ptrs",
            "_plan_addresses",
            "_weights",
        )
        for name in derived:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()
        if self.flat:
            # copy.deepcopy and pickle give the parameters storages of their own: point them
            # into this bucket's flat buffer again (it holds the same values)
            self._attach_params()
