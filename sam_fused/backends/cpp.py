"""The compiled backends: hand-written C++ (CPU) and CUDA kernels.

The same operations as the Triton backend: ``cpp`` runs the C++/OpenMP kernels of
``csrc/sam_fused_cpu.cpp`` on CPU tensors, ``cuda`` the kernels of ``csrc/sam_fused_cuda.cu``
on CUDA tensors, both over flat and table buckets. Both libraries
are compiled once (by setup.py or on first use, see ``sam_fused/_extension.py``) and
register their operations as ``torch.ops.sam_fused_cpu`` / ``torch.ops.sam_fused_cuda``.

One call covers a whole bucket: the plan's runs go to the library as a small int64 table
(cached on the plan), so a bucket of 2000 tensors costs one Python call per operation. A
flat bucket passes each buffer (``param``, ``grad``, ``backup``, a state) whole and one
row ``(start, stop, first)`` per run of it; a table bucket passes each as the run's address
table (``tables.py``) and one row ``(0, numel, first)`` per tensor, plus a tensor of the
element type (``like``) to dispatch on.
Scalars that change between steps (lr, rho) are plain arguments; nothing is recompiled.
GradScaler's ``1 / scale`` and the clipping coefficient stay on the device: the operations
take the status index to unscale by (``-1``: none) and a clip flag, and the kernels read the
factors from ``status`` and multiply each gradient in float32 as they load it, as the
Triton kernels and the reference do (the gradient buffers are never written).

Their capabilities: the variants whose ascent direction is the gradient and whose descent
is plain (SAM, ASAM, USAM, GCSAM, interval SAM), with SGD and Adam/AdamW fused.
``backend="auto"`` sends the other variants to the reference (CPU) or Triton (CUDA), and
asking for ``cpp``/``cuda`` with them is refused when the optimizer is built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import status as S
from .._extension import BackendInfo, _Extension, cpu_extension, cuda_extension
from ..base_updates import AdamSpec, BaseSpec, SGDSpec
from ..context import StepContext
from ..layout import Bucket, Plan, Run
from ..tables import TableRun
from ..variants import Ascent, Descent
from .protocol import Capabilities
from .reference import centralize_each

__all__ = ["CppBackend", "CudaBackend"]

_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


def _capabilities(device_type: str) -> Capabilities:
    return Capabilities(
        device_types={device_type},
        dtypes=_DTYPES,
        # both libraries take address tables ("layouts" in csrc/sam_fused_cpu.cpp and .cu)
        layouts={"flat", "table"},
        ascents={Ascent.GRAD},
        descents={Descent.PLAIN},
        updates={SGDSpec.name, AdamSpec.name},
    )


class CppBackend:
    """Fused operations from the C++ CPU extension (CPU tensors, flat and table buckets)."""

    name = "cpp"
    device_type = "cpu"
    dtypes = _DTYPES
    capabilities = _capabilities("cpu")
    # the kernels multiply by 1 / scale as they read a gradient; the buffers keep scale * g
    unscales_in_place = False

    def __init__(self) -> None:
        ops = self.extension().ops()
        if ops is None:
            raise RuntimeError(f"the {self.name} backend is unavailable: {self.extension().info().detail}")
        self.ops = ops
        _, chunk, max_slots = (int(c) for c in ops.constants())
        self._chunk = chunk
        self._max_slots = max_slots

    def __reduce__(self):
        return (_instance, (self.name,))

    @classmethod
    def extension(cls) -> _Extension:
        return cpu_extension()

    @classmethod
    def info(cls) -> BackendInfo:
        """Whether the library is here (loading or building it on first call)."""
        return cls.extension().info()

    # ------------------------------------------------------------------ plans
    def _slots(self, n: int) -> int:
        # the same pure function of the run length as stats_slots() in sam_fused_common.h
        return max(1, min(-(-n // self._chunk), self._max_slots))

    @staticmethod
    def _rows(runs: list[Run] | list[TableRun]) -> list[tuple[int, int, int]]:
        """The library's runs: a flat run's span of the buffers, or each tensor of a table run
        whole (its address is the entry of the same index in every role's table)."""
        rows: list[tuple[int, int, int]] = []
        for run in runs:
            if run.table_mode:
                rows.extend((0, w.numel(), i) for i, w in zip(run.indices, run.weights))
            else:
                rows.append((run.start, run.stop, run.first))
        return rows

    def _table(self, plan: Plan) -> tuple[Tensor, int]:
        """The plan's runs as a CPU int64 (R, 3) table and its number of partial slots."""
        cached = plan.cache.get(self.name)
        if cached is None:
            rows = self._rows(plan.runs)
            table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
            slots = sum(self._slots(stop - start) for start, stop, _ in rows)
            cached = plan.cache[self.name] = (table, slots)
        return cached

    @staticmethod
    def _buffer(bucket: Bucket, plan: Plan, role: str) -> Tensor:
        """What the library's argument for ``role`` gets: the flat buffer whole, or the table
        run's address table (a table bucket's plan is one TableRun)."""
        if not bucket.flat:
            return plan.runs[0].tensor(bucket, role)
        if role == "param":
            return bucket.param_flat
        if role == "grad":
            return bucket.grad_flat
        return bucket.backup_buffer() if role == "backup" else bucket.flat_buffer(role)

    @staticmethod
    def _like(bucket: Bucket, plan: Plan) -> Tensor:
        """A tensor of the element type, which the library dispatches on."""
        return bucket.param_flat if bucket.flat else plan.runs[0].like

    # ------------------------------------------------------------------ operations
    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        return self._table(plan)[1]

    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        # GCSAM's row means: a per-parameter reduction that ATen already does well
        centralize_each(bucket, plan.indices)

    def noise(self, bucket: Bucket, ctx: StepContext, std: float, generator: torch.Generator) -> None:
        raise NotImplementedError("RSAM is not among the compiled backends' capabilities")

    @staticmethod
    def _unscale(ctx: StepContext, index: int) -> int:
        """The status entry whose ``1 / scale`` the kernels multiply gradients by, or -1."""
        return index if ctx.unscale else -1

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext, partials: Tensor
    ) -> None:
        adaptive = bool(group["adaptive"])
        self.ops.stats(
            self._buffer(bucket, plan, "grad"),
            self._buffer(bucket, plan, "param"),
            self._table(plan)[0],
            self._like(bucket, plan),
            partials[0],
            partials[1],
            ctx.status,
            self._unscale(ctx, S.INV_SCALE1),
            adaptive,
            float(group["eta"]) if adaptive else 0.0,
        )

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        adaptive = bool(group["adaptive"])
        self.ops.perturb(
            self._buffer(bucket, plan, "param"),
            self._buffer(bucket, plan, "grad"),
            self._buffer(bucket, plan, "backup"),
            ctx.status,
            self._table(plan)[0],
            self._like(bucket, plan),
            float(group["rho"]),
            float(group["eta"]) if adaptive else 0.0,
            float(ctx.norm_eps),
            self._unscale(ctx, S.INV_SCALE1),
            adaptive,
            bool(ctx.variant.normalized),
            bool(ctx.check),
        )

    def revert_state(self, bucket: Bucket, plan: Plan, ctx: StepContext, force: bool = False) -> None:
        """Nothing to revert: the variants these backends run keep no running state."""

    def descent_stats(self, bucket: Bucket, plan: Plan, ctx: StepContext, partials: Tensor) -> None:
        # the non-finite count of g_p, and ||g_p||^2 for clipping; the inner products belong
        # to GSAM / LookSAM, which are not among these backends' capabilities
        partials[1:].zero_()
        sumsq = partials[2] if ctx.clip else None
        self.ops.stats(
            self._buffer(bucket, plan, "grad"),
            self._buffer(bucket, plan, "param"),
            self._table(plan)[0],
            self._like(bucket, plan),
            sumsq,
            partials[0],
            ctx.status,
            self._unscale(ctx, S.INV_SCALE2),
            False,
            0.0,
        )

    def restore(self, bucket: Bucket, plan: Plan | None) -> None:
        if plan is None:  # every parameter
            if bucket.flat:
                bucket.param_flat.copy_(bucket.backup_buffer())
            else:
                run = bucket.all_run()
                rows = torch.tensor(self._rows([run]), dtype=torch.int64).reshape(-1, 3)
                self.ops.restore(run.tensor(bucket, "param"), run.tensor(bucket, "backup"), rows, run.like)
        elif not plan.empty:
            self.ops.restore(
                self._buffer(bucket, plan, "param"),
                self._buffer(bucket, plan, "backup"),
                self._table(plan)[0],
                self._like(bucket, plan),
            )

    def update(
        self,
        bucket: Bucket,
        perturbed: Plan | None,
        plan: Plan,
        spec: BaseSpec,
        ctx: StepContext,
        descent: Descent,
    ) -> None:
        if perturbed is plan:
            source = "backup"  # the restore fused into the update
        else:
            if perturbed is not None:
                self.restore(bucket, perturbed)
            source = "param"
        if plan.empty:
            return
        src, param, grad = (self._buffer(bucket, plan, role) for role in (source, "param", "grad"))
        common: tuple[Any, ...] = (bucket.steps, ctx.status, self._table(plan)[0], self._like(bucket, plan))
        # the descent gradient: the second pass's (INV_SCALE2; a one-pass step writes both
        # entries), clipped by status[CLIP] when max_grad_norm is set
        reads = (self._unscale(ctx, S.INV_SCALE2), bool(ctx.clip), bool(ctx.check))
        lr = float(spec.lr)  # a CUDA tensor lr costs a sync here (the Triton backend reads it on the device)
        if isinstance(spec, SGDSpec):
            buf = self._buffer(bucket, plan, "momentum_buffer") if spec.momentum != 0 else None
            self.ops.sgd(
                src,
                param,
                grad,
                buf,
                *common,
                lr,
                spec.momentum,
                1.0 - spec.dampening,
                spec.weight_decay,
                spec.nesterov,
                spec.maximize,
                *reads,
            )
        else:
            assert isinstance(spec, AdamSpec)
            self.ops.adam(
                src,
                param,
                grad,
                self._buffer(bucket, plan, "exp_avg"),
                self._buffer(bucket, plan, "exp_avg_sq"),
                self._buffer(bucket, plan, "max_exp_avg_sq") if spec.amsgrad else None,
                *common,
                lr,
                spec.beta1,
                spec.beta2,
                spec.eps,
                spec.weight_decay,
                spec.decoupled,
                spec.maximize,
                *reads,
            )

    def state_sumsq(self, bucket: Bucket, plan: Plan, name: str, partials: Tensor) -> None:
        raise NotImplementedError("LookSAM is not among the compiled backends' capabilities")

    def advance_steps(
        self, bucket: Bucket, plan: Plan, ctx: StepContext, count_skip: bool, base: bool, variant: bool
    ) -> None:
        # the variants run here keep no running state: vsteps never moves
        mask = (
            bucket.mask_of(plan)
            if base
            else bucket.cache.setdefault("no_count", torch.zeros_like(bucket.steps))
        )
        self.ops.advance_steps(bucket.steps, mask, ctx.status, bool(ctx.check), bool(count_skip))


class CudaBackend(CppBackend):
    """The same operations from the CUDA extension (CUDA tensors, no host sync).

    A flat bucket's run table stays on the host: the library launches one kernel per run with
    the run's offsets as arguments. A table bucket's launch takes the table run's device chunk
    table (``TableRun.table``, one thread block per row) in place of the run table, so one
    kernel covers every tensor, with one partial sum per chunk; the kernels read status, step
    counts and the tables on the device.
    """

    name = "cuda"
    device_type = "cuda"
    capabilities = _capabilities("cuda")

    @classmethod
    def extension(cls) -> _Extension:
        return cuda_extension()

    def _table(self, plan: Plan) -> tuple[Tensor, int]:
        """A flat plan's host run table, or a table run's chunk table: one partial per row."""
        if plan.runs and plan.runs[0].table_mode:
            run = plan.runs[0]
            return run.table, run.programs()
        return super()._table(plan)

    def restore(self, bucket: Bucket, plan: Plan | None) -> None:
        if plan is None and not bucket.flat:  # every parameter of a table bucket
            run = bucket.all_run()
            self.ops.restore(run.tensor(bucket, "param"), run.tensor(bucket, "backup"), run.table, run.like)
            return
        super().restore(bucket, plan)


def _instance(name: str):
    from . import get_backend

    return get_backend(name)
