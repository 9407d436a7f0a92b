"""The step engine: buckets, the device status vector, the reductions, and one step's flow.

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
``LightningOptimizer``) share it, and see the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from . import amp, grouping, options
from . import status as S
from .base_updates import REGISTRY, BaseSpec
from .context import StepContext
from .layout import Bucket, LayoutError, Plan
from .sharding import shard_group
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
        self.buckets: list[Bucket] = []
        self.device = torch.device("cpu")
        self.status = torch.zeros(S.SIZE, dtype=torch.float32)
        self.process_group: Any = None
        self.step = StepState()
        self._laid_out: list[dict] = []  # the groups as laid out (their params: ParamLists)
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._where = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._partials: dict[tuple, tuple[list[Tensor], Tensor, Tensor]] = {}
        self.contexts_changed()

    def contexts_changed(self) -> None:
        """A setting a StepContext holds changed (``max_grad_norm``): contexts are made anew."""
        self._contexts: dict[bool, StepContext] = {}

    # ------------------------------------------------------------------ layout
    def adopt(self, groups: list[dict], start: int) -> None:
        """Take ``groups`` (numbered from ``start``) into the layout: SAM's keys default and are
        checked, the groups are laid out, and only then (nothing refused) the parameters move
        into their buckets."""
        for index, group in enumerate(groups, start):
            for key in self.keys.values():
                group.setdefault(key, self.owner.defaults[key])
            options.check_group(group, self.keys, index, self.device if self.buckets else None)
        known = [p for b in self.buckets for p in b.params]
        base = type(self.owner.base_optimizer)
        laid_out = grouping.lay_out(groups, start, known, base, self.variant, self.backend)
        # ---- validated: from here on the optimizer changes (the parameters never move)
        self.buckets += [Bucket(params, i, backend, layer) for params, i, backend, layer in laid_out]
        # buckets of parameters that share memory with earlier ones come later: perturbed in
        # this order, restored in reverse (docs/design.md, "Parameters that share memory")
        self.buckets.sort(key=lambda b: b.layer)
        for group in groups:
            group["params"] = options.ParamList(group["params"])
        self._laid_out.extend(groups)
        self._device_changed()

    def locate(self, param: Any) -> tuple[Bucket, int] | None:
        found = self._where.get(id(param))
        return found if found is not None and found[0].params[found[1]] is param else None

    def base_names(self, bucket: Bucket) -> tuple[tuple[str, ...], bool]:
        """The base optimizer's state names for the bucket's group, and whether it counts steps."""
        spec = REGISTRY.get(type(self.owner.base_optimizer))
        if spec is None:
            return (), False
        return spec.names_for_group(self.owner.param_groups[bucket.group_index]), spec.counts_steps

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
        """Each bucket writes its partial sums (``fill``); their sums land in ``status[entries]``,
        added up over the ranks' shards under FSDP2. A fixed order: bitwise reproducible."""
        taking = [(b, p, b.backend.partial_slots(b, p)) for b, p in zip(self.buckets, plans) if not p.empty]
        # the partial sums' buffer and its views, kept per shape: a step slices no tensor
        key = (tuple(n for _, _, n in taking), entries.start, entries.stop)
        held = self._partials.get(key)
        if held is None:
            if len(self._partials) > 8:
                self._partials.clear()
            partials = torch.zeros(4, sum(key[0]), dtype=self.status.dtype, device=self.device)
            starts = [sum(key[0][:k]) for k in range(len(key[0]))]
            slices = [partials[:, a : a + n] for a, n in zip(starts, key[0])]
            summed = partials[: entries.stop - entries.start]
            held = self._partials[key] = (slices, summed, self.status[entries])
        slices, summed, out = held
        for (bucket, plan, _), part in zip(taking, slices):
            fill(bucket, plan, part)
        torch.sum(summed, dim=1, out=out)
        if self.process_group is not None:
            torch.distributed.all_reduce(out, group=self.process_group)

    # ------------------------------------------------------------------ plans and layout
    def _validated_plans(self) -> list[Plan]:
        """Every bucket's plan for this pass (validated: a refusal raises, nothing changed).

        Parameters that moved keep their buckets (the tables follow them) unless they now
        share memory differently; parameters cast or moved to another device keep their
        shapes: either way, while no step is in flight, the buckets are laid out again and
        the state converted (:meth:`relayout`)."""
        idle = self.step.phase is Phase.IDLE
        try:
            plans = [bucket.plan() for bucket in self.buckets]
        except LayoutError as exc:
            if not (exc.convertible and idle):
                raise
            self.relayout()
            return [bucket.plan() for bucket in self.buckets]
        if any(bucket.moved for bucket in self.buckets):
            for bucket in self.buckets:
                bucket.moved = False
            params = [p for group in self._laid_out for p in group["params"]]
            layers = [self.locate(p)[0].layer for p in params]
            if grouping.layers_of(params) != layers:
                if not idle:
                    raise LayoutError(
                        "parameters came to share memory differently between first_step() and "
                        "second_step() (p.data = other.data); abort_step() and step again"
                    )
                self.relayout()
                plans = [bucket.plan() for bucket in self.buckets]
        return plans

    def relayout(self) -> None:
        """Lay the buckets out again from the param groups as the parameters are now (cast,
        moved to another device, sharing memory anew), keeping every parameter's state,
        converted to its dtype and device as ``load_state_dict`` converts a checkpoint's."""
        kept = {id(p): b.export_state(i) for b in self.buckets for i, p in enumerate(b.params)}
        base = type(self.owner.base_optimizer)
        laid_out = grouping.lay_out(self._laid_out, 0, [], base, self.variant, self.backend)
        # ---- validated: the new buckets replace the old
        buckets = [Bucket(params, i, backend, layer) for params, i, backend, layer in laid_out]
        buckets.sort(key=lambda b: b.layer)
        for bucket in buckets:
            for i, p in enumerate(bucket.params):
                bucket.import_state(i, kept[id(p)])
        self.buckets = buckets
        self._device_changed()

    def _device_changed(self) -> None:
        """The buckets changed: the status vector and the shard group follow them."""
        if self.buckets:
            self.device = self.buckets[0].device
        # float64: a sum of squares of finite float32 gradients can exceed float32's range
        # (|g| > 1.8e19); MPS has no float64 (there the norm overflows as torch.norm would)
        acc = torch.float32 if self.device.type == "mps" else torch.float64
        self.status = self.status.to(device=self.device, dtype=acc)
        self.process_group = shard_group(p for b in self.buckets for p in b.params)
        self._reset_caches()

    # ------------------------------------------------------------------ the step
    def noise(self) -> None:
        """RSAM: ``w <- w + delta`` for the first pass (backups taken)."""
        st = self.step
        if st.phase is not Phase.IDLE:
            raise RuntimeError("noise_step() was called again before first_step()/second_step() finished")
        grouping.check_groups(self.owner.param_groups, self._laid_out, self.keys, self.device)
        self._validated_plans()  # every parameter where its bucket's tables say (or laid out anew)
        generator = st.generator
        if generator is None:  # seeded before it is kept: a seed that fails leaves none behind
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(self.variant_options["seed"]))
        st.generator, st.generator_before, st.index_before = generator, generator.get_state(), st.step_index
        st.phase, st.plans, st.backed_up = Phase.NOISED, None, 0
        total = max(1, sum(p.numel() for b in self.buckets for p in b.params))
        try:
            for i, bucket in enumerate(self.buckets):
                rho = self.owner.param_groups[bucket.group_index][self.keys["rho"]]
                std = self.variant_options["noise_std"]
                std = float(rho) / math.sqrt(total) if std is None else float(std)
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
        if self.variant.noise and st.phase is not Phase.NOISED:
            raise RuntimeError("RSAM takes its first pass at w + delta: call noise_step() before it")
        st.one_pass_done = False
        grouping.check_groups(self.owner.param_groups, self._laid_out, self.keys, self.device)
        if scaler is not None:
            scaler = amp.active_scaler(scaler, key, self.device, first_pass=True)
        plans = self._validated_plans()
        perturbs = self.variant.perturbs(st.step_index, self.variant_options)
        specs = self.descent_specs() if not perturbs or self.variant.descent != Descent.PLAIN else None
        # ---- everything is validated: from here on the step changes things
        if scaler is not None:  # both passes of a step share the scale (it moves in update())
            amp.write_inverse_scale(
                self.status, amp.scaler_scale(scaler), slice(S.INV_SCALE1, S.INV_SCALE2 + 1)
            )
        ctx = self.context(scaler is not None)
        if not perturbs:
            self._one_pass_step(plans, specs, ctx)
            if scaler is not None:  # the scaler stays ready: a framework's scaler.step(opt) follows
                amp.report_overflow(scaler, key, self.status, mark_stepped=False)
            st.step_index += 1
            st.one_pass_done, st.scaler, st.scaler_key = True, scaler, key
            return False
        if st.phase is Phase.IDLE:
            st.index_before = st.step_index
        st.phase, st.plans, st.backed_up = (
            Phase.PERTURBED,
            plans,
            len(self.buckets) if self.variant.noise else 0,
        )
        try:
            if self.variant.centralize:
                for bucket, plan in zip(self.buckets, plans):
                    if not plan.empty:
                        bucket.backend.centralize(bucket, plan)
            self.status[S.SECOND_PASS].zero_()  # this step's, not the last one's (a skip reads them)
            groups = self.owner.param_groups
            if self.variant.normalized or ctx.check:
                fill = lambda b, p, out: b.backend.ascent_stats(b, p, self._group(groups, b), ctx, out)
                self.reduce(plans, fill, S.FIRST_PASS)
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

    def _one_pass_step(self, plans: list[Plan], specs: list[BaseSpec] | None, ctx: StepContext) -> None:
        """LookSAM / interval SAM between perturbed steps: one pass, one update."""
        try:
            # ||g|| and the non-finite count, as plain SAM's first pass takes them
            plain = {"adaptive": False, "eta": 0.0}
            sam = replace(ctx, variant=VARIANTS["sam"], options={})
            self.reduce(plans, lambda b, p, out: b.backend.ascent_stats(b, p, plain, sam, out), S.FIRST_PASS)
            self.status[S.SECOND_PASS].zero_()
            if ctx.clip:  # the descent gradient is this pass's g: its norm is the ascent's
                self.status[S.GP2].copy_(self.status[S.SUMSQ])
            descent = Descent.LOOKSAM_REUSE if self.variant.descent == Descent.LOOKSAM_FULL else Descent.PLAIN
            self._descend(None, plans, specs, ctx, descent)
        except BaseException as exc:
            self._abandoned(exc)
            raise

    def second_step(self, scaler_arg: Any, key: int, step_scale: tuple | None) -> None:
        st = self.step
        if st.phase is not Phase.PERTURBED:
            raise RuntimeError(
                "second_step() was called without first_step(): there is no perturbation to "
                "undo. Call first_step() after the first backward pass."
            )
        try:
            scaler = st.scaler if scaler_arg is None else self._second_scaler(scaler_arg, key)
            # the param lists only: rho, eta and adaptive are the ascent's, checked in first_step()
            grouping.check_groups(self.owner.param_groups, self._laid_out, None, self.device)
            plans = self._validated_plans()
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

    def _second_scaler(self, scaler_arg: Any, key: int) -> Any:
        st = self.step
        scaler = amp.active_scaler(scaler_arg, key, self.device, first_pass=False)
        if scaler is not None and st.scaler is None:
            raise RuntimeError(
                "second_step(grad_scaler=...) needs first_step(grad_scaler=...) with the same "
                "scaler: the first pass's gradients were taken as unscaled"
            )
        if scaler is not st.scaler:
            raise RuntimeError("second_step() got another GradScaler than first_step()")
        return scaler

    def _descend(
        self,
        perturbed: list[Plan] | None,
        plans: list[Plan],
        specs: list[BaseSpec] | None,
        ctx: StepContext,
        descent: Descent,
    ) -> None:
        """Restore (when ``perturbed``) and apply the base update with the descent gradient."""
        if ctx.clip:  # min(1, max_norm / (||d|| + 1e-6)), as torch.nn.utils.clip_grad_norm_
            norm2 = self.variant.descent_norm2(self.status, self.variant_options)
            torch.clamp(self.max_grad_norm / (norm2.sqrt() + 1e-6), max=1.0, out=self.status[S.CLIP])
        if specs is None:
            self._generic_descend(perturbed, plans, ctx)
            return
        if perturbed is not None:  # parameters sharing memory with earlier ones: restored first
            self._restore(perturbed, aliases_only=True)
        counted = False
        state_on_ascent = perturbed is not None and self.variant.ascent_updates_state
        for i, (bucket, plan, spec) in enumerate(zip(self.buckets, plans, specs)):
            # layer 0 restores fused with the update; later layers update from the weights
            done = None if perturbed is None else perturbed[i]
            bucket.backend.update(bucket, done if bucket.layer == 0 else None, plan, spec, ctx, descent)
            variant_counts = descent == Descent.LOOKSAM_FULL or (state_on_ascent and done.key == plan.key)
            if not plan.empty:
                bucket.backend.advance_steps(bucket, plan, ctx, not counted, bool(spec.names), variant_counts)
                bucket.counts_moved()
                counted = True
            if state_on_ascent and done.key != plan.key and not done.empty:  # the ascent's own participants
                bucket.backend.advance_steps(bucket, done, ctx, False, False, True)

    def _restore(self, plans: list[Plan | None], aliases_only: bool = False) -> None:
        """``w <- backup`` for the given buckets' plans (None: every parameter), in reverse
        bucket order, so that memory several parameters share gets back the value it had
        before the step (the earliest layer's backup is written last). ``aliases_only``: the
        buckets of layers above 0 only (layer 0 restores fused with its update)."""
        for bucket, plan in reversed(list(zip(self.buckets, plans))):
            if (plan is None or not plan.empty) and not (aliases_only and bucket.layer == 0):
                bucket.backend.restore(bucket, plan)

    def _restore_each(self, plans: list[Plan | None]) -> None:
        """``w <- backup`` parameter by parameter, converting (a parameter cast mid-step)."""
        for bucket, plan in reversed(list(zip(self.buckets, plans))):
            indices = range(len(bucket.params)) if plan is None else plan.indices
            for i in reversed(indices):
                bucket.weight(i).copy_(bucket.state_tensor("backup", i))

    def _generic_descend(self, perturbed: list[Plan] | None, plans: list[Plan], ctx: StepContext) -> None:
        """Restore, then the base optimizer's own step (a host sync decides a skip)."""
        if perturbed is not None:
            self._restore(perturbed)
        if ctx.check:
            skip = self.status[S.BAD1] + self.status[S.BAD2] > 0
            self.status[S.SKIPPED] += skip
            if bool(skip):  # the base optimizer's step cannot be skipped on the device
                return
        # the base optimizer reads p.grad itself: unscale and clip in place, as
        # scaler.unscale_() and clip_grad_norm_() would
        for bucket, plan in zip(self.buckets, plans):
            factor = None
            if ctx.unscale and not bucket.backend.unscales_in_place:
                factor = self.status[S.INV_SCALE2]
            if ctx.clip:
                factor = self.status[S.CLIP] if factor is None else factor * self.status[S.CLIP]
            grads = [bucket.params[i].grad for i in plan.indices]
            if factor is not None and grads:
                torch._foreach_mul_(grads, factor)
        base = self.owner.base_optimizer
        step = type(base).step
        # torch wraps step() with the step hooks and a profiler range: those belong to the SAM step
        (step.__wrapped__ if getattr(step, "hooked", False) else step)(base)
        for bucket, plan in zip(self.buckets, plans):
            if self.variant.ascent_updates_state and perturbed is not None:
                bucket.vsteps.add_(bucket.mask_of(plan))
            bucket.counts_set()  # torch's step moved Adam's counts through opt.state

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
        plans = [None] * len(self.buckets) if self.variant.noise or st.plans is None else st.plans
        try:  # where the parameters are now (a parameter moved since is restored where it went)
            plans = [plan if plan is None else b.refresh(plan) for b, plan in zip(self.buckets, plans)]
        except LayoutError:  # cast since: restored parameter by parameter, converting
            self._restore_each(plans[: st.backed_up])
        else:
            self._restore(plans[: st.backed_up])
        for bucket, plan in zip(self.buckets[: st.backed_up], plans):
            if st.phase is Phase.PERTURBED and self.variant.ascent_updates_state and not plan.empty:
                bucket.backend.revert_state(bucket, plan, ctx, force=True)
        if st.generator is not None and st.generator_before is not None:
            st.generator.set_state(st.generator_before)
        st.step_index = st.index_before
        st.phase, st.plans, st.scaler, st.backed_up, st.hooks_open = Phase.IDLE, None, None, 0, False
        return True

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_where", "_partials", "_contexts"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()


_STILL_PERTURBED = (
    "nothing changed, the weights are still at w + eps: call second_step() again once this is "
    "fixed, or abort_step() to abandon the step"
)


def _note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(f"sam_fused: {note}")
