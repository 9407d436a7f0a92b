"""The compiled backends: hand-written C++ (CPU) and CUDA kernels.

The same operations as the Triton backend: ``cpp`` runs the C++/OpenMP kernels of
``csrc/sam_fused_cpu.cpp`` on CPU tensors, ``cuda`` the kernels of ``csrc/sam_fused_cuda.cu``
on CUDA tensors. Both libraries are compiled once (by setup.py or on first use, see
``sam_fused/_extension.py``) and register their operations as ``torch.ops.sam_fused_cpu`` /
``torch.ops.sam_fused_cuda``.

One call covers a whole bucket: every role (``param``, ``grad``, ``backup``, a state) is the
plan's table of tensor addresses (``tables.py``), the run table says where each tensor's
elements are, and ``like``, a tensor of the element type, is what the library dispatches
on. The CPU library takes one row ``(0, numel, count index)`` per tensor
(``TableRun.tensor_rows``) and cuts tensors into its own thread-pool blocks; the CUDA
library takes the device chunk table the Triton kernels use (``TableRun.table``), one
thread block per chunk. Scalars that change between steps (lr, rho) are plain arguments;
nothing is recompiled. GradScaler's ``1 / scale`` and the clipping coefficient stay on the
device: the operations take the status index to unscale by (``-1``: none) and a clip flag,
and the kernels read the factors from ``status`` and multiply each gradient in float32 as
they load it, as the Triton kernels and the reference do (gradients are never written).

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
from ..layout import Bucket, Plan
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
        ascents={Ascent.GRAD},
        descents={Descent.PLAIN},
        updates={SGDSpec.name, AdamSpec.name},
    )


class CppBackend:
    """Fused operations from the C++ CPU extension (CPU tensors)."""

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


    @classmethod
    def extension(cls) -> _Extension:
        return cpu_extension()

    @classmethod
    def info(cls) -> BackendInfo:
        """Whether the library is here (loading or building it on first call)."""
        return cls.extension().info()

    # ------------------------------------------------------------------ runs
    def _slots(self, n: int) -> int:
        # the same pure function of a tensor's length as stats_slots() in sam_fused_common.h
        return max(1, min(-(-n // self._chunk), self._max_slots))

    def _rows(self, run: TableRun) -> Tensor:
        """What the library's ``runs`` argument gets for this run."""
        return run.tensor_rows()

    def _partials(self, run: TableRun) -> int:
        """Partial sums a statistics call writes for this run."""
        return sum(self._slots(n) for n in map(Tensor.numel, run.weights))
    # ------------------------------------------------------------------ operations
    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        slots = plan.cache.get(self.name)
        if slots is None:
            slots = plan.cache[self.name] = self._partials(plan.run)
        return slots

    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        # GCSAM's row means: a per-parameter reduction that ATen already does well
        centralize_each(bucket, plan.indices)

    def noise(self, bucket: Bucket, ctx: StepContext, std: float, generator: torch.Generator) -> None:
        raise NotImplementedError("RSAM is not among the compiled backends' capabilities")

    @staticmethod
    def _unscale(ctx: StepContext, index: int) -> int:
        """The status entry whose ``1 / scale`` the kernels multiply gradients by, or -1."""
        return index if ctx.unscale else -1

    def _stats(
        self,
        run: TableRun,
        ctx: StepContext,
        sumsq: Tensor | None,
        bad: Tensor,
        index: int,
        eta: float | None,
    ) -> None:
        self.ops.stats(
            run.addresses("grad"),
            run.addresses("param"),
            self._rows(run),
            run.like,
            sumsq,
            bad,
            ctx.status,
            self._unscale(ctx, index),
            eta is not None,
            eta or 0.0,
        )

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext, partials: Tensor
    ) -> None:
        eta = float(group["eta"]) if group["adaptive"] else None
        self._stats(plan.run, ctx, partials[0], partials[1], S.INV_SCALE1, eta)

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        adaptive = bool(group["adaptive"])
        run = plan.run
        self.ops.perturb(
            run.addresses("param"),
            run.addresses("grad"),
            run.addresses("backup"),
            ctx.status,
            self._rows(run),
            run.like,
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
        self._stats(plan.run, ctx, partials[2] if ctx.clip else None, partials[0], S.INV_SCALE2, None)

    def restore(self, bucket: Bucket, plan: Plan | None) -> None:
        run = bucket.all_run() if plan is None else plan.run  # None: every parameter (RSAM)
        if not run.empty:
            self.ops.restore(run.addresses("param"), run.addresses("backup"), self._rows(run), run.like)

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
        run = plan.run
        src, param, grad = (run.addresses(role) for role in (source, "param", "grad"))
        common: tuple[Any, ...] = (bucket.steps, ctx.status, self._rows(run), run.like)
        # the descent gradient: the second pass's (INV_SCALE2; a one-pass step writes both
        # entries), clipped by status[CLIP] when max_grad_norm is set
        reads = (self._unscale(ctx, S.INV_SCALE2), bool(ctx.clip), bool(ctx.check))
        lr = float(spec.lr)  # a CUDA tensor lr costs a sync here (the Triton backend reads it on the device)
        if isinstance(spec, SGDSpec):
            buf = run.addresses("momentum_buffer") if spec.momentum != 0 else None
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
                run.addresses("exp_avg"),
                run.addresses("exp_avg_sq"),
                run.addresses("max_exp_avg_sq") if spec.amsgrad else None,
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

    The run table is the device chunk table the Triton kernels use (``TableRun.table``):
    one thread block per chunk, one partial sum per chunk, update counts per tensor.
    """

    name = "cuda"
    device_type = "cuda"
    capabilities = _capabilities("cuda")

    @classmethod
    def extension(cls) -> _Extension:
        return cuda_extension()

    def _rows(self, run: TableRun) -> Tensor:
        return run.table

    def _partials(self, run: TableRun) -> int:
        return run.programs()
