"""The step engine: the device status vector, the reductions, and one step's flow.

``SAM`` (``optimizer.py``) is the front end; everything a step does happens here, in two
halves that never mix:

1. **Validate**: the call order, the param groups (unchanged since they were laid out,
   hyperparameters in range), the GradScaler, every bucket's plan (layout, gradients) and
   the base update. A refusal raises here, and nothing has changed.
2. **Apply**: the backends' operations, bucket by bucket, then the new host state is
   committed to :class:`StepState`. An unexpected failure in this half abandons the step
   (:meth:`StepEngine.abort`), so no exception leaves the weights perturbed.

Per-step host state lives in one :class:`StepState` object that is only ever mutated, never
rebound: framework wrappers that copy the optimizer's ``__dict__`` (Lightning's
``LightningOptimizer``) share it, and see the same step. The buckets as a whole (layout,
moved parameters, restores in alias order) are ``buckets.Buckets``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from . import amp, grouping, perturb_groups, updates
from . import status as S
from .base_updates import BaseSpec
from .buckets import Buckets
from .context import StepContext
from .layout import Bucket, LayoutError, Plan
from .policies import StepKind, StepPolicy, VariantSchedule, plain_stats_serve
from .step_state import Phase, StepState
from .variants import VARIANTS, Descent, Variant

__all__ = ["StepEngine"]


class StepEngine:
    """Everything a SAM step needs besides the front end's validation of its arguments."""

    def __init__(
        self,
        owner: torch.optim.Optimizer,
        variant: Variant,
        variant_options: Mapping[str, Any],
        keys: Mapping[str, str],
        norm_eps: float,
        skip_nonfinite: bool,
        max_grad_norm: float | None,
        backend: str,
    ) -> None:
        self.owner = owner  # the SAM object (framework wrappers of it share this engine)
        self.variant = variant
        self.variant_options = variant_options
        self.keys = keys  # SAM's param-group keys: rho/adaptive/eta, or sam_<name> on a clash
        self.plain_keys = all(name == key for name, key in keys.items())
        self.norm_eps = norm_eps
        self.skip_nonfinite = skip_nonfinite
        self.max_grad_norm = max_grad_norm
        self.backend = backend
        self.layout = Buckets(owner, variant, keys, backend)
        self.status = torch.zeros(S.SIZE, dtype=torch.float32)
        self.step = StepState()
        self.policy: StepPolicy = VariantSchedule(variant, variant_options)  # per-step kind (policies.py)
        self.contexts_changed()

    def contexts_changed(self) -> None:
        """A setting a StepContext holds changed (``max_grad_norm``): contexts are made anew."""
        self._contexts: dict[bool, StepContext] = {}

    @property
    def buckets(self) -> list[Bucket]:
        return self.layout.items

    @property
    def device(self) -> torch.device:
        return self.layout.device

    @property
    def process_group(self) -> Any:
        return self.layout.process_group

    def locate(self, param: Any) -> tuple[Bucket, int] | None:
        return self.layout.locate(param)

    def base_names(self, bucket: Bucket) -> tuple[tuple[str, ...], bool]:
        return self.layout.base_names(bucket)

    # ------------------------------------------------------------------ layout
    def adopt(self, groups: list[dict], start: int) -> None:
        """Take ``groups`` (numbered from ``start``) into the layout (``Buckets.adopt``)."""
        self.layout.adopt(groups, start)
        self._buckets_changed()

    def _plans(self, grads: bool = True) -> list[Plan]:
        """Every bucket's validated plan for this pass (``Buckets.plans``); a relayout on the
        way moves the status vector with the buckets."""
        before = self.layout.items
        plans = self.layout.plans(self.step.phase is Phase.IDLE, grads)
        if self.layout.items is not before:
            self._buckets_changed()
        return plans

    def _buckets_changed(self) -> None:
        """The status vector follows the buckets' device."""
        # float64: a sum of squares of finite float32 gradients can exceed float32's range
        # (|g| > 1.8e19); MPS has no float64 (there the norm overflows as torch.norm would)
        acc = torch.float32 if self.device.type == "mps" else torch.float64
        self.status = self.status.to(device=self.device, dtype=acc)
        self.contexts_changed()

    # ------------------------------------------------------------------ validation
    def descent_specs(self) -> list[BaseSpec] | None:
        """Every bucket's fused base update, or None when the base optimizer's own step runs
        (refused for a variant that changes the descent gradient)."""
        groups, base = self.owner.param_groups, type(self.owner.base_optimizer)
        specs, reason = grouping.fused_specs(self.buckets, groups, base, self.device)
        if specs is None and self.variant.descent != Descent.PLAIN:
            raise ValueError(
                f"{self.variant.name} changes the descent gradient, which sam_fused fuses into "
                f"{grouping.fused_bases()} only, and here the base update cannot be fused: {reason}"
            )
        return specs

    # ------------------------------------------------------------------ reductions
    def context(self, scaled: bool) -> StepContext:
        ctx = self._contexts.get(scaled)
        if ctx is None:
            check = self.skip_nonfinite or scaled  # an overflow under a GradScaler must never land
            ctx = StepContext(
                self.variant,
                self.variant_options,
                self.norm_eps,
                check,
                self.status,
                scaled,
                self.max_grad_norm is not None,
            )
            self._contexts[scaled] = ctx
        return ctx

    def reduce(self, plans: list[Plan], fill: Callable[[Bucket, Plan, Tensor], None], entries: slice) -> None:
        """Each bucket writes its partial sums (``fill``); their sums land in ``status[entries]``
        (``Buckets.sum_partials``: a fixed order, bitwise reproducible, all-reduced over FSDP2)."""
        self.layout.sum_partials(plans, fill, self.status, entries)

    # ------------------------------------------------------------------ the step
    def noise(self) -> None:
        """RSAM: ``w <- w + delta`` for the first pass (backups taken)."""
        st = self.step
        if st.phase is not Phase.IDLE:
            raise RuntimeError("noise_step() was called again before first_step()/second_step() finished")
        if self.policy.kind(st.step_index) is StepKind.BASE:
            return  # a base step (outside a SAMWindow): no noise, no backup
        grouping.check_groups(self.owner.param_groups, self.layout.groups, self.keys, self.device)
        self._plans(grads=False)  # the parameters only: the gradients are last step's
        on, scales = perturb_groups.noise_scales(self)  # SAM-ON: None where a group is not perturbed
        generator = st.generator
        if generator is None:  # seeded before it is kept: a seed that fails leaves none behind
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(self.variant_options["seed"]))
        st.generator, st.generator_before, st.index_before = generator, generator.get_state(), st.step_index
        st.phase, st.plans, st.backed_up, st.perturbed = Phase.NOISED, None, 0, on
        try:
            for i, (bucket, std) in enumerate(zip(self.buckets, scales)):
                if std is not None:
                    bucket.backend.noise(bucket, self.context(False), std, generator)
                st.backed_up = i + 1
        except BaseException as exc:
            self._abandoned(exc)
            raise

    def first_step(self, scaler: Any, key: int) -> bool:
        st = self.step
        if st.phase is Phase.PERTURBED:
            raise RuntimeError(
                "first_step() was called twice without second_step(): the weights are "
                "already perturbed; call second_step() to restore and update them (or abort_step())"
            )
        kind = self.policy.kind(st.step_index)
        if self.variant.perturbs_before_pass and st.phase is not Phase.NOISED and kind is not StepKind.BASE:
            raise RuntimeError("RSAM takes its first pass at w + delta: call noise_step() before it")
        st.one_pass_done = False
        grouping.check_groups(self.owner.param_groups, self.layout.groups, self.keys, self.device)
        if scaler is not None:
            scaler = amp.active_scaler(scaler, key, self.device, first_pass=True)
        plans = self._plans()
        on = perturb_groups.step_flags(self)  # SAM-ON: which buckets the ascent covers
        perturbs = kind is StepKind.SAM
        specs = self.descent_specs() if not perturbs or self.variant.descent != Descent.PLAIN else None
        # ---- everything is validated: from here on the step changes things
        if scaler is not None:  # both passes of a step share the scale (it moves in update())
            amp.write_inverse_scale(
                self.status, amp.scaler_scale(scaler), slice(S.INV_SCALE1, S.INV_SCALE2 + 1)
            )
        ctx = self.context(scaler is not None)
        if not perturbs and not self._one_pass_step(plans, specs, ctx, kind):
            if scaler is not None:  # the scaler stays ready: a framework's scaler.step(opt) follows
                amp.report_overflow(scaler, key, self.status, mark_stepped=False)
            st.step_index += 1
            st.one_pass_done, st.scaler, st.scaler_key = True, scaler, key
            return False
        if st.phase is Phase.IDLE:
            st.index_before = st.step_index
        all_plans, plans = plans, perturb_groups.ascent_plans(self.buckets, plans, on)  # SAM-ON
        st.phase, st.plans, st.backed_up = (
            Phase.PERTURBED,
            plans,
            len(self.buckets) if self.variant.perturbs_before_pass else 0,
        )
        try:
            if self.variant.centralize:
                for bucket, plan in zip(self.buckets, plans):
                    if not plan.empty:
                        bucket.backend.centralize(bucket, plan)
            self.status[S.SECOND_PASS].zero_()  # this step's, not the last one's (a skip reads them)
            groups = self.owner.param_groups
            if (self.variant.normalized or ctx.check) and not plain_stats_serve(self, kind):
                fill = lambda b, p, out: b.backend.ascent_stats(b, p, self._group(groups, b), ctx, out)
                self.reduce(plans, fill, S.FIRST_PASS)
            if self.variant.keeps_first_grad:  # GSAM, LookSAM: g of the groups left out too
                perturb_groups.keep_first_grads(self.buckets, all_plans, on, ctx)
            for i, (bucket, plan) in enumerate(zip(self.buckets, plans)):
                if not plan.empty:
                    bucket.backend.perturb(bucket, plan, self._group(groups, bucket), ctx)
                st.backed_up = max(st.backed_up, i + 1)
        except BaseException as exc:
            self._abandoned(exc)
            raise
        st.scaler, st.scaler_key = scaler, key
        st.step_index += 1
        return True

    def _group(self, groups: list[dict], bucket: Bucket) -> dict:
        """The bucket's group as the backends read it: SAM's keys under their plain names."""
        group = groups[bucket.group_index]
        if self.plain_keys:
            return group
        return {**group, **{name: group[key] for name, key in self.keys.items()}}

    def _one_pass_step(
        self, plans: list[Plan], specs: list[BaseSpec] | None, ctx: StepContext, kind=StepKind.CHEAP
    ) -> bool:
        """One pass, one update: LookSAM's / interval SAM's cheap step, or a policy's base step;
        True, with nothing updated, when AESAM's policy settles it as a SAM step."""
        try:
            # ||g|| and the non-finite count, as plain SAM's first pass takes them
            plain = {"adaptive": False, "eta": 0.0}
            sam = replace(ctx, variant=VARIANTS["sam"], options={})
            self.reduce(plans, lambda b, p, out: b.backend.ascent_stats(b, p, plain, sam, out), S.FIRST_PASS)
            if kind is StepKind.BY_NORM and self.policy.settle(self, self.step.step_index):
                return True
            self.status[S.SECOND_PASS].zero_()
            if ctx.clip:  # the descent gradient is this pass's g: its norm is the ascent's
                self.status[S.GP2].copy_(self.status[S.SUMSQ])
            reuse = kind is StepKind.CHEAP and self.variant.descent == Descent.LOOKSAM_FULL
            self.policy.before_update(self, self.step.step_index)
            self._descend(None, plans, specs, ctx, Descent.LOOKSAM_REUSE if reuse else Descent.PLAIN)
        except BaseException as exc:
            self._abandoned(exc)
            raise
        return False

    def second_step(self, scaler_arg: Any, key: int, step_scale: tuple | None) -> None:
        st = self.step
        if st.phase is not Phase.PERTURBED:
            raise RuntimeError(
                "second_step() was called without first_step(): there is no perturbation to "
                "undo. Call first_step() after the first backward pass."
            )
        try:
            scaler = amp.second_scaler(st.scaler, scaler_arg, key, self.device)
            # the param lists only: rho, eta and adaptive are the ascent's, checked in first_step()
            grouping.check_groups(self.owner.param_groups, self.layout.groups, None, self.device)
            plans = self._plans()
            specs = self.descent_specs()
            # the first pass's plans, with tables of where the parameters are now
            st.plans = [bucket.refresh(plan) for bucket, plan in zip(self.buckets, st.plans)]
        except Exception as exc:
            _note(exc, _STILL_PERTURBED)
            raise
        if scaler is not None:
            if step_scale is not None:  # scaler.step(): its scale, or None once unscale_()d
                scale = step_scale[0]
            else:
                scale = None if amp.unscaled_by_user(scaler, key) else amp.scaler_scale(scaler)
            amp.write_inverse_scale(self.status, scale, slice(S.INV_SCALE2, S.INV_SCALE2 + 1))
        ctx = self.context(scaler is not None)
        variant = self.variant
        try:
            if variant.centralize:  # GCSAM descends along GC(g_p) too
                for bucket, plan in zip(self.buckets, plans):
                    if not plan.empty:
                        bucket.backend.centralize(bucket, plan)
            if ctx.check or ctx.clip or variant.keeps_first_grad:
                self.reduce(plans, lambda b, p, out: b.backend.descent_stats(b, p, ctx, out), S.SECOND_PASS)
            if ctx.check and variant.ascent_updates_state:
                for bucket, plan in zip(self.buckets, st.plans):
                    if not plan.empty:
                        bucket.backend.revert_state(bucket, plan, ctx)
            self.policy.before_update(self, st.step_index - 1)
            self._descend(st.plans, plans, specs, ctx, variant.descent)
            if variant.descent == Descent.LOOKSAM_FULL:
                fill = lambda b, p, out: b.backend.state_sumsq(b, p, "looksam_gv", out)
                self.reduce(plans, fill, slice(S.GV2, S.GV2 + 1))
        except BaseException as exc:
            self._abandoned(exc)
            raise
        if scaler is not None:
            amp.report_overflow(scaler, key, self.status, mark_stepped=step_scale is None)
        st.phase, st.plans, st.scaler, st.backed_up = Phase.IDLE, None, None, 0

    def finish_one_pass(self, handed: tuple | None) -> bool:
        """``step()`` after a one-pass ``first_step()`` (a framework finishing its step): the
        update is done; under ``GradScaler.step(opt)`` (``handed``), which has just replaced the
        scaler's overflow record with a check of the (zeroed) gradients, the step's own
        overflow goes back in. Returns whether there was such a step to finish."""
        st = self.step
        if st.phase is not Phase.IDLE or not st.one_pass_done:
            return False
        st.one_pass_done = False
        if handed is not None and st.scaler is not None:
            amp.report_overflow(st.scaler, st.scaler_key, self.status, mark_stepped=False)
        st.scaler = None
        return True

    def _descend(
        self,
        perturbed: list[Plan] | None,
        plans: list[Plan],
        specs: list[BaseSpec] | None,
        ctx: StepContext,
        descent: Descent,
    ) -> None:
        """Restore (when ``perturbed``) and apply the base update (``updates.py``)."""
        if ctx.clip:  # min(1, max_norm / (||d|| + 1e-6)), as torch.nn.utils.clip_grad_norm_
            norm2 = self.variant.descent_norm2(self.status, self.variant_options)
            torch.clamp(self.max_grad_norm / (norm2.sqrt() + 1e-6), max=1.0, out=self.status[S.CLIP])
        if specs is None:
            updates.generic(self.layout, self.owner.base_optimizer, self.variant, perturbed, plans, ctx)
        else:
            updates.fused(self.layout, self.variant, perturbed, plans, specs, ctx, descent)

    # ------------------------------------------------------------------ abandoning a step
    def _abandoned(self, exc: BaseException) -> None:
        """An unexpected failure while the step changed things: abandon it (:meth:`abort`)."""
        if self.abort():
            _note(
                exc,
                "the step failed and was abandoned: the weights are back at w and the optimizer "
                "state is as it was before the step",
            )

    def abort(self) -> bool:
        """Abandon the step in flight: weights and state as they were before it began."""
        st = self.step
        if st.phase is Phase.IDLE:
            return False
        ctx = self.context(False)
        every = self.variant.perturbs_before_pass or st.plans is None  # RSAM backed every parameter up
        plans = perturb_groups.restore_plans(self.buckets, st.perturbed) if every else st.plans
        try:  # where the parameters are now (a parameter moved since is restored where it went)
            plans = [plan if plan is None else b.refresh(plan) for b, plan in zip(self.buckets, plans)]
        except LayoutError:  # cast since: restored parameter by parameter, converting
            self.layout.restore_each(plans[: st.backed_up])
        else:
            self.layout.restore(plans[: st.backed_up])
        for bucket, plan in zip(self.buckets[: st.backed_up], plans):
            if st.phase is Phase.PERTURBED and self.variant.ascent_updates_state and not plan.empty:
                bucket.backend.revert_state(bucket, plan, ctx, force=True)
        if st.generator is not None and st.generator_before is not None:
            st.generator.set_state(st.generator_before)
        st.step_index = st.index_before
        self.policy.abandon(st.step_index)
        st.phase, st.plans, st.scaler, st.backed_up, st.hooks_open = Phase.IDLE, None, None, 0, False
        return True

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_contexts"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.contexts_changed()


_STILL_PERTURBED = (
    "nothing changed, the weights are still at w + eps: call second_step() again once this is "
    "fixed, or abort_step() to abandon the step"
)


def _note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(f"sam_fused: {note}")
