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

from ..base_updates import BaseSpec
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
    """Fused multi-tensor kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

    Every launch passes its arguments by name; a role the launch lacks is None (the kernels
    leave it out at compile time). ``_launch`` adds what every launch over a run shares.
    """

    name = "triton"
    unscales_in_place = False  # the kernels multiply by 1/scale as they read a gradient
    # CPU tensors only through the interpreter, which must be on before triton is imported;
    # every base update with a spec has its math in kernels/bases.py (updates=None: all)
    capabilities = Capabilities(
        device_types={"cuda", "cpu"} if interpreting() else {"cuda"},
        dtypes={torch.float32, torch.bfloat16, torch.float16},
        ascents=frozenset(Ascent),
        descents=frozenset(Descent),
        updates=None,
    )

    def __init__(self) -> None:
        from ..kernels import ascent, descent

        self.ascent = ascent
        self.descent = descent

    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        """Partial sums (= programs) of a statistics launch: one per chunk."""
        return plan.run.programs()

    @staticmethod
    def _launch(kernel, run: TableRun, **args) -> None:
        """One program per chunk of ``run``, with its chunk table and element type."""
        kernel[(run.programs(),)](
            table=run.table, like=run.like, TABLE=run.layout_code, BLOCK=CHUNK, num_warps=WARPS, **args
        )

    # ------------------------------------------------------------------ ascent
    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        starts, lengths, loose = plan.run.centralize_rows()
        if starts.numel():
            self.ascent.centralize_kernel[(starts.numel(),)](
                like=plan.run.like, row_start=starts, row_len=lengths, BLOCK=1024, num_warps=4
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
        run, variant = plan.run, ctx.variant
        adaptive = bool(group["adaptive"])
        c1, c2 = ctx.scalars
        self._launch(
            self.ascent.ascent_stats_kernel,
            run,
            grad=run.addresses("grad"),
            param=run.addresses("param") if adaptive else None,
            aux=run.addresses(variant.aux_role) if variant.aux_role else None,
            vsteps=bucket.vsteps,
            status=ctx.status,
            sumsq_out=partials[0],
            bad_out=partials[1],
            eta=float(group["eta"]) if adaptive else 0.0,
            c1=c1,
            c2=c2,
            RULE=int(variant.ascent),
            ADAPTIVE=adaptive,
            UNSCALE=ctx.unscale,
        )

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        run, variant = plan.run, ctx.variant
        adaptive = bool(group["adaptive"])
        c1, c2 = ctx.scalars
        rho, rho_on_device = _scalar_arg(group["rho"], bucket.device)
        backup = run.addresses("backup")
        self._launch(
            self.ascent.perturb_kernel,
            run,
            param=run.addresses("param"),
            # RSAM perturbs from w before the noise, its backup
            src=backup if variant.perturbs_before_pass else run.addresses("param"),
            grad=run.addresses("grad"),
            backup=None if variant.perturbs_before_pass else backup,
            aux=run.addresses(variant.aux_role) if variant.aux_role else None,
            keep=run.addresses("first_grad") if variant.keeps_first_grad else None,
            prev=run.addresses("state_prev") if variant.ascent_updates_state else None,
            vsteps=bucket.vsteps,
            status=ctx.status,
            rho_arg=rho,
            eta=float(group["eta"]) if adaptive else 0.0,
            norm_eps=float(ctx.norm_eps),
            c1=c1,
            c2=c2,
            RULE=int(variant.ascent),
            ADAPTIVE=adaptive,
            NORMALIZED=variant.normalized,
            CHECK=ctx.check,
            UNSCALE=ctx.unscale,
            RHO_ON_DEVICE=rho_on_device,
        )
        left_out = bucket.complement_run(plan)
        if left_out is not None:
            if variant.perturbs_before_pass:  # parameters that took no part lose their noise
                self._restore_run(left_out)
            if variant.keeps_first_grad:  # and have g = 0, not last step's
                torch._foreach_zero_(left_out.tensors("first_grad"))

    # ------------------------------------------------------------------ descent
    def revert_state(self, bucket: Bucket, plan: Plan, ctx: StepContext, force: bool = False) -> None:
        run = plan.run
        self._launch(
            self.ascent.revert_state_kernel,
            run,
            state=run.addresses(ctx.variant.running_state),
            prev=run.addresses("state_prev"),
            status=ctx.status,
            FORCE=force,
        )

    def descent_stats(self, bucket: Bucket, plan: Plan, ctx: StepContext, partials: Tensor) -> None:
        run = plan.run
        self._launch(
            self.descent.descent_stats_kernel,
            run,
            grad=run.addresses("grad"),
            first_grad=run.addresses("first_grad") if ctx.variant.keeps_first_grad else None,
            bad_out=partials[0],
            dot_out=partials[1],
            gp2_out=partials[2],
            g2_out=partials[3],
            status=ctx.status,
            WANT_GP2=ctx.clip,
            UNSCALE=ctx.unscale,
        )

    def restore(self, bucket: Bucket, plan: Plan | None) -> None:
        if plan is None:  # every parameter (RSAM's noise moved them all)
            self._restore_run(bucket.all_run())
        elif not plan.empty:
            self._restore_run(plan.run)

    def _restore_run(self, run: TableRun) -> None:
        self._launch(
            self.descent.restore_kernel, run, param=run.addresses("param"), backup=run.addresses("backup")
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
        states = [run.addresses(name) for name in spec.state_names()]
        states += [None] * (3 - len(states))
        if descent in (Descent.GSAM, Descent.LOOKSAM_FULL):
            aux = run.addresses("first_grad")
        elif descent == Descent.LOOKSAM_REUSE:
            aux = run.addresses("looksam_gv")
        else:
            aux = None
        lr, lr_on_device = _scalar_arg(spec.lr, bucket.device)
        h = (*spec.kernel_scalars(), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)[:6]
        self._launch(
            self.descent.update_kernel,
            run,
            src=run.addresses(source),
            param=run.addresses("param"),
            grad=run.addresses("grad"),
            state0=states[0],
            state1=states[1],
            state2=states[2],
            aux=aux,
            gv=run.addresses("looksam_gv") if descent == Descent.LOOKSAM_FULL else None,
            steps=bucket.steps,
            status=ctx.status,
            lr_arg=lr,
            device_scalars=_device_scalars(bucket, spec),
            h0=h[0],
            h1=h[1],
            h2=h[2],
            h3=h[3],
            h4=h[4],
            h5=h[5],
            alpha=ctx.alpha,
            BASE=spec.kernel,
            OPTIONS=spec.kernel_options(),
            DESCENT=int(descent),
            UNSCALE=ctx.unscale,
            CLIP_GRAD=ctx.clip,
            CHECK=ctx.check,
            LR_ON_DEVICE=lr_on_device,
        )

    def state_sumsq(self, bucket: Bucket, plan: Plan, name: str, partials: Tensor) -> None:
        """Sum of squares of state ``name`` over the plan, into ``partials[0]``."""
        run = plan.run
        self._launch(
            self.ascent.ascent_stats_kernel,
            run,
            grad=run.addresses(name),
            param=None,
            aux=None,
            vsteps=bucket.vsteps,
            status=partials,  # not read without UNSCALE
            sumsq_out=partials[0],
            bad_out=partials[1],  # the state's non-finite count: not needed
            eta=0.0,
            c1=0.0,
            c2=0.0,
            RULE=int(Ascent.GRAD),
            ADAPTIVE=False,
            UNSCALE=False,
        )

    def advance_steps(
        self, bucket: Bucket, plan: Plan, ctx: StepContext, count_skip: bool, base: bool, variant: bool
    ) -> None:
        n = len(bucket.params)
        self.descent.advance_steps_kernel[(_grid(n, 1024),)](
            steps=bucket.steps,
            vsteps=bucket.vsteps,
            taking_part=bucket.mask_of(plan),
            status=ctx.status,
            n=n,
            BASE=base,
            VARIANT=variant,
            CHECK=ctx.check,
            COUNT_SKIP=count_skip,
            BLOCK=1024,
        )


def _device_scalars(bucket: Bucket, spec: BaseSpec) -> Tensor | None:
    """The spec's float64 ``device_scalars`` (Adam's betas, for the bias corrections) on the
    device: one small tensor per bucket, rewritten in place only when the values change (a
    schedule that cycles the betas, such as OneCycleLR, costs one tiny copy per change, and
    nothing accumulates); None when the base has none."""
    values = spec.device_scalars()
    if not values:
        return None
    held = bucket.cache.get("device_scalars")
    if held is None or held[1].numel() != len(values):
        held = bucket.cache["device_scalars"] = [
            None,
            torch.empty(len(values), dtype=torch.float64, device=bucket.device),
        ]
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
