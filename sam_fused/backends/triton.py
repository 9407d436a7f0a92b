"""The Triton backend: each operation is one kernel launch per run of a flat bucket.

A run is a contiguous span of the flat buffers (usually the whole bucket), so a model of
2000 tensors costs the same handful of launches as a model of one. Scalars that change
between steps (lr, rho) are plain kernel arguments: Triton does not specialise on float
values, so changing them recompiles nothing.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..base_updates import AdamSpec, BaseSpec, SGDSpec
from ..context import StepContext
from ..layout import Bucket, Plan, Run
from ..variants import Ascent, Descent
from .protocol import Capabilities
from .reference import centralize_each

__all__ = ["TritonBackend", "interpreting", "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend:
    """Fused flat-buffer kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"
    unscales_in_place = False  # the kernels multiply by 1/scale as they read a gradient
    # CPU tensors only through the interpreter, which must be on before triton is imported
    capabilities = Capabilities(
        device_types={"cuda", "cpu"} if interpreting() else {"cuda"},
        dtypes={torch.float32, torch.bfloat16, torch.float16},
        layouts={"flat"},
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
        slots = plan.cache.get("slots")
        if slots is None:
            slots = plan.cache["slots"] = sum(self.ascent.stats_programs(run.numel) for run in plan.runs)
        return slots

    @staticmethod
    def _count(bucket: Bucket, run: Run, name: str) -> Tensor:
        """The run's update count (``steps`` or ``vsteps``) as a pointer to its first entry."""
        view = run.views.get(name)
        if view is None:
            view = run.views[name] = getattr(bucket, name)[run.first :]
        return view

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
                bucket.grad_flat, starts, lengths, BLOCK=1024, num_warps=4
            )
        centralize_each(bucket, loose)  # parameters in another memory layout: one by one

    def noise(self, bucket: Bucket, ctx: StepContext, std: float, generator: torch.Generator) -> None:
        """RSAM: backup, then ``w <- w + delta`` with the same draw as the reference."""
        index = bucket.valid_index()
        draw = torch.randn(index.numel(), generator=generator, device=bucket.device, dtype=torch.float32)
        delta = bucket.flat_buffer("rsam_delta")
        delta.index_copy_(0, index, (draw * std).to(bucket.dtype))
        bucket.backup_buffer().copy_(bucket.param_flat)
        bucket.param_flat.add_(delta)

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext, partials: Tensor
    ) -> None:
        adaptive = bool(group["adaptive"])
        aux_name = self._aux_name(ctx)
        c1, c2 = ctx.scalars
        offset = 0
        for run in plan.runs:
            programs = self.ascent.stats_programs(run.numel)
            grad = run.views["grad"]
            self.ascent.ascent_stats_kernel[(programs,)](
                grad,
                run.views["param"],
                bucket.run_view(run, aux_name) if aux_name else grad,
                self._count(bucket, run, "vsteps"),
                ctx.status,
                partials[0, offset:],
                partials[1, offset:],
                run.numel,
                float(group["eta"]) if adaptive else 0.0,
                c1,
                c2,
                RULE=int(ctx.variant.ascent),
                ADAPTIVE=adaptive,
                WANT_SUMSQ=True,
                UNSCALE=ctx.unscale,
                BLOCK=self.ascent.BLOCK,
                num_warps=8,
            )
            offset += programs

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        variant = ctx.variant
        adaptive = bool(group["adaptive"])
        aux_name = self._aux_name(ctx)
        has_state = variant.ascent_updates_state
        c1, c2 = ctx.scalars
        rho, rho_on_device = _scalar_arg(group["rho"], bucket.device)
        for run in plan.runs:
            param, grad = run.views["param"], run.views["grad"]
            backup = bucket.run_view(run, "backup")
            self.ascent.perturb_kernel[(_grid(run.numel, self.ascent.BLOCK),)](
                param,
                backup if variant.noise else param,
                grad,
                backup,
                bucket.run_view(run, aux_name) if aux_name else grad,
                bucket.run_view(run, "first_grad") if variant.keeps_first_grad else grad,
                bucket.run_view(run, "state_prev") if has_state else grad,
                self._count(bucket, run, "vsteps"),
                ctx.status,
                run.numel,
                rho,
                float(group["eta"]) if adaptive else 0.0,
                float(ctx.norm_eps),
                c1,
                c2,
                RULE=int(variant.ascent),
                HAS_STATE=has_state,
                ADAPTIVE=adaptive,
                NORMALIZED=variant.normalized,
                RHO_ON_DEVICE=rho_on_device,
                CHECK=ctx.check,
                WRITE_BACKUP=not variant.noise,
                KEEP_GRAD=variant.keeps_first_grad,
                UNSCALE=ctx.unscale,
                BLOCK=self.ascent.BLOCK,
                num_warps=8,
            )
        if variant.noise or variant.keeps_first_grad:
            for run in bucket.complement_runs(plan):
                if variant.noise:  # parameters that took no part lose their noise
                    self._restore_run(bucket, run)
                if variant.keeps_first_grad:  # and have g = 0, not last step's
                    bucket.run_view(run, "first_grad").zero_()

    # ------------------------------------------------------------------ descent
    def revert_state(self, bucket: Bucket, plan: Plan, ctx: StepContext, force: bool = False) -> None:
        name = ctx.variant.running_state
        for run in plan.runs:
            self.ascent.revert_state_kernel[(_grid(run.numel, self.ascent.BLOCK),)](
                bucket.run_view(run, name),
                bucket.run_view(run, "state_prev"),
                ctx.status,
                run.numel,
                FORCE=force,
                BLOCK=self.ascent.BLOCK,
                num_warps=8,
            )

    def descent_stats(self, bucket: Bucket, plan: Plan, ctx: StepContext, partials: Tensor) -> None:
        inner = ctx.variant.keeps_first_grad
        offset = 0
        for run in plan.runs:
            programs = self.ascent.stats_programs(run.numel)
            grad = run.views["grad"]
            self.descent.descent_stats_kernel[(programs,)](
                grad,
                bucket.run_view(run, "first_grad") if inner else grad,
                partials[0, offset:],
                partials[1, offset:],
                partials[2, offset:],
                partials[3, offset:],
                ctx.status,
                run.numel,
                INNER=inner,
                WANT_GP2=ctx.clip,
                UNSCALE=ctx.unscale,
                BLOCK=self.ascent.BLOCK,
                num_warps=8,
            )
            offset += programs

    def restore(self, bucket: Bucket, plan: Plan | None) -> None:
        if plan is None:  # every parameter (RSAM's noise moved them all)
            bucket.param_flat.copy_(bucket.backup_buffer())
            return
        for run in plan.runs:
            self._restore_run(bucket, run)

    def _restore_run(self, bucket: Bucket, run: Run) -> None:
        self.descent.restore_kernel[(_grid(run.numel, self.descent.BLOCK),)](
            bucket.param_flat[run.start : run.stop],
            bucket.run_view(run, "backup"),
            run.numel,
            BLOCK=self.descent.BLOCK,
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
        launch = self._updates[type(spec)]
        for run in plan.runs:
            grad = run.views["grad"]
            if descent in (Descent.GSAM, Descent.LOOKSAM_FULL):
                aux = bucket.run_view(run, "first_grad")
            elif descent == Descent.LOOKSAM_REUSE:
                aux = bucket.run_view(run, "looksam_gv")
            else:
                aux = grad
            gv = bucket.run_view(run, "looksam_gv") if descent == Descent.LOOKSAM_FULL else grad
            launch(bucket, run, bucket.run_view(run, source), aux, gv, spec, ctx, int(descent))

    # one launcher per fused base update: the update's own arguments, then the descent's
    def _sgd(self, bucket, run, src, aux, gv, spec: SGDSpec, ctx: StepContext, descent: int) -> None:
        lr, lr_on_device = _scalar_arg(spec.lr, bucket.device)
        has_momentum = spec.momentum != 0
        self.descent.sgd_kernel[(_grid(run.numel, self.descent.BLOCK),)](
            src,
            run.views["param"],
            run.views["grad"],
            bucket.run_view(run, "momentum_buffer") if has_momentum else src,
            aux,
            gv,
            self._count(bucket, run, "steps"),
            ctx.status,
            run.numel,
            lr,
            spec.momentum,
            1.0 - spec.dampening,
            spec.weight_decay,
            ctx.alpha,
            DESCENT=descent,
            UNSCALE=ctx.unscale,
            CLIP_GRAD=ctx.clip,
            CHECK=ctx.check,
            HAS_WEIGHT_DECAY=spec.weight_decay != 0,
            HAS_MOMENTUM=has_momentum,
            NESTEROV=spec.nesterov,
            MAXIMIZE=spec.maximize,
            LR_ON_DEVICE=lr_on_device,
            BLOCK=self.descent.BLOCK,
            num_warps=8,
        )

    def _adam(self, bucket, run, src, aux, gv, spec: AdamSpec, ctx: StepContext, descent: int) -> None:
        lr, lr_on_device = _scalar_arg(spec.lr, bucket.device)
        v = bucket.run_view(run, "exp_avg_sq")
        self.descent.adam_kernel[(_grid(run.numel, self.descent.BLOCK),)](
            src,
            run.views["param"],
            run.views["grad"],
            bucket.run_view(run, "exp_avg"),
            v,
            bucket.run_view(run, "max_exp_avg_sq") if spec.amsgrad else v,
            aux,
            gv,
            self._count(bucket, run, "steps"),
            _betas(bucket, spec),
            ctx.status,
            run.numel,
            lr,
            spec.beta2,
            1.0 - spec.beta1,
            1.0 - spec.beta2,
            spec.eps,
            spec.weight_decay,
            0.0 if lr_on_device else 1.0 - lr * spec.weight_decay,
            ctx.alpha,
            DESCENT=descent,
            UNSCALE=ctx.unscale,
            CLIP_GRAD=ctx.clip,
            CHECK=ctx.check,
            HAS_WEIGHT_DECAY=spec.weight_decay != 0,
            DECOUPLED=spec.decoupled,
            AMSGRAD=spec.amsgrad,
            MAXIMIZE=spec.maximize,
            LR_ON_DEVICE=lr_on_device,
            BLOCK=self.descent.BLOCK,
            num_warps=8,
        )

    def state_sumsq(self, bucket: Bucket, plan: Plan, name: str, partials: Tensor) -> None:
        """Sum of squares of flat state buffer ``name`` over the plan, into ``partials[0]``."""
        offset = 0
        for run in plan.runs:
            programs = self.ascent.stats_programs(run.numel)
            view = bucket.run_view(run, name)
            self.ascent.ascent_stats_kernel[(programs,)](
                view,
                view,
                view,
                self._count(bucket, run, "vsteps"),
                partials,  # status: not read without UNSCALE
                partials[0, offset:],
                partials[1, offset:],  # non-finite count of the state: not needed
                run.numel,
                0.0,
                0.0,
                0.0,
                RULE=int(Ascent.GRAD),
                ADAPTIVE=False,
                WANT_SUMSQ=True,
                UNSCALE=False,
                BLOCK=self.ascent.BLOCK,
                num_warps=8,
            )
            offset += programs

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
