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
from ..variants import Variant

__all__ = ["TritonBackend", "triton_available"]


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
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(self) -> None:
        from ..kernels import ascent, descent

        self.ascent = ascent
        self.descent = descent
        self._betas: dict[tuple[torch.device, float, float], Tensor] = {}

    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        return sum(self.ascent.stats_programs(run.numel) for run in plan.runs)

    def _stats(self, bucket, plan, variant, group, sumsq: Tensor | None, bad: Tensor) -> None:
        offset = 0
        adaptive = bool(group["adaptive"]) if sumsq is not None else False
        for run in plan.runs:
            programs = self.ascent.stats_programs(run.numel)
            self.ascent.ascent_stats_kernel[(programs,)](
                run.views["grad"],
                run.views["param"],
                bad if sumsq is None else sumsq[offset:],
                bad[offset:],
                run.numel,
                float(group["eta"]) if adaptive else 0.0,
                VARIANT=0 if variant is None else variant.kernel_id,
                ADAPTIVE=adaptive,
                WANT_SUMSQ=sumsq is not None,
                BLOCK=self.ascent.BLOCK,
                num_warps=8,
            )
            offset += programs

    def ascent_stats(self, bucket, plan, variant: Variant, group, partials: Tensor) -> None:
        self._stats(bucket, plan, variant, group, partials[0], partials[1])

    def count_nonfinite(self, bucket: Bucket, plan: Plan, out: Tensor) -> None:
        self._stats(bucket, plan, None, {"adaptive": False, "eta": 0.0}, None, out)

    def perturb(self, bucket, plan, variant: Variant, group, status, norm_eps, check) -> None:
        adaptive = bool(group["adaptive"])
        for run in plan.runs:
            self.ascent.perturb_kernel[(_grid(run.numel, self.ascent.BLOCK),)](
                run.views["param"],
                run.views["grad"],
                bucket.run_view(run, "backup"),
                status,
                run.numel,
                float(group["rho"]),
                float(group["eta"]) if adaptive else 0.0,
                float(norm_eps),
                VARIANT=variant.kernel_id,
                ADAPTIVE=adaptive,
                NORMALIZED=variant.normalized,
                CHECK=check,
                BLOCK=self.ascent.BLOCK,
                num_warps=8,
            )

    def restore(self, bucket: Bucket, plan: Plan) -> None:
        for run in plan.runs:
            self.descent.restore_kernel[(_grid(run.numel, self.descent.BLOCK),)](
                run.views["param"], bucket.run_view(run, "backup"), run.numel, BLOCK=self.descent.BLOCK
            )

    def update(self, bucket, perturbed: Plan, plan: Plan, spec, state, status, check) -> None:
        if perturbed is plan:
            source = "backup"  # restore fused into the update
        else:
            self.restore(bucket, perturbed)
            source = "param"
        for run in plan.runs:
            src = bucket.run_view(run, source)
            grid = (_grid(run.numel, self.descent.BLOCK),)
            steps = run.views.get("steps")
            if steps is None:
                steps = run.views["steps"] = bucket.steps[run.first :]
            if isinstance(spec, SGDSpec):
                has_momentum = spec.momentum != 0
                buf = bucket.run_view(run, "momentum_buffer") if has_momentum else src
                self.descent.sgd_kernel[grid](
                    src,
                    run.views["param"],
                    run.views["grad"],
                    buf,
                    steps,
                    status,
                    run.numel,
                    spec.lr,
                    spec.momentum,
                    1.0 - spec.dampening,
                    spec.weight_decay,
                    HAS_WEIGHT_DECAY=spec.weight_decay != 0,
                    HAS_MOMENTUM=has_momentum,
                    NESTEROV=spec.nesterov,
                    MAXIMIZE=spec.maximize,
                    CHECK=check,
                    BLOCK=self.descent.BLOCK,
                    num_warps=8,
                )
            else:
                assert isinstance(spec, AdamSpec)
                m = bucket.run_view(run, "exp_avg")
                v = bucket.run_view(run, "exp_avg_sq")
                vmax = bucket.run_view(run, "max_exp_avg_sq") if spec.amsgrad else v
                self.descent.adam_kernel[grid](
                    src,
                    run.views["param"],
                    run.views["grad"],
                    m,
                    v,
                    vmax,
                    steps,
                    self._betas_tensor(bucket.device, spec),
                    status,
                    run.numel,
                    spec.lr,
                    spec.beta2,
                    1.0 - spec.beta1,
                    1.0 - spec.beta2,
                    spec.eps,
                    spec.weight_decay,
                    1.0 - spec.lr * spec.weight_decay,
                    HAS_WEIGHT_DECAY=spec.weight_decay != 0,
                    DECOUPLED=spec.decoupled,
                    AMSGRAD=spec.amsgrad,
                    MAXIMIZE=spec.maximize,
                    CHECK=check,
                    BLOCK=self.descent.BLOCK,
                    num_warps=8,
                )

    def advance_steps(self, bucket: Bucket, plan: Plan, status, check, count_skip) -> None:
        n = len(bucket.params)
        self.descent.advance_steps_kernel[(_grid(n, 1024),)](
            bucket.steps, bucket.mask_of(plan), status, n, CHECK=check, COUNT_SKIP=count_skip, BLOCK=1024
        )

    def _betas_tensor(self, device: torch.device, spec: AdamSpec) -> Tensor:
        """The betas in float64 on the device, cached so a step uploads nothing."""
        key = (device, spec.beta1, spec.beta2)
        betas = self._betas.get(key)
        if betas is None:
            betas = torch.tensor([spec.beta1, spec.beta2], dtype=torch.float64, device=device)
            self._betas[key] = betas
        return betas


def _grid(n: int, block: int) -> int:
    return max(1, -(-n // block))
