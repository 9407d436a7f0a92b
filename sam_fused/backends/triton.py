"""The Triton backend: each operation is one kernel launch per bucket.

A plan's run is a table of tensor addresses (``tables.py``: the parameters where they are,
the bucket's own buffers for everything else), one kernel program per ``CHUNK``-element
chunk of a tensor. So a model of 2000 tensors costs the same handful of launches as a model
of one: the kernels take a ``TABLE`` constexpr and find their elements through the tables
(``kernels/common.py``). Scalars that change between steps (lr, rho) are plain kernel
arguments: Triton does not specialise on float values, so changing them recompiles nothing.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..base_updates import AdamSpec, BaseSpec, SGDSpec
from ..context import StepContext
from ..layout import Bucket, Plan
from ..tables import CHUNK, TableRun
from ..variants import Ascent, Descent
from .protocol import Capabilities
from .reference import centralize_each

__all__ = ["TritonBackend", "interpreting", "triton_available"]

# warps per program of the elementwise and statistics kernels: 128 threads over a CHUNK of
# 1024 elements give each thread 8 consecutive elements, 16 bytes of a 16-bit dtype, so the
# aligned specialization (TABLE=2) loads and stores 128-bit vectors for every dtype (float32:
# two per stream); with 8 warps a bfloat16 thread would hold 4 elements, 64-bit accesses
WARPS = 4


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend:
    """Fused multi-tensor kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"
    unscales_in_place = False  # the kernels multiply by 1/scale as they read a gradient
    # CPU tensors only through the interpreter, which must be on before triton is imported
    capabilities = Capabilities(
        device_types={"cuda", "cpu"} if interpreting() else {"cuda"},
        dtypes={torch.float32, torch.bfloat16, torch.float16},
        ascents=frozenset(Ascent),
        descents=frozenset(Descent),
        updates={SGDSpec.name, AdamSpec.name},
    )

    def __init__(self) -> None:
        from ..kernels import ascent, descent

        self.ascent = ascent
        self.descent = descent
        # the fused base updates: a new one is a spec, a kernel and a launcher here
        self._updates = {SGDSpec: self._sgd, AdamSpec: self._adam}

    def __reduce__(self):
        return (_instance, ())

    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        """Partial sums (= programs) of a statistics launch: one per chunk."""
        return plan.run.programs()

    @staticmethod
    def _aux_name(ctx: StepContext) -> str | None:
        if ctx.variant.ascent == Ascent.RSAM:
            return "rsam_delta"
        return ctx.variant.running_state if ctx.variant.ascent_updates_state else None

    # ------------------------------------------------------------------ ascent
    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        starts, lengths, loose = bucket.row_table(plan)
        if starts.numel():
            self.ascent.centralize_kernel[(starts.numel(),)](
                plan.run.like, starts, lengths, TABLE=True, BLOCK=1024, num_warps=4
            )
        centralize_each(bucket, loose)  # gradients in another memory layout: one by one

    def noise(self, bucket: Bucket, ctx: StepContext, std: float, generator: torch.Generator) -> None:
        """RSAM: backup, then ``w <- w + delta``, with the reference's one draw for the whole
        bucket split in parameter order (so every backend sees the same delta)."""
        run = bucket.all_run()
        draw = torch.randn(sum(bucket.numels), generator=generator, device=bucket.device, dtype=torch.float32)
        deltas = run.tensors("rsam_delta")
        offset = 0
        for w, delta in zip(run.weights, deltas):
            delta.copy_(draw[offset : offset + w.numel()].view(w.shape).mul(std))
            offset += w.numel()
        torch._foreach_copy_(run.tensors("backup"), run.weights)
        torch._foreach_add_(run.weights, deltas)

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext, partials: Tensor
    ) -> None:
        adaptive = bool(group["adaptive"])
        aux_name = self._aux_name(ctx)
        c1, c2 = ctx.scalars
        run = plan.run
        grad = run.addresses("grad")
        self.ascent.ascent_stats_kernel[(run.programs(),)](
            grad,
            run.addresses("param"),
            run.addresses(aux_name) if aux_name else grad,
            bucket.vsteps,
            ctx.status,
            partials[0],
            partials[1],
            0,
            float(group["eta"]) if adaptive else 0.0,
            c1,
            c2,
            run.table,
            run.like,
            RULE=int(ctx.variant.ascent),
            ADAPTIVE=adaptive,
            WANT_SUMSQ=True,
            UNSCALE=ctx.unscale,
            TABLE=run.layout_code,
            BLOCK=CHUNK,
            num_warps=WARPS,
        )

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        variant = ctx.variant
        adaptive = bool(group["adaptive"])
        aux_name = self._aux_name(ctx)
        has_state = variant.ascent_updates_state
        c1, c2 = ctx.scalars
        rho, rho_on_device = _scalar_arg(group["rho"], bucket.device)
        run = plan.run
        param, grad, backup = run.addresses("param"), run.addresses("grad"), run.addresses("backup")
        self.ascent.perturb_kernel[(run.programs(),)](
            param,
            backup if variant.noise else param,
            grad,
            backup,
            run.addresses(aux_name) if aux_name else grad,
            run.addresses("first_grad") if variant.keeps_first_grad else grad,
            run.addresses("state_prev") if has_state else grad,
            bucket.vsteps,
            ctx.status,
            0,
            rho,
            float(group["eta"]) if adaptive else 0.0,
            float(ctx.norm_eps),
            c1,
            c2,
            run.table,
            run.like,
            RULE=int(variant.ascent),
            HAS_STATE=has_state,
            ADAPTIVE=adaptive,
            NORMALIZED=variant.normalized,
            RHO_ON_DEVICE=rho_on_device,
            CHECK=ctx.check,
            WRITE_BACKUP=not variant.noise,
            KEEP_GRAD=variant.keeps_first_grad,
            UNSCALE=ctx.unscale,
            TABLE=run.layout_code,
            BLOCK=CHUNK,
            num_warps=WARPS,
        )
        left_out = bucket.complement_run(plan)
        if left_out is not None:
            if variant.noise:  # parameters that took no part lose their noise
                self._restore_run(left_out)
            if variant.keeps_first_grad:  # and have g = 0, not last step's
                torch._foreach_zero_(left_out.tensors("first_grad"))

    # ------------------------------------------------------------------ descent
    def revert_state(self, bucket: Bucket, plan: Plan, ctx: StepContext, force: bool = False) -> None:
        run = plan.run
        self.ascent.revert_state_kernel[(run.programs(),)](
            run.addresses(ctx.variant.running_state),
            run.addresses("state_prev"),
            ctx.status,
            0,
            run.table,
            run.like,
            FORCE=force,
            TABLE=run.layout_code,
            BLOCK=CHUNK,
            num_warps=WARPS,
        )

    def descent_stats(self, bucket: Bucket, plan: Plan, ctx: StepContext, partials: Tensor) -> None:
        inner = ctx.variant.keeps_first_grad
        run = plan.run
        grad = run.addresses("grad")
        self.descent.descent_stats_kernel[(run.programs(),)](
            grad,
            run.addresses("first_grad") if inner else grad,
            partials[0],
            partials[1],
            partials[2],
            partials[3],
            ctx.status,
            0,
            run.table,
            run.like,
            INNER=inner,
            WANT_GP2=ctx.clip,
            UNSCALE=ctx.unscale,
            TABLE=run.layout_code,
            BLOCK=CHUNK,
            num_warps=WARPS,
        )

    def restore(self, bucket: Bucket, plan: Plan | None) -> None:
        if plan is None:  # every parameter (RSAM's noise moved them all)
            self._restore_run(bucket.all_run())
        elif not plan.empty:
            self._restore_run(plan.run)

    def _restore_run(self, run: TableRun) -> None:
        self.descent.restore_kernel[(run.programs(),)](
            run.addresses("param"),
            run.addresses("backup"),
            0,
            run.table,
            run.like,
            TABLE=run.layout_code,
            BLOCK=CHUNK,
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
            source = "backup"  # the restore is fused into the update
        else:
            if perturbed is not None:
                self.restore(bucket, perturbed)
            source = "param"
        if plan.empty:
            return
        run = plan.run
        grad = run.addresses("grad")
        if descent in (Descent.GSAM, Descent.LOOKSAM_FULL):
            aux = run.addresses("first_grad")
        elif descent == Descent.LOOKSAM_REUSE:
            aux = run.addresses("looksam_gv")
        else:
            aux = grad
        gv = run.addresses("looksam_gv") if descent == Descent.LOOKSAM_FULL else grad
        self._updates[type(spec)](bucket, run, run.addresses(source), aux, gv, spec, ctx, int(descent))

    # one launcher per fused base update: the update's own arguments, then the descent's
    def _sgd(self, bucket, run, src, aux, gv, spec: SGDSpec, ctx: StepContext, descent: int) -> None:
        lr, lr_on_device = _scalar_arg(spec.lr, bucket.device)
        has_momentum = spec.momentum != 0
        self.descent.sgd_kernel[(run.programs(),)](
            src,
            run.addresses("param"),
            run.addresses("grad"),
            run.addresses("momentum_buffer") if has_momentum else src,
            aux,
            gv,
            bucket.steps,
            ctx.status,
            0,
            lr,
            spec.momentum,
            1.0 - spec.dampening,
            spec.weight_decay,
            ctx.alpha,
            run.table,
            run.like,
            DESCENT=descent,
            UNSCALE=ctx.unscale,
            CLIP_GRAD=ctx.clip,
            CHECK=ctx.check,
            HAS_WEIGHT_DECAY=spec.weight_decay != 0,
            HAS_MOMENTUM=has_momentum,
            NESTEROV=spec.nesterov,
            MAXIMIZE=spec.maximize,
            LR_ON_DEVICE=lr_on_device,
            TABLE=run.layout_code,
            BLOCK=CHUNK,
            num_warps=WARPS,
        )

    def _adam(self, bucket, run, src, aux, gv, spec: AdamSpec, ctx: StepContext, descent: int) -> None:
        lr, lr_on_device = _scalar_arg(spec.lr, bucket.device)
        v = run.addresses("exp_avg_sq")
        self.descent.adam_kernel[(run.programs(),)](
            src,
            run.addresses("param"),
            run.addresses("grad"),
            run.addresses("exp_avg"),
            v,
            run.addresses("max_exp_avg_sq") if spec.amsgrad else v,
            aux,
            gv,
            bucket.steps,
            _betas(bucket, spec),
            ctx.status,
            0,
            lr,
            spec.beta2,
            1.0 - spec.beta1,
            1.0 - spec.beta2,
            spec.eps,
            spec.weight_decay,
            0.0 if lr_on_device else 1.0 - lr * spec.weight_decay,
            ctx.alpha,
            run.table,
            run.like,
            DESCENT=descent,
            UNSCALE=ctx.unscale,
            CLIP_GRAD=ctx.clip,
            CHECK=ctx.check,
            HAS_WEIGHT_DECAY=spec.weight_decay != 0,
            DECOUPLED=spec.decoupled,
            AMSGRAD=spec.amsgrad,
            MAXIMIZE=spec.maximize,
            LR_ON_DEVICE=lr_on_device,
            TABLE=run.layout_code,
            BLOCK=CHUNK,
            num_warps=WARPS,
        )

    def state_sumsq(self, bucket: Bucket, plan: Plan, name: str, partials: Tensor) -> None:
        """Sum of squares of state ``name`` over the plan, into ``partials[0]``."""
        run = plan.run
        view = run.addresses(name)
        self.ascent.ascent_stats_kernel[(run.programs(),)](
            view,
            view,
            view,
            bucket.vsteps,
            partials,  # status: not read without UNSCALE
            partials[0],
            partials[1],  # non-finite count of the state: not needed
            0,
            0.0,
            0.0,
            0.0,
            run.table,
            run.like,
            RULE=int(Ascent.GRAD),
            ADAPTIVE=False,
            WANT_SUMSQ=True,
            UNSCALE=False,
            TABLE=run.layout_code,
            BLOCK=CHUNK,
            num_warps=WARPS,
        )

    def advance_steps(
        self, bucket: Bucket, plan: Plan, ctx: StepContext, count_skip: bool, base: bool, variant: bool
    ) -> None:
        n = len(bucket.params)
        self.descent.advance_steps_kernel[(_grid(n, 1024),)](
            bucket.steps,
            bucket.vsteps,
            bucket.mask_of(plan),
            ctx.status,
            n,
            BASE=base,
            VARIANT=variant,
            CHECK=ctx.check,
            COUNT_SKIP=count_skip,
            BLOCK=1024,
        )


def _betas(bucket: Bucket, spec: AdamSpec) -> Tensor:
    """Adam's betas in float64 on the device, for the bias corrections: one small tensor per
    bucket, rewritten in place only when the values change (a schedule that cycles the
    betas, such as OneCycleLR, costs one tiny copy per change, and nothing accumulates)."""
    held = bucket.cache.get("betas")
    values = (spec.beta1, spec.beta2)
    if held is None:
        held = bucket.cache["betas"] = [None, torch.empty(2, dtype=torch.float64, device=bucket.device)]
    if held[0] != values:
        held[1].copy_(torch.tensor(values, dtype=torch.float64))
        held[0] = values
    return held[1]


def _scalar_arg(value: float | Tensor, device: torch.device) -> tuple[float | Tensor, bool]:
    """A hyperparameter as a kernel argument: a device scalar is passed by pointer (the
    kernel loads it, so in-place schedule updates reach CUDA graph replays); a Python
    float or a CPU tensor (read without a sync) by value."""
    if isinstance(value, Tensor):
        if value.device == device:
            return value, True
        return float(value), False
    return float(value), False


def _grid(n: int, block: int) -> int:
    return max(1, -(-n // block))


def _instance() -> TritonBackend:
    from . import get_backend

    return get_backend("triton")
