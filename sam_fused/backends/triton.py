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

from ..base_updates import AdamSpec, SGDSpec
from ..layout import Bucket, Plan
from ..variants import ASCENT, DESCENT
from .reference import StepContext, centralized

__all__ = ["TritonBackend", "interpreting", "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _variant_scalars(ctx: StepContext) -> tuple[float, float]:
    """The two per-variant scalars the ascent kernels take (``c1, c2``)."""
    o, rule = ctx.options, ctx.variant.ascent
    if rule == ASCENT.VASSO:
        return float(o["theta"]), 0.0
    if rule == ASCENT.FSAM:
        return float(o["sigma"]), float(o["lam"])
    if rule == ASCENT.RSAM:
        return float(o["lam"]), 0.0
    return 0.0, 0.0


class TritonBackend:
    """Fused flat-buffer kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    unscales_in_place = False  # the kernels multiply by 1/scale as they read a gradient

    def __init__(self) -> None:
        from ..kernels import ascent, descent

        self.ascent = ascent
        self.descent = descent
        self._betas: dict[tuple[torch.device, float, float], Tensor] = {}

    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        return sum(self.ascent.stats_programs(run.numel) for run in plan.runs)

    def _aux_name(self, ctx: StepContext) -> str | None:
        if ctx.variant.ascent == ASCENT.RSAM:
            return "rsam_delta"
        return ctx.variant.state[0] if ctx.variant.ascent in (ASCENT.VASSO, ASCENT.FSAM) else None

    def _steps(self, bucket: Bucket, run) -> Tensor:
        steps = run.views.get("steps")
        if steps is None:
            steps = run.views["steps"] = bucket.steps[run.first :]
        return steps

    # ------------------------------------------------------------------ ascent
    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        starts, lengths, loose = bucket.row_table(plan)
        if starts.numel():
            self.ascent.centralize_kernel[(starts.numel(),)](
                bucket.grad_flat, starts, lengths, BLOCK=1024, num_warps=4
            )
        for i in loose:  # parameters in another memory layout: one by one
            g = bucket.params[i].grad
            g.copy_(centralized(g.float()))

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
        c1, _ = _variant_scalars(ctx)
        offset = 0
        for run in plan.runs:
            programs = self.ascent.stats_programs(run.numel)
            grad = run.views["grad"]
            self.ascent.ascent_stats_kernel[(programs,)](
                grad,
                run.views["param"],
                bucket.run_view(run, aux_name) if aux_name else grad,
                self._steps(bucket, run),
                ctx.status,
                partials[0, offset:],
                partials[1, offset:],
                run.numel,
                float(group["eta"]) if adaptive else 0.0,
                c1,
                RULE=ctx.variant.ascent,
                ADAPTIVE=adaptive,
                WANT_SUMSQ=True,
                UNSCALE=ctx.unscale,
                BLOCK=self.ascent.BLOCK,
                num_warps=8,
            )
            offset += programs

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        adaptive = bool(group["adaptive"])
        aux_name = self._aux_name(ctx)
        noise = ctx.variant.noise
        keep = ctx.variant.keeps_first_grad
        keeps_prev = ctx.check and ctx.variant.ascent in (ASCENT.VASSO, ASCENT.FSAM)
        c1, c2 = _variant_scalars(ctx)
        rho, rho_on_device = _scalar_arg(group["rho"], bucket.device)
        for run in plan.runs:
            param, grad = run.views["param"], run.views["grad"]
            backup = bucket.run_view(run, "backup")
            self.ascent.perturb_kernel[(_grid(run.numel, self.ascent.BLOCK),)](
                param,
                backup if noise else param,
                grad,
                backup,
                bucket.run_view(run, aux_name) if aux_name else grad,
                bucket.run_view(run, "first_grad") if keep else grad,
                bucket.run_view(run, "state_prev") if keeps_prev else grad,
                self._steps(bucket, run),
                ctx.status,
                run.numel,
                rho,
                float(group["eta"]) if adaptive else 0.0,
                float(ctx.norm_eps),
                c1,
                c2,
                RULE=ctx.variant.ascent,
                ADAPTIVE=adaptive,
                NORMALIZED=ctx.variant.normalized,
                RHO_ON_DEVICE=rho_on_device,
                CHECK=ctx.check,
                WRITE_BACKUP=not noise,
                KEEP_GRAD=keep,
                UNSCALE=ctx.unscale,
                BLOCK=self.ascent.BLOCK,
                num_warps=8,
            )
        if noise:  # parameters that took no part lose their noise
            for run in bucket.complement_runs(plan):
                self._restore_run(bucket, run)

    # ------------------------------------------------------------------ descent
    def revert_state(self, bucket: Bucket, plan: Plan, ctx: StepContext) -> None:
        name = ctx.variant.state[0]
        for run in plan.runs:
            self.ascent.revert_state_kernel[(_grid(run.numel, self.ascent.BLOCK),)](
                bucket.run_view(run, name),
                bucket.run_view(run, "state_prev"),
                ctx.status,
                run.numel,
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

    def restore(self, bucket: Bucket, plan: Plan) -> None:
        for run in plan.runs:
            self._restore_run(bucket, run)

    def _restore_run(self, bucket: Bucket, run) -> None:
        self.descent.restore_kernel[(_grid(run.numel, self.descent.BLOCK),)](
            run.views["param"], bucket.run_view(run, "backup"), run.numel, BLOCK=self.descent.BLOCK
        )

    def update(
        self,
        bucket: Bucket,
        perturbed: Plan | None,
        plan: Plan,
        spec: SGDSpec | AdamSpec,
        ctx: StepContext,
        descent: int,
    ) -> None:
        if perturbed is plan:
            source = "backup"  # the restore is fused into the update
        else:
            if perturbed is not None:
                self.restore(bucket, perturbed)
            source = "param"
        alpha = float(ctx.options.get("alpha", 0.0))
        lr, lr_on_device = _scalar_arg(spec.lr, bucket.device)
        for run in plan.runs:
            src = bucket.run_view(run, source)
            grad = run.views["grad"]
            if descent in (DESCENT.GSAM, DESCENT.LOOKSAM_FULL):
                aux = bucket.run_view(run, "first_grad")
            elif descent == DESCENT.LOOKSAM_REUSE:
                aux = bucket.run_view(run, "looksam_gv")
            else:
                aux = grad
            gv = bucket.run_view(run, "looksam_gv") if descent == DESCENT.LOOKSAM_FULL else grad
            grid = (_grid(run.numel, self.descent.BLOCK),)
            if isinstance(spec, SGDSpec):
                has_momentum = spec.momentum != 0
                self.descent.sgd_kernel[grid](
                    src,
                    run.views["param"],
                    grad,
                    bucket.run_view(run, "momentum_buffer") if has_momentum else src,
                    aux,
                    gv,
                    self._steps(bucket, run),
                    ctx.status,
                    run.numel,
                    lr,
                    spec.momentum,
                    1.0 - spec.dampening,
                    spec.weight_decay,
                    alpha,
                    DESCENT=descent,
                    UNSCALE=ctx.unscale,
                    CLIP_GRAD=ctx.clip,
                    HAS_WEIGHT_DECAY=spec.weight_decay != 0,
                    HAS_MOMENTUM=has_momentum,
                    NESTEROV=spec.nesterov,
                    MAXIMIZE=spec.maximize,
                    CHECK=ctx.check,
                    LR_ON_DEVICE=lr_on_device,
                    BLOCK=self.descent.BLOCK,
                    num_warps=8,
                )
            else:
                m = bucket.run_view(run, "exp_avg")
                v = bucket.run_view(run, "exp_avg_sq")
                self.descent.adam_kernel[grid](
                    src,
                    run.views["param"],
                    grad,
                    m,
                    v,
                    bucket.run_view(run, "max_exp_avg_sq") if spec.amsgrad else v,
                    aux,
                    gv,
                    self._steps(bucket, run),
                    self._betas_tensor(bucket.device, spec),
                    ctx.status,
                    run.numel,
                    lr,
                    spec.beta2,
                    1.0 - spec.beta1,
                    1.0 - spec.beta2,
                    spec.eps,
                    spec.weight_decay,
                    0.0 if lr_on_device else 1.0 - lr * spec.weight_decay,
                    alpha,
                    DESCENT=descent,
                    UNSCALE=ctx.unscale,
                    CLIP_GRAD=ctx.clip,
                    HAS_WEIGHT_DECAY=spec.weight_decay != 0,
                    DECOUPLED=spec.decoupled,
                    AMSGRAD=spec.amsgrad,
                    MAXIMIZE=spec.maximize,
                    CHECK=ctx.check,
                    LR_ON_DEVICE=lr_on_device,
                    BLOCK=self.descent.BLOCK,
                    num_warps=8,
                )

    def state_sumsq(self, bucket: Bucket, plan: Plan, name: str, state: dict, partials: Tensor) -> None:
        """Sum of squares of flat state buffer ``name`` over the plan, into ``partials[0]``."""
        offset = 0
        for run in plan.runs:
            programs = self.ascent.stats_programs(run.numel)
            view = bucket.run_view(run, name)
            self.ascent.ascent_stats_kernel[(programs,)](
                view,
                view,
                view,
                self._steps(bucket, run),
                partials,  # status: not read without UNSCALE
                partials[0, offset:],
                partials[1, offset:],  # non-finite count of the state: not needed
                run.numel,
                0.0,
                0.0,
                RULE=0,
                ADAPTIVE=False,
                WANT_SUMSQ=True,
                UNSCALE=False,
                BLOCK=self.ascent.BLOCK,
                num_warps=8,
            )
            offset += programs

    def advance_steps(self, bucket: Bucket, plan: Plan, ctx: StepContext, count_skip: bool) -> None:
        n = len(bucket.params)
        self.descent.advance_steps_kernel[(_grid(n, 1024),)](
            bucket.steps,
            bucket.mask_of(plan),
            ctx.status,
            n,
            CHECK=ctx.check,
            COUNT_SKIP=count_skip,
            BLOCK=1024,
        )

    def _betas_tensor(self, device: torch.device, spec: AdamSpec) -> Tensor:
        """The betas in float64 on the device, cached so a step uploads nothing."""
        key = (device, spec.beta1, spec.beta2)
        betas = self._betas.get(key)
        if betas is None:
            betas = torch.tensor([spec.beta1, spec.beta2], dtype=torch.float64, device=device)
            self._betas[key] = betas
        return betas


def _scalar_arg(value: float | Tensor, device: torch.device) -> tuple[float | Tensor, bool]:
    """A hyperparameter as a kernel argument: a device scalar is passed by pointer (the
    kernel loads it, so in-place schedule updates reach CUDA graph replays); a Python
    float or a CPU tensor (read without a sync) by value."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor hyperparameter must hold one value, got shape {tuple(value.shape)}")
        if value.device == device:
            return value, True
        if value.device.type == "cpu":
            return float(value), False
        raise ValueError(f"a hyperparameter tensor on {value.device} cannot drive parameters on {device}")
    return float(value), False


def _grid(n: int, block: int) -> int:
    return max(1, -(-n // block))
