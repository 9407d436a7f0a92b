"""Parameter buckets and the flat-buffer layout the fused kernels run over.

A *bucket* is the parameters of one param group with one dtype. A fused bucket moves its
parameters into one contiguous buffer: each ``p.data`` becomes a view of it, so the model
keeps working (``model.state_dict()``, ``load_state_dict``, ``torch.save``) and nothing is
stored twice. Gradients are gathered once into a flat gradient buffer and ``p.grad`` is
re-pointed to views of it, so the next backward pass accumulates straight into the buffer.
Each parameter starts at a multiple of :data:`ALIGN` elements (zero padding between them),
which keeps every kernel pointer 16-byte aligned.

Every step builds (or reuses) a :class:`Plan`: which parameters take part (those with a
gradient) cut into :class:`Run` objects, contiguous spans of the buffer that one kernel
launch covers. A Python loop over thousands of parameters on every step would cost more
than the kernels, so the plan is cached and a step checks in O(1) that nothing moved:

* the reference counts of the parameter and gradient storages are unchanged (setting a
  ``p.grad`` to None or moving a parameter to another tensor drops a reference);
* the first and last parameters still sit where the plan put them;
* every parameter the plan left out still has no gradient.

When a check fails, the slow path walks every parameter, gathers foreign gradients into
the buffer, and builds a new plan. See ``docs/design.md`` for what that check cannot see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ALIGN", "Bucket", "LayoutError", "Plan", "Run"]

ALIGN = 16  # elements; 16 fp16 elements = 32 bytes, so every run start is 16-byte aligned


class LayoutError(RuntimeError):
    """A parameter or gradient no longer matches the layout the optimizer built."""


_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _use_count(t: Tensor) -> int:
    """How many tensors share ``t``'s storage (-1 where torch does not expose it)."""
    if _STORAGE_USE_COUNT is None:
        return -1
    return _STORAGE_USE_COUNT(t.untyped_storage()._cdata)


def _is_dense(p: Tensor) -> bool:
    """Whether ``p`` covers exactly ``numel`` consecutive elements (in some dim order)."""
    if p.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(p.stride(), p.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _dense_view(flat: Tensor, start: int, like: Tensor) -> Tensor:
    """A view of ``flat[start:start + like.numel()]`` with ``like``'s shape and strides."""
    return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + start)


@dataclass
class Run:
    """A contiguous span of a bucket that one kernel launch covers.

    ``first`` is the index of the span's first parameter; every parameter in a run has the
    same update count, so the kernels read it once, from ``steps[first]``.
    """

    start: int
    stop: int
    first: int
    views: dict[str, Tensor] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass
class Plan:
    """Which parameters of a bucket take part in this pass, and how kernels cover them."""

    key: bytes  # one byte per parameter: 1 if it takes part
    indices: tuple[int, ...]
    runs: list[Run]
    mask: Tensor | None = None  # float 0/1 per parameter, on the device (built lazily)
    rows: tuple | None = None  # gradient-centralization row table (built lazily)
    complement: list[Run] | None = None  # runs over the parameters left out (built lazily)

    @property
    def empty(self) -> bool:
        return not self.indices


class Bucket:
    """The parameters of one group with one dtype, and everything SAM keeps for them.

    Attributes:
        params: the parameters, in group order.
        group_index: which ``param_groups`` entry they belong to.
        fused: whether they live in a flat buffer (the Triton backend needs that).
        backend: the backend object that runs this bucket's math.
        steps: float32 per-parameter count of base-optimizer updates applied, on the
            device (device-resident so that a skipped step can leave it unchanged without
            a host sync). Adam's ``state['step']`` entries are 0-d views of it.
    """

    def __init__(self, params: list[Tensor], group_index: int, fused: bool, backend) -> None:
        self.params = params
        self.group_index = group_index
        self.fused = fused
        self.backend = backend
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        self.state_flat: dict[str, Tensor] = {}
        self.backup_flat: Tensor | None = None
        self.backups: list[Tensor | None] = [None] * len(params)  # reference buckets
        self._scratch: dict[str, list[Tensor | None]] = {}  # reference buckets' per-step tensors
        self._plan: Plan | None = None
        self._watch: list[Tensor] = []  # parameters the plan left out
        self._expected_counts: tuple[int, int] = (-1, -1)
        # update classes: parameters with equal update histories share an id, so their
        # step counts are equal and one run can cover them
        self.update_class: list[int] = [0] * len(params)
        self.last_update_key: bytes | None = None
        if fused:
            self._flatten()

    # ------------------------------------------------------------------ flat layout
    def _flatten(self) -> None:
        offsets, total = [], 0
        for p in self.params:
            offsets.append(total)
            total += -(-p.numel() // ALIGN) * ALIGN
        self.offsets = offsets
        self.total = max(total, ALIGN)
        flat = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        for p, off in zip(self.params, offsets):
            view = _dense_view(flat, off, p)
            view.copy_(p.detach())
            p.data = view
        self.param_flat = flat
        self.grad_flat = torch.zeros_like(flat)
        self.param_ptrs = [p.data_ptr() for p in self.params]
        self.grad_ptrs = [self.grad_flat.data_ptr() + off * flat.element_size() for off in offsets]

    def flat_buffer(self, name: str) -> Tensor:
        """A zero-initialised flat state buffer (allocated on first use)."""
        buf = self.state_flat.get(name)
        if buf is None:
            buf = torch.zeros_like(self.param_flat)
            self.state_flat[name] = buf
        return buf

    def state_view(self, name: str, index: int) -> Tensor:
        """Parameter ``index``'s slice of flat state buffer ``name``, shaped like it."""
        return _dense_view(self.flat_buffer(name), self.offsets[index], self.params[index])

    def scratch(self, name: str) -> list[Tensor | None]:
        """Per-parameter per-step tensors of a reference bucket (first grad, RSAM noise)."""
        return self._scratch.setdefault(name, [None] * len(self.params))

    def valid_index(self) -> Tensor:
        """Flat indices of the real (non-padding) elements, in parameter order (cached)."""
        index = getattr(self, "_valid_index", None)
        if index is None:
            parts = [
                torch.arange(off, off + p.numel(), device=self.device)
                for p, off in zip(self.params, self.offsets)
            ]
            index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=self.device)
            self._valid_index = index
        return index

    def row_table(self, plan: Plan) -> tuple[Tensor, Tensor, list[int]]:
        """Gradient centralization rows of the plan: (starts, lengths, loose params).

        A contiguous parameter of two or more dimensions has ``shape[0]`` rows of
        ``numel / shape[0]`` consecutive elements. Parameters of another memory layout
        (``loose``) are centralized one by one.
        """
        table = getattr(plan, "rows", None)
        if table is None:
            starts: list[int] = []
            lengths: list[int] = []
            loose: list[int] = []
            for i in plan.indices:
                p = self.params[i]
                if p.dim() <= 1 or p.numel() == 0:
                    continue
                if not p.is_contiguous():
                    loose.append(i)
                    continue
                n_rows = p.shape[0]
                row = p.numel() // n_rows
                starts.extend(range(self.offsets[i], self.offsets[i] + n_rows * row, row))
                lengths.extend([row] * n_rows)
            table = (
                torch.tensor(starts, dtype=torch.int64, device=self.device),
                torch.tensor(lengths, dtype=torch.int32, device=self.device),
                loose,
            )
            plan.rows = table
        return table

    def complement_runs(self, plan: Plan) -> list[Run]:
        """Runs over the parameters the plan leaves out (RSAM restores their noise)."""
        runs = getattr(plan, "complement", None)
        if runs is None:
            taking = set(plan.indices)
            runs = []
            for i, p in enumerate(self.params):
                if i in taking:
                    continue
                start = self.offsets[i]
                stop = start + -(-p.numel() // ALIGN) * ALIGN
                if runs and runs[-1].stop == start:
                    runs[-1].stop = stop
                else:
                    runs.append(Run(start, stop, i))
            for run in runs:
                run.views["param"] = self.param_flat[run.start : run.stop]
            plan.complement = runs
        return runs

    def backup_buffer(self) -> Tensor:
        if self.backup_flat is None:
            self.backup_flat = torch.empty_like(self.param_flat)
        return self.backup_flat

    # ------------------------------------------------------------------ plans
    def plan(self) -> Plan:
        """The plan for this pass; raises LayoutError/ValueError before changing anything."""
        if self.fused:
            if self._plan is not None and self._intact():
                return self._plan
            return self._rebuild_fused_plan()
        return self._reference_plan()

    def _intact(self) -> bool:
        """The O(1) check that the cached plan still describes the parameters."""
        if _STORAGE_USE_COUNT is None:
            return False  # no cheap check available: always take the slow path
        if (_use_count(self.param_flat), _use_count(self.grad_flat)) != self._expected_counts:
            return False
        plan = self._plan
        for i in (plan.indices[0], plan.indices[-1]) if plan.indices else ():
            p = self.params[i]
            g = p.grad
            if g is None or g.is_sparse or g.data_ptr() != self.grad_ptrs[i]:
                return False
            if p.data_ptr() != self.param_ptrs[i]:
                return False
        return all(p.grad is None for p in self._watch)

    def _check_param(self, i: int, p: Tensor) -> None:
        moved = p.device != self.device or p.dtype != self.dtype
        if moved or (self.fused and p.data_ptr() != self.param_ptrs[i]):
            raise LayoutError(
                f"parameter {i} of param group {self.group_index} (shape {tuple(p.shape)}) is no "
                f"longer the tensor the optimizer was built on: it is now {p.dtype} on "
                f"{p.device}, was {self.dtype} on {self.device}. This happens when the model is "
                "moved or cast (model.to(), .half(), .cuda()) or p.data is replaced after the "
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

    def _rebuild_fused_plan(self) -> Plan:
        # validate everything first: a refused step must change nothing
        taking_part = []
        for i, p in enumerate(self.params):
            self._check_param(i, p)
            g = p.grad
            if g is not None:
                if g.is_sparse or g.data_ptr() != self.grad_ptrs[i]:
                    self._check_grad(i, p, g)
                taking_part.append(i)
        # gather foreign gradients into the flat buffer and attach views
        for i in taking_part:
            p = self.params[i]
            if p.grad.data_ptr() != self.grad_ptrs[i] or p.grad.stride() != p.stride():
                view = _dense_view(self.grad_flat, self.offsets[i], p)
                view.copy_(p.grad)
                p.grad = view
        key = bytes(1 if p.grad is not None else 0 for p in self.params)
        plan = Plan(key, tuple(taking_part), self._runs(taking_part))
        self._make_run_views(plan)
        self._plan = plan
        self._watch = [p for p in self.params if p.grad is None]
        self._expected_counts = (_use_count(self.param_flat), _use_count(self.grad_flat))
        return plan

    def _runs(self, taking_part: list[int]) -> list[Run]:
        """Cut the taking-part parameters into maximal spans of equal update class."""
        runs: list[Run] = []
        prev = None
        for i in taking_part:
            start = self.offsets[i]
            stop = start + -(-self.params[i].numel() // ALIGN) * ALIGN
            cls = self.update_class[i]
            if runs and prev is not None and prev[0] == i - 1 and prev[1] == cls:
                runs[-1].stop = stop
            else:
                runs.append(Run(start, stop, i))
            prev = (i, cls)
        return runs

    def _make_run_views(self, plan: Plan) -> None:
        # cached once per plan: per-step kernel launches then create no tensors
        for run in plan.runs:
            run.views["param"] = self.param_flat[run.start : run.stop]
            run.views["grad"] = self.grad_flat[run.start : run.stop]

    def run_view(self, run: Run, name: str) -> Tensor:
        """The slice of flat buffer ``name`` that ``run`` covers (cached on the run)."""
        view = run.views.get(name)
        if view is None:
            source = self.backup_buffer() if name == "backup" else self.flat_buffer(name)
            view = source[run.start : run.stop]
            run.views[name] = view
        return view

    def _reference_plan(self) -> Plan:
        taking_part = []
        for i, p in enumerate(self.params):
            self._check_param(i, p)
            g = p.grad
            if g is not None:
                self._check_grad(i, p, g)
                taking_part.append(i)
        key = bytes(0 if p.grad is None else 1 for p in self.params)
        return Plan(key, tuple(taking_part), [])

    def mask_of(self, plan: Plan) -> Tensor:
        """The plan's participation as a float 0/1 tensor on the device (cached)."""
        if plan.mask is None:
            plan.mask = torch.tensor(list(plan.key), dtype=torch.float32, device=self.device)
        return plan.mask

    def note_update(self, plan: Plan) -> None:
        """Refine the update classes after an update with ``plan`` (host-side, cheap).

        Parameters that took part and those that did not can no longer share a step
        count, so they stop sharing a class. Repeating the same plan changes nothing, so
        the steady state does no work here.
        """
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

    def reset_classes_from_steps(self) -> None:
        """After loading a checkpoint: equal step counts form a class."""
        values = self.steps.tolist()
        ids: dict[float, int] = {}
        self.update_class = [ids.setdefault(v, len(ids)) for v in values]
        self.last_update_key = None
        self._plan = None

    # ------------------------------------------------------------------ gradients
    def zero_grad(self, set_to_none: bool | None) -> None:
        """Zero gradients in place (default) or set them to None (``set_to_none=True``)."""
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        attached = self.fused and self._plan is not None and self._intact()
        if attached:
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
