"""The compiled backends: hand-written C++ (CPU) and CUDA kernels over flat buckets.

The same operations, over the same flat layout, as the Triton backend: ``cpp`` runs the
C++/OpenMP kernels of ``csrc/sam_fused_cpu.cpp`` on CPU tensors, ``cuda`` the kernels of
``csrc/sam_fused_cuda.cu`` on CUDA tensors. Both libraries are compiled once (by setup.py
or on first use, see ``sam_fused/_extension.py``) and register their operations as
``torch.ops.sam_fused_cpu`` / ``torch.ops.sam_fused_cuda``.

One call covers a whole bucket: the plan's runs go to the library as a small int64 table
(cached on the plan), so a bucket of 2000 tensors costs one Python call per operation.
Scalars that change between steps (lr, rho) are plain arguments; nothing is recompiled.

Only the variants whose ascent direction is the gradient and whose descent is plain (SAM,
ASAM, USAM, GCSAM, interval SAM) are implemented here: ``backend="auto"`` sends the others
to the reference (CPU) or Triton (CUDA), and asking for ``cpp``/``cuda`` with them is
refused when the optimizer is built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import status as S
from .._extension import BackendInfo, _Extension, cpu_extension, cuda_extension
from ..base_updates import AdamSpec, SGDSpec
from ..layout import Bucket, Plan
from ..variants import ASCENT, DESCENT, Variant
from .reference import ReferenceBackend, StepContext

__all__ = ["CppBackend", "CudaBackend"]

_REFERENCE = ReferenceBackend()
_TABLE = "_compiled_runs"  # attribute of a Plan: (run table, partial slots per run)


class CppBackend:
    """Fused flat-buffer operations from the C++ CPU extension (CPU tensors)."""

    name = "cpp"
    device_type = "cpu"
    # GradScaler's factor is applied to the gradient buffers themselves (the kernels take
    # true gradients), so nothing downstream may apply it again
    unscales_in_place = True
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

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

    @classmethod
    def supports(cls, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this backend can run a bucket of ``dtype`` on ``device``."""
        return device.type == cls.device_type and dtype in cls.dtypes and bool(cls.info())

    # ------------------------------------------------------------------ plans
    def _slots(self, n: int) -> int:
        # the same pure function of the run length as stats_slots() in sam_fused_common.h
        return max(1, min(-(-n // self._chunk), self._max_slots))

    def _table(self, plan: Plan) -> tuple[Tensor, int]:
        """The plan's runs as a CPU int64 (R, 3) table and its number of partial slots."""
        cached = getattr(plan, _TABLE, None)
        if cached is None:
            rows = [[run.start, run.stop, run.first] for run in plan.runs]
            table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
            cached = (table, sum(self._slots(run.numel) for run in plan.runs))
            setattr(plan, _TABLE, cached)
        return cached

    @staticmethod
    def supports_variant(variant: Variant) -> bool:
        """Whether the compiled kernels implement ``variant``'s ascent and descent.

        They implement the gradient ascent direction and the plain descent: SAM, ASAM, USAM,
        GCSAM (its centralization runs as PyTorch ops) and interval SAM. VaSSO, F-SAM, RSAM,
        GSAM and LookSAM run on the Triton or reference backend.
        """
        return variant.ascent == ASCENT.GRAD and variant.descent == DESCENT.PLAIN and not variant.noise

    def _check_variant(self, variant: Variant) -> None:
        if not self.supports_variant(variant):  # the optimizer refuses this at construction
            raise NotImplementedError(f"variant {variant.name!r} has no kernel in the {self.name} backend")

    # ------------------------------------------------------------------ operations
    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        return self._table(plan)[1]

    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        # GCSAM's row means: a per-parameter reduction that ATen already does well
        _REFERENCE.centralize(bucket, plan)

    @staticmethod
    def _scale_grads(plan: Plan, factor: Tensor) -> None:
        # The compiled kernels take true gradients: GradScaler's factor and the clipping
        # coefficient are applied in place first (one more pass, as scaler.unscale_() does).
        for run in plan.runs:
            run.views["grad"].mul_(factor)

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext, partials: Tensor
    ) -> None:
        self._check_variant(ctx.variant)
        if ctx.unscale:  # perturb and (on one-pass steps) update read these unscaled values
            self._scale_grads(plan, ctx.status[S.INV_SCALE1])
        adaptive = bool(group["adaptive"])
        self.ops.stats(
            bucket.grad_flat,
            bucket.param_flat,
            self._table(plan)[0],
            partials[0],
            partials[1],
            adaptive,
            float(group["eta"]) if adaptive else 0.0,
        )

    def descent_stats(self, bucket: Bucket, plan: Plan, ctx: StepContext, partials: Tensor) -> None:
        # the non-finite count of g_p, and ||g_p||^2 for clipping; the inner products belong
        # to GSAM / LookSAM
        if ctx.unscale:
            self._scale_grads(plan, ctx.status[S.INV_SCALE2])
        partials[1:].zero_()
        table = self._table(plan)[0]
        sumsq = partials[2] if ctx.clip else None
        self.ops.stats(bucket.grad_flat, bucket.param_flat, table, sumsq, partials[0], False, 0.0)

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        self._check_variant(ctx.variant)
        adaptive = bool(group["adaptive"])
        self.ops.perturb(
            bucket.param_flat,
            bucket.grad_flat,
            bucket.backup_buffer(),
            ctx.status,
            self._table(plan)[0],
            float(group["rho"]),
            float(group["eta"]) if adaptive else 0.0,
            float(ctx.norm_eps),
            adaptive,
            bool(ctx.variant.normalized),
            bool(ctx.check),
        )

    def restore(self, bucket: Bucket, plan: Plan) -> None:
        if plan.runs:
            self.ops.restore(bucket.param_flat, bucket.backup_buffer(), self._table(plan)[0])

    def update(
        self,
        bucket: Bucket,
        perturbed: Plan | None,
        plan: Plan,
        spec: SGDSpec | AdamSpec,
        ctx: StepContext,
        descent: int,
    ) -> None:
        if descent != DESCENT.PLAIN:
            raise NotImplementedError(f"the {self.name} backend has no kernel for descent rule {descent}")
        if ctx.clip:
            self._scale_grads(plan, ctx.status[S.CLIP])
        if perturbed is plan:
            src = bucket.backup_buffer()  # the restore fused into the update
        else:
            if perturbed is not None:
                self.restore(bucket, perturbed)
            src = bucket.param_flat
        if not plan.runs:
            return
        table = self._table(plan)[0]
        common: tuple[Any, ...] = (bucket.steps, ctx.status, table)
        check = bool(ctx.check)
        if isinstance(spec, SGDSpec):
            buf = bucket.flat_buffer("momentum_buffer") if spec.momentum != 0 else None
            self.ops.sgd(
                src,
                bucket.param_flat,
                bucket.grad_flat,
                buf,
                *common,
                float(
                    spec.lr
                ),  # a CUDA tensor lr costs a sync here (the Triton backend reads it on the device)
                spec.momentum,
                1.0 - spec.dampening,
                spec.weight_decay,
                spec.nesterov,
                spec.maximize,
                check,
            )
        else:
            assert isinstance(spec, AdamSpec)
            self.ops.adam(
                src,
                bucket.param_flat,
                bucket.grad_flat,
                bucket.flat_buffer("exp_avg"),
                bucket.flat_buffer("exp_avg_sq"),
                bucket.flat_buffer("max_exp_avg_sq") if spec.amsgrad else None,
                *common,
                float(
                    spec.lr
                ),  # a CUDA tensor lr costs a sync here (the Triton backend reads it on the device)
                spec.beta1,
                spec.beta2,
                spec.eps,
                spec.weight_decay,
                spec.decoupled,
                spec.maximize,
                check,
            )

    def advance_steps(self, bucket: Bucket, plan: Plan, ctx: StepContext, count_skip: bool) -> None:
        self.ops.advance_steps(
            bucket.steps, bucket.mask_of(plan), ctx.status, bool(ctx.check), bool(count_skip)
        )


class CudaBackend(CppBackend):
    """The same operations from the CUDA extension (CUDA tensors, no host sync).

    The run table stays on the host: the library launches one kernel per run with the
    run's offsets as arguments, and the kernels read status and step counts on the device.
    """

    name = "cuda"
    device_type = "cuda"

    @classmethod
    def extension(cls) -> _Extension:
        return cuda_extension()
