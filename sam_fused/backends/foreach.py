"""The foreach backend: the reference's math over the buckets' flat buffers, in PyTorch.

Every variant and every base update with a spec, on any device and dtype torch supports,
strided parameters included. It runs the same PyTorch math as the reference backend (the
variant's ``direction``, ``descent_gradient``, the spec's ``update_``, the reference's
``ascent_scale``/``ascent_coefficient``/``sum_of_squares``), but over *segments*: slices of
the bucket's flat buffers that cover many parameters at once (``flat_runs.py``). So a step
is a few large tensor operations per bucket whatever the number of parameters, and the
parameters themselves are read and written with ``torch._foreach_*`` over their lists
(the backup copy, the perturbation, the updated weights).

Where a decision depends on a value of the step (the non-finite skip, a parameter's update
count, the norm), the backend works in one of two ways:

* on the host, for CPU tensors (``host_types``): reading a CPU tensor is a memory read, not a
  device synchronisation, so the values arrive as Python numbers; a skipped step then
  does only what a skip does, the update runs in place with scalar arguments (torch.optim's
  single-tensor operations), and the norm's sum of squares takes float32 row norms, falling
  back to float64 squares when they could lose anything (``flat_stats.py``);
* on the device, everywhere else: as the reference does, both outcomes are computed and
  ``torch.where`` on the status flags selects one, counts are expanded per element
  (``elementwise.PerTensor``), and nothing is read on the host.

Statistics go into one partial sum per bucket, summed over the segments in a fixed order
(float64, or the status's dtype).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import status as S
from ..base_updates import BaseSpec
from ..context import StepContext
from ..elementwise import is_zero, narrow, one_like, per_count
from ..layout import Bucket, Plan
from ..variants import Ascent, Descent, descent_gradient
from .flat_runs import FlatRun, Segment
from .flat_stats import fixed_sum, nonfinite_count, sum_of_squares_in
from .protocol import Capabilities
from .reference import (
    ReferenceBackend,
    ascent_coefficient,
    ascent_scale,
    centralize_each,
    math_dtype,
    perturbation,
)

__all__ = ["ForeachBackend"]


class ForeachBackend:
    """PyTorch math over flat buffers; any device, dtype, variant and base update."""

    name = "foreach"
    unscales_in_place = False  # GradScaler's factor is applied where gradients are read
    capabilities = Capabilities(
        device_types=None,
        dtypes=None,
        ascents=frozenset(Ascent),
        descents=frozenset(Descent),
        updates=None,
        strided=True,
    )

    def __init__(self, host_types: Iterable[str] = ("cpu",)) -> None:
        self.host_types = frozenset(host_types)  # device types whose values are read on the host

    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        return 0 if plan.empty else 1  # one partial sum per bucket, none for an empty plan

    # ------------------------------------------------------------------ shared pieces
    def _host(self, bucket: Bucket) -> bool:
        return bucket.device.type in self.host_types

    def _skip(self, ctx: StepContext, bucket: Bucket, host: bool) -> bool | Tensor:
        skip = ctx.skip(bucket.device)
        return bool(skip) if host else skip

    @staticmethod
    def _flat(bucket: Bucket, plan: Plan) -> FlatRun:
        flat = plan.cache.get("foreach")
        if flat is None:
            flat = plan.cache["foreach"] = FlatRun(bucket.storage, plan.indices)
        return flat

    @staticmethod
    def _grads(bucket: Bucket, plan: Plan, flat: FlatRun, seg: Segment) -> Tensor:
        """The segment's gradients, flat (FSDP2's DTensor gradients are copied in first)."""
        if bucket.sharded:
            torch._foreach_copy_(flat.views("grad", seg), plan.run.grads[seg.slots])
        return flat.buffer("grad", seg)

    @staticmethod
    def _runs(flat: FlatRun, seg: Segment, counts: Tensor | None, host: bool) -> list:
        """``(lo, hi, count)`` runs of the segment; one run without a count when none is needed."""
        return [(0, seg.size, None)] if counts is None else flat.counts(counts, seg, host)

    @staticmethod
    def _store(target: Tensor, new: Tensor, skip: bool | Tensor) -> None:
        """``target <- new`` unless the step is skipped (then ``target`` stays as it was)."""
        if isinstance(skip, bool):
            if not skip and new is not target:
                target.copy_(new)
        else:
            torch.where(skip, target, new.to(target.dtype), out=target)

    @staticmethod
    def _working(buffer: Tensor, compute: torch.dtype, in_place: bool) -> Tensor:
        """What the math updates in place: the buffer itself when allowed, else a copy."""
        if in_place and buffer.dtype == compute:
            return buffer
        return buffer.to(compute, copy=True)

    @staticmethod
    def _value(t: Any, host: bool) -> Any:
        """A one-element tensor as a Python number on the host; anything else as it is."""
        return float(t) if host and isinstance(t, Tensor) else t

    @staticmethod
    def _aux(ctx: StepContext, flat: FlatRun, seg: Segment, compute: torch.dtype) -> Tensor | None:
        """What the variant's direction reads besides g (its running state, RSAM's delta)."""
        role = ctx.variant.aux_role
        return None if role is None else flat.buffer(role, seg).to(compute)

    @staticmethod
    def _direction(
        ctx: StepContext, g: Tensor, aux: Tensor | None, lo: int, hi: int, count: Any
    ) -> tuple[Tensor, Tensor | None]:
        """The variant's direction over ``[lo, hi)`` of the segment, with that run's count."""
        first = False if count is None else per_count(count, is_zero)
        part = (lambda t: t) if (lo, hi) == (0, g.numel()) else (lambda t: t[lo:hi])  # g itself if whole
        return ctx.variant.direction(ctx.options, part(g), None if aux is None else part(aux), first)

    # ------------------------------------------------------------------ ascent
    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        centralize_each(bucket, plan.indices)  # row means per parameter: ATen does them well

    def noise(self, bucket: Bucket, ctx: StepContext, std: float, generator: torch.Generator) -> None:
        """RSAM: the reference's one draw for the whole bucket, split in parameter order."""
        run = bucket.all_run()
        draw = torch.randn(sum(bucket.numels), generator=generator, device=bucket.device, dtype=torch.float32)
        draw.mul_(std)  # in float32, then rounded to the parameters' dtype, as the reference
        pieces = [piece.view(w.shape) for piece, w in zip(torch.split(draw, bucket.numels), run.weights)]
        deltas = run.tensors("rsam_delta")
        torch._foreach_copy_(deltas, pieces)
        torch._foreach_copy_(run.tensors("backup"), run.weights)
        torch._foreach_add_(run.weights, deltas)

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext, partials: Tensor
    ) -> None:
        """``[sum of u^2, non-finite count]`` of this bucket into ``partials[:2, 0]``."""
        if plan.empty:  # no partial slot (partial_slots): nothing to add
            return
        host, flat, variant = self._host(bucket), self._flat(bucket, plan), ctx.variant
        acc, compute = partials.dtype, math_dtype(bucket.dtype)
        counts = bucket.vsteps if variant.ascent_updates_state else None
        sumsq: Any = 0.0
        bad: Any = 0.0
        for seg in flat.segments:
            g_raw = self._grads(bucket, plan, flat, seg)
            g = ctx.unscaled(g_raw.to(compute), S.INV_SCALE1)
            aux = self._aux(ctx, flat, seg, compute)
            w = self._current_weights(plan, flat, seg, compute) if group["adaptive"] else None
            seg_sumsq: Any = 0.0
            for lo, hi, count in self._runs(flat, seg, counts, host):
                v, _ = self._direction(ctx, g, aux, lo, hi, count)
                u = ascent_scale(w[lo:hi], True, group["eta"]) * v if w is not None else v
                seg_sumsq = seg_sumsq + sum_of_squares_in(u, acc, host)
            sumsq = sumsq + seg_sumsq
            # u is a positive multiple of g for the gradient-direction variants: a finite sum
            # of its squares proves g finite
            hint = seg_sumsq if host and variant.ascent == Ascent.GRAD else None
            bad = bad + nonfinite_count(g_raw, host, hint)
        partials[0, 0] = sumsq
        partials[1, 0] = bad

    def _current_weights(self, plan: Plan, flat: FlatRun, seg: Segment, compute: torch.dtype) -> Tensor:
        """The segment's parameters as they are now, flat (zeros in the padding)."""
        out = torch.zeros(seg.size, dtype=compute, device=flat.storage.device)
        torch._foreach_copy_(flat.views_of(out, seg), plan.run.weights[seg.slots])
        return out

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        """Back the plan's parameters up and move them to ``w + eps``."""
        host, flat, variant = self._host(bucket), self._flat(bucket, plan), ctx.variant
        compute, dtype = math_dtype(bucket.dtype), bucket.dtype
        skip = self._skip(ctx, bucket, host)
        norm = ctx.status[S.SUMSQ].sqrt().to(compute)  # the root in float64: the sum may exceed float32
        # in the math dtype, as the reference forms it (on the host: that value, as a number)
        coefficient = self._value(ascent_coefficient(group["rho"], norm, variant, ctx.norm_eps), host)
        left_out = bucket.complement_run(plan)
        if variant.keeps_first_grad and left_out is not None:  # no first gradient: g = 0
            torch._foreach_zero_(left_out.tensors("first_grad"))
        counts = bucket.vsteps if variant.ascent_updates_state else None
        for seg in flat.segments:
            weights = plan.run.weights[seg.slots]
            if not variant.perturbs_before_pass:  # RSAM's backup was taken before the noise
                torch._foreach_copy_(flat.views("backup", seg), weights)
            backup = flat.buffer("backup", seg)
            g_raw = self._grads(bucket, plan, flat, seg)
            g = ctx.unscaled(g_raw.to(compute), S.INV_SCALE1)
            if variant.keeps_first_grad:  # a copy: the next pass rewrites the gradient
                flat.buffer("first_grad", seg).copy_(g)
            aux = self._aux(ctx, flat, seg, compute)
            src = backup.to(compute)
            directions = []
            for lo, hi, count in self._runs(flat, seg, counts, host):
                v, new_state = self._direction(ctx, g, aux, lo, hi, count)
                directions.append(v)
                if new_state is not None:
                    old = flat.buffer(variant.running_state, seg)[lo:hi]
                    flat.buffer("state_prev", seg)[lo:hi].copy_(old)  # for revert_state
                    self._store(old, new_state, skip)
            v = directions[0] if len(directions) == 1 else torch.cat(directions)
            t = ascent_scale(src, group["adaptive"], group["eta"])
            if host and not variant.perturbs_before_pass:  # the weights are src: add eps, unless skipped
                if skip:
                    continue
                if group["adaptive"]:
                    eps = perturbation(t * v, t, coefficient)
                    torch._foreach_add_(weights, flat.views_of(eps, seg))
                else:  # eps = coefficient * v, rounded, added: in one pass
                    views = flat.views("grad", seg) if v is g_raw else flat.views_of(v, seg)
                    torch._foreach_addcmul_(weights, views, [one_like(v)] * len(views), value=coefficient)
            elif skip is True:  # RSAM, skipped: back to src
                torch._foreach_copy_(weights, flat.views("backup", seg))
            else:
                moved = (src + perturbation(t * v, t, coefficient)).to(dtype)
                if not isinstance(skip, bool):
                    moved = torch.where(skip, backup, moved)
                torch._foreach_copy_(weights, flat.views_of(moved, seg))
        if (
            variant.perturbs_before_pass and left_out is not None
        ):  # parameters that took no part lose their noise
            torch._foreach_copy_(left_out.weights, left_out.tensors("backup"))

    # ------------------------------------------------------------------ descent
    def revert_state(self, bucket: Bucket, plan: Plan, ctx: StepContext, force: bool = False) -> None:
        """VaSSO / F-SAM: the running state back to ``state_prev`` if the step is skipped."""
        host, flat = self._host(bucket), self._flat(bucket, plan)
        skip = True if force else self._skip(ctx, bucket, host)
        for seg in flat.segments:
            state = flat.buffer(ctx.variant.running_state, seg)
            prev = flat.buffer("state_prev", seg)
            if isinstance(skip, bool):
                if skip:
                    state.copy_(prev)
            else:
                torch.where(skip, prev, state, out=state)

    def descent_stats(self, bucket: Bucket, plan: Plan, ctx: StepContext, partials: Tensor) -> None:
        """``[non-finite count of g_p, <g, g_p>, ||g_p||^2, ||g||^2]`` into ``partials[:, 0]``."""
        if plan.empty:  # no partial slot (partial_slots): nothing to add
            return
        host, flat = self._host(bucket), self._flat(bucket, plan)
        acc, compute = partials.dtype, math_dtype(bucket.dtype)
        inner = ctx.variant.keeps_first_grad
        sums: list[Any] = [0.0, 0.0, 0.0, 0.0]
        for seg in flat.segments:
            gp_raw = self._grads(bucket, plan, flat, seg)
            gp = ctx.unscaled(gp_raw.to(compute), S.INV_SCALE2)
            gp2 = None
            if inner or ctx.clip:
                gp2 = sum_of_squares_in(gp, acc, host)
                sums[2] = sums[2] + gp2
            sums[0] = sums[0] + nonfinite_count(gp_raw, host, gp2 if host else None)
            if inner:
                g = flat.buffer("first_grad", seg).to(compute)
                dot = fixed_sum(g.to(acc) * gp.to(acc))
                sums[1] = sums[1] + (float(dot) if host else dot)
                sums[3] = sums[3] + sum_of_squares_in(g, acc, host)
        if host:
            partials[:, 0] = torch.tensor(sums, dtype=acc)
        else:
            for k, value in enumerate(sums):
                partials[k, 0] = value

    def restore(self, bucket: Bucket, plan: Plan | None) -> None:
        """``w <- backup`` bit for bit (every parameter when ``plan`` is None)."""
        run = bucket.all_run() if plan is None else plan.run
        if not run.empty:
            torch._foreach_copy_(run.weights, run.tensors("backup"))

    def update(
        self,
        bucket: Bucket,
        perturbed: Plan | None,
        plan: Plan,
        spec: BaseSpec,
        ctx: StepContext,
        descent: Descent,
    ) -> None:
        """Restore ``perturbed``, then the base update (the spec's ``update_``) of ``plan``."""
        fused = perturbed is plan  # the restore is the update's source: the backup
        if perturbed is not None and not fused:
            self.restore(bucket, perturbed)
        if plan.empty:
            return
        host, flat = self._host(bucket), self._flat(bucket, plan)
        skip = self._skip(ctx, bucket, host)
        if skip is True:  # no state moves; the weights are (back) at w
            if fused:
                self.restore(bucket, plan)
            return
        compute, status = math_dtype(bucket.dtype), ctx.status
        names = spec.state_names()
        # the backup is the update's scratch; a bucket that never backs up (SAM-ON's
        # perturb=False groups) keeps none, and works in a transient buffer instead
        scratch = fused or "backup" in bucket.storage.buffers
        for seg in flat.segments:
            weights = plan.run.weights[seg.slots]
            if scratch:
                backup, sources = flat.buffer("backup", seg), flat.views("backup", seg)
            else:
                backup = torch.zeros(seg.size, dtype=bucket.dtype, device=bucket.device)
                sources = flat.views_of(backup, seg)
            if not fused:  # the update starts from the weights (the backup is scratch now)
                torch._foreach_copy_(sources, weights)
            w = self._working(backup, compute, host)
            gp = ctx.unscaled(self._grads(bucket, plan, flat, seg).to(compute), S.INV_SCALE2)
            first_grad = flat.buffer("first_grad", seg).to(compute) if ctx.variant.keeps_first_grad else None
            aux = first_grad if descent == Descent.GSAM else None
            if descent == Descent.LOOKSAM_REUSE:
                aux = flat.buffer("looksam_gv", seg).to(compute)
            elif descent == Descent.LOOKSAM_FULL:  # store g_v = g_p - (<g_p, g> / ||g||^2) g
                g2 = status[S.G2]
                coef = self._value(torch.where(g2 > 0, status[S.DOT] / g2, 0), host)
                self._store(flat.buffer("looksam_gv", seg), gp - narrow(coef, compute) * first_grad, skip)
            d = descent_gradient(descent, ctx.options, gp, aux, status)
            if ctx.clip:  # max_grad_norm: the coefficient of the whole descent gradient
                d = d * narrow(self._value(status[S.CLIP], host), compute)
            buffers = {name: flat.buffer(name, seg) for name in names}
            for lo, hi, count in flat.counts(bucket.steps, seg, host):
                targets = {name: buf[lo:hi] for name, buf in buffers.items()}
                state = {name: self._working(target, compute, host) for name, target in targets.items()}
                spec.update_(w[lo:hi], d[lo:hi], state, count)
                for name, target in targets.items():
                    self._store(target, state[name], skip)
            if w is not backup:
                self._store(backup, w, skip)  # (on a skip the backup keeps w)
            torch._foreach_copy_(weights, sources)

    def state_sumsq(self, bucket: Bucket, plan: Plan, name: str, partials: Tensor) -> None:
        """The sum of squares of state ``name`` over the plan (LookSAM's ``||g_v||^2``)."""
        if plan.empty:  # no partial slot (partial_slots): nothing to add
            return
        host, flat = self._host(bucket), self._flat(bucket, plan)
        compute = math_dtype(bucket.dtype)
        total: Any = 0.0
        for seg in flat.segments:
            total = total + sum_of_squares_in(flat.buffer(name, seg).to(compute), partials.dtype, host)
        partials[0, 0] = total

    def advance_steps(
        self, bucket: Bucket, plan: Plan, ctx: StepContext, count_skip: bool, base: bool, variant: bool
    ) -> None:
        # the reference's counting: a few operations on the per-parameter counts, on the device
        ReferenceBackend.advance_steps(self, bucket, plan, ctx, count_skip, base, variant)  # type: ignore[arg-type]
