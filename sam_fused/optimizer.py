"""The SAM optimizer: the user-facing class that dispatches to a backend per bucket.

A SAM step, for every variant::

    pass 1   g = grad L(w)                         (the user's forward/backward)
    first_step()   eps = rho * T * u / (||u|| + norm_eps); backup = w; w <- w + eps
    pass 2   g_p = grad L(w + eps)                 (the user's forward/backward)
    second_step()  w <- backup; w <- base_update(w, g_p)

``||u||`` is one L2 norm over every parameter with a gradient, across all param groups.
The class wraps a base optimizer the way the popular SAM implementation does: the base
optimizer is built on the same ``param_groups`` list, so learning-rate schedulers, per-group
hyperparameters and ``add_param_group`` act on both. For ``torch.optim.SGD``, ``Adam`` and
``AdamW`` the base update runs inside the restore kernel; any other base optimizer gets a
restore, then its own ``step()``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import status as S
from .backends import make_backend
from .backends.reference import StepContext
from .backends.sharded import ShardedBackend, is_dtensor, shard_group
from .base_updates import AdamSpec, BaseSpec, base_spec_for, state_names
from .layout import Bucket, Plan
from .variants import ASCENT, DESCENT, VARIANTS, get_variant, resolve_options

__all__ = ["SAM"]

BACKEND_ENV = "SAM_FUSED_BACKEND"
# torch.compile does not trace into the optimizer: its kernels, layout checks and
# device-side skip logic run eagerly (a graph break where a compiled function calls them),
# so a compiled training step works and its compile time does not grow with the model.
_eager = torch.compiler.disable

BACKEND_NAMES = ("auto", "triton", "reference", "cpp", "cuda")
_OUR_DEFAULTS = ("rho", "adaptive", "eta")


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization around any base optimizer, with fused kernels.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. Groups
            may set ``rho``, ``adaptive``, ``eta`` and any base-optimizer option.
        base_optimizer: the base optimizer *class* (default ``torch.optim.SGD``); it is
            built on this optimizer's param groups with ``**base_kwargs``.
        rho: the radius of the perturbation (default 0.05).
        adaptive: ASAM: scale the perturbation by ``T = |w| + eta`` (default False).
            ``adaptive=True`` with the default ``eta=0`` is the popular implementation's
            ASAM; ``eta=0.01`` is the official one.
        eta: ASAM's offset ``eta`` (default 0).
        variant: ``"sam"`` (default), ``"usam"``, ``"vasso"``, ``"fsam"``, ``"gcsam"``,
            ``"rsam"``, ``"gsam"``, ``"looksam"`` or ``"interval"``; see
            ``sam_fused.VARIANTS`` and the classes of the same names.
        norm_eps: added to the global norm after the square root (default 1e-12).
        backend: ``"auto"`` (Triton for CUDA tensors; for CPU tensors the compiled C++
            backend when it is built or can be built, else the reference), ``"triton"``,
            ``"reference"``, ``"cpp"`` (C++ CPU kernels) or ``"cuda"`` (CUDA C++ kernels).
            The environment variable ``SAM_FUSED_BACKEND`` replaces ``"auto"``.
        variant_options: the variant's own options (see ``sam_fused.VARIANTS``); the
            variant classes (``VaSSO``, ``GSAM``, ...) take them as keyword arguments.
        skip_nonfinite: when a NaN or infinity appears in the gradient of either pass,
            skip the whole step on the device: no perturbation, weights restored bit for
            bit, no optimizer state moved, and ``skipped_steps`` counts it (default True).
            It costs one extra read of the second gradient. With False, non-finite
            gradients flow into the update as they do in ``torch.optim``.
        max_grad_norm: clip the descent gradient (the one the base update receives) to
            this global norm over every parameter, on the device, fused into
            ``second_step`` (default None: no clipping). The first pass needs no clipping:
            the normalized perturbation does not depend on the gradient's length.
        **base_kwargs: options of the base optimizer (``lr``, ``momentum``, ...).

    Example::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """

    # GradScaler.step(opt) hands this optimizer the scale and lets it unscale inside its own
    # kernels (as torch's fused optimizers do) instead of unscaling gradients in place
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        eta: float = 0.0,
        variant: str = "sam",
        norm_eps: float = 1e-12,
        backend: str = "auto",
        skip_nonfinite: bool = True,
        max_grad_norm: float | None = None,
        variant_options: dict[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD, not "
                f"{base_optimizer!r}; SAM builds it on its own param groups"
            )
        _check_rho(rho, "rho")
        _check_eta(eta, "eta")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps}")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
        self.variant = get_variant(variant)
        self.variant_options = resolve_options(self.variant, dict(variant_options or {}))
        self._every = int(self.variant_options[self.variant.every_option]) if self.variant.every_option else 0
        self._step_index = 0  # steps taken; LookSAM and interval SAM perturb when it is a multiple of k
        self._noised = False
        self._generator: torch.Generator | None = None
        if max_grad_norm is not None:
            if not (isinstance(max_grad_norm, (int, float)) and 0 < max_grad_norm < math.inf):
                raise ValueError(
                    f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}"
                )
            if self.variant.descent == DESCENT.LOOKSAM_FULL:
                raise ValueError(
                    "max_grad_norm is not available with LookSAM: the norm of its reuse steps' "
                    "descent gradient g + alpha (||g|| / ||g_v||) g_v is not computed"
                )
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._scaler: Any = None  # the GradScaler of the step in flight (first_step(grad_scaler=))
        self.norm_eps = float(norm_eps)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.backend_request = backend
        self._buckets: list[Bucket] = []
        defaults = dict(rho=float(rho), adaptive=bool(adaptive), eta=float(eta), **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self._check_descent_fusable()
        self._device = self._single_device()
        self._acc_dtype = torch.float32
        for index in range(len(self.param_groups)):
            self._build_buckets(index)
        self._status = torch.zeros(S.SIZE, dtype=self._acc_dtype, device=self._device)
        self._partials: dict[int, Tensor] = {}
        self._perturbed: list[Plan] | None = None
        self._attached: dict[int, tuple] = {}

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated first; a refused group changes nothing)."""
        if getattr(self, "_perturbed", None) is not None or getattr(self, "_noised", False):
            raise RuntimeError(
                "add_param_group() between first_step() and second_step() is not allowed: the "
                "weights are perturbed. Add the group after second_step()."
            )
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        _check_params(param_group["params"])
        if "rho" in param_group:
            _check_rho(param_group["rho"], "rho")
        if "eta" in param_group:
            _check_eta(param_group["eta"], "eta")
        if not hasattr(self, "base_optimizer"):  # inside Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key in _OUR_DEFAULTS:
            param_group.setdefault(key, self.defaults[key])
        devices = {p.device for p in param_group["params"]}
        if self._has_params:
            devices.add(self._device)
        if len(devices) > 1:
            raise ValueError(_several_devices(devices))
        shard_group([*(p for b in self._buckets for p in b.params), *param_group["params"]])  # refuse a mix
        if devices and not self._has_params:
            self._device = devices.pop()
            self._status = self._status.to(self._device)
            self._partials.clear()
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list
        try:
            self._check_descent_fusable()
        except ValueError:
            self.param_groups.pop()
            raise
        self._build_buckets(len(self.param_groups) - 1)
        self._partials.clear()

    @property
    def _has_params(self) -> bool:
        return bool(self._buckets)

    def _single_device(self) -> torch.device:
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(_several_devices(devices))
        return devices.pop() if devices else torch.device("cpu")

    def _build_buckets(self, index: int) -> None:
        group = self.param_groups[index]
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in group["params"]:
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, params in by_dtype.items():
            device = params[0].device
            if is_dtensor(params[0]):
                backend = self._sharded_backend()
            else:
                backend = make_backend(self._backend_name(device, dtype), device, dtype, self.variant)
            self._buckets.append(Bucket(params, index, fused=backend.name != "reference", backend=backend))
            if dtype == torch.float64:
                self._acc_dtype = torch.float64
        if hasattr(self, "_status") and self._status.dtype != self._acc_dtype:
            self._status = self._status.to(self._acc_dtype)
        # FSDP2: the global statistics are sums over the ranks' shards (None: nothing to reduce)
        self._process_group = shard_group(p for b in self._buckets for p in b.params)

    def _sharded_backend(self) -> ShardedBackend:
        """DTensor parameters cannot move into flat buffers: reference math on local shards."""
        if self.backend_request not in ("auto", "reference"):
            raise ValueError(
                f"backend={self.backend_request!r} needs parameters it can move into flat buffers; "
                "DTensor parameters (FSDP2 / fully_shard) run on the reference backend over their "
                "local shards: use backend='auto' or 'reference'"
            )
        return ShardedBackend()

    def _sum_over_shards(self, entries: slice) -> None:
        """FSDP2: each rank summed its own shards into ``status[entries]``; add the ranks up."""
        if self._process_group is not None:
            torch.distributed.all_reduce(self._status[entries], group=self._process_group)

    def _check_descent_fusable(self) -> None:
        """GSAM and LookSAM change the descent gradient inside the fused base update."""
        if self.variant.descent == DESCENT.PLAIN:
            return
        for index, group in enumerate(self.param_groups):
            if base_spec_for(self.base_optimizer, group) is None:
                raise ValueError(
                    f"{self.variant.name} changes the descent gradient, which sam_fused fuses into "
                    f"torch.optim.SGD, Adam and AdamW only; param group {index} of "
                    f"{type(self.base_optimizer).__name__} cannot take it (a differentiable or "
                    "tensor-valued option also prevents it)"
                )

    def _backend_name(self, device: torch.device, dtype: torch.dtype) -> str:
        name = self.backend_request
        if name == "auto":
            name = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if name not in BACKEND_NAMES:
            raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKEND_NAMES)}, got {name!r}")
        if name == "auto":
            from .backends import cpp_supports, triton_supports

            if device.type == "cuda":
                return "triton" if triton_supports(device, dtype) else "reference"
            # CPU tensors: the compiled C++ backend when it is built or buildable and has
            # kernels for this variant
            from .backends import CppBackend

            compiled = CppBackend.supports_variant(self.variant) and cpp_supports(device, dtype)
            return "cpp" if device.type == "cpu" and compiled else "reference"
        return name

    # ------------------------------------------------------------------ the step
    def _context(self, scaled: bool = False) -> StepContext:
        return StepContext(
            self.variant,
            self.variant_options,
            self.norm_eps,
            self.skip_nonfinite or scaled,  # an overflow under a GradScaler must never land
            self._status,
            self.state,
            unscale=scaled,
            clip=self.max_grad_norm is not None,
        )

    @property
    def perturbs_this_step(self) -> bool:
        """Whether the coming step perturbs (False on LookSAM and interval SAM reuse steps)."""
        return self._every == 0 or self._step_index % self._every == 0

    @_eager
    @torch.no_grad()
    def noise_step(self) -> None:
        """RSAM: back the weights up and move them to ``w + delta`` for the first pass.

        ``delta ~ N(0, noise_std^2 I)`` is drawn from the optimizer's own generator (seeded
        by the ``seed`` option and saved in ``state_dict``), so runs reproduce.
        """
        if not self.variant.noise:
            raise RuntimeError(f"noise_step() belongs to RSAM; this optimizer runs {self.variant.name!r}")
        if self._perturbed is not None or self._noised:
            raise RuntimeError("noise_step() was called again before first_step()/second_step() finished")
        self._check_hyperparameters()
        ctx = self._context()
        if self._generator is None:
            self._generator = torch.Generator(device=self._device)
            self._generator.manual_seed(int(self.variant_options["seed"]))
        total = max(1, sum(p.numel() for b in self._buckets for p in b.params))
        for bucket in self._buckets:
            group = self.param_groups[bucket.group_index]
            std = self.variant_options["noise_std"]
            std = float(group["rho"]) / math.sqrt(total) if std is None else float(std)
            bucket.backend.noise(bucket, ctx, std, self._generator)
        self._noised = True

    @_eager
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> bool:
        """Perturb the weights: back them up and move them to ``w + eps``.

        Reads the first-pass gradients; with ``zero_grad=True`` zeroes them afterwards,
        ready for the second pass. Returns True when a second pass is due; LookSAM and
        interval SAM return False on their reuse steps, where this call has already
        applied the whole (one-pass) update.

        ``grad_scaler``: the ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` made
        these gradients. They are unscaled inside the kernels (the buffers are not
        rewritten), an overflow skips the whole step, and ``second_step`` / ``scaler.step``
        use the same scaler; see "Mixed precision" in the README.
        """
        if self._perturbed is not None:
            raise RuntimeError(
                "first_step() was called twice without second_step(): the weights are "
                "already perturbed; call second_step() to restore and update them"
            )
        if self.variant.noise and not self._noised:
            raise RuntimeError("RSAM takes its first pass at w + delta: call noise_step() before it")
        self._check_hyperparameters()
        self._check_descent_fusable()
        scaler = _active_scaler(grad_scaler, self, "first_step")
        plans = [bucket.plan() for bucket in self._buckets]
        self._scaler = scaler
        if scaler is not None:  # both passes of a step share the scale (it moves in update())
            inv = self._status[S.INV_SCALE1 : S.INV_SCALE2 + 1]
            inv.copy_(scaler._scale.to(inv).expand(2)).reciprocal_()
        ctx = self._context(scaled=scaler is not None)
        if not self.perturbs_this_step:
            self._reuse_step(plans, ctx)
            if scaler is not None:
                _report_to_scaler(scaler, self, mark_stepped=True)
            self._scaler = None
            if zero_grad:
                self.zero_grad()
            return False
        for bucket, plan in zip(self._buckets, plans):
            self._attach_state(bucket, plan, None)
        if self.variant.centralize:
            for bucket, plan in zip(self._buckets, plans):
                if not plan.empty:
                    bucket.backend.centralize(bucket, plan)
        # the second pass's entries are this step's, not the last one's (a skip reads them)
        self._status[S.SECOND_PASS].zero_()
        if self.variant.normalized or self.skip_nonfinite:
            self._ascent_stats(plans, ctx, groups=None)
        for bucket, plan in zip(self._buckets, plans):
            if not plan.empty:
                bucket.backend.perturb(bucket, plan, self.param_groups[bucket.group_index], ctx)
        self._perturbed = plans
        self._noised = False
        self._step_index += 1
        if zero_grad:
            self.zero_grad()
        return True

    def _ascent_stats(self, plans: list[Plan], ctx: StepContext, groups: dict | None) -> None:
        """First-pass statistics of every bucket into ``status[SUMSQ, BAD1]``."""
        partials = self._partials_for(plans)
        offset = 0
        for bucket, plan in zip(self._buckets, plans):
            if plan.empty:
                continue
            n = bucket.backend.partial_slots(bucket, plan)
            group = groups or self.param_groups[bucket.group_index]
            bucket.backend.ascent_stats(bucket, plan, group, ctx, partials[:, offset : offset + n])
            offset += n
        torch.sum(partials[:2], dim=1, out=self._status[S.FIRST_PASS])
        self._sum_over_shards(S.FIRST_PASS)

    def _reuse_step(self, plans: list[Plan], ctx: StepContext) -> None:
        """LookSAM / interval SAM between perturbed steps: one pass, one update."""
        plain = dataclasses.replace(ctx, variant=VARIANTS["sam"])
        self._ascent_stats(plans, plain, groups={"adaptive": False, "eta": 0.0})  # ||g||, non-finite
        self._status[S.SECOND_PASS].zero_()
        if ctx.clip:  # the descent gradient is this pass's g: its norm is the ascent's
            self._status[S.GP2].copy_(self._status[S.SUMSQ])
        descent = DESCENT.LOOKSAM_REUSE if self.variant.descent == DESCENT.LOOKSAM_FULL else DESCENT.PLAIN
        self._descend(None, plans, ctx, descent)
        self._step_index += 1

    @_eager
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """Restore the weights exactly and apply the base update with the current gradients.

        After ``first_step(grad_scaler=scaler)`` the second pass's gradients are unscaled
        with the same scaler (``grad_scaler`` may repeat it); the scaler then learns about
        an overflow in either pass, so that ``scaler.update()`` backs off.
        """
        self._second_step(zero_grad, grad_scaler, scaler_step_scale=None)

    def _second_step(self, zero_grad: bool, grad_scaler: Any, scaler_step_scale: Any) -> None:
        if self._perturbed is None:
            raise RuntimeError(
                "second_step() was called without first_step(): there is no perturbation to "
                "undo. Call first_step() after the first backward pass."
            )
        scaler = _active_scaler(grad_scaler, self, None) if grad_scaler is not None else self._scaler
        if scaler is not None and self._scaler is None:
            raise RuntimeError(
                "second_step(grad_scaler=...) needs first_step(grad_scaler=...) with the same "
                "scaler: the first pass's gradients were taken as unscaled"
            )
        if grad_scaler is not None and grad_scaler is not self._scaler:
            raise RuntimeError("second_step() got another GradScaler than first_step()")
        plans = [bucket.plan() for bucket in self._buckets]
        if scaler is not None:
            inv2 = self._status[S.INV_SCALE2 : S.INV_SCALE2 + 1]
            if scaler_step_scale is not None:  # scaler.step(): its scale, or None once unscale_()d
                scale = scaler_step_scale[0]
            else:
                state = scaler._per_optimizer_states[id(self)]
                scale = None if state["stage"] is _opt_state().UNSCALED else scaler._scale
            if scale is None:
                inv2.fill_(1.0)  # the user ran scaler.unscale_(opt) on this pass already
            else:
                inv2.copy_(scale.to(inv2).reshape(1)).reciprocal_()
        ctx = self._context(scaled=scaler is not None)
        if self.variant.centralize:  # GCSAM descends along GC(g_p) too
            for bucket, plan in zip(self._buckets, plans):
                if not plan.empty:
                    bucket.backend.centralize(bucket, plan)
        if ctx.check or ctx.clip or self.variant.keeps_first_grad:
            partials = self._partials_for(plans)
            offset = 0
            for bucket, plan in zip(self._buckets, plans):
                if plan.empty:
                    continue
                n = bucket.backend.partial_slots(bucket, plan)
                bucket.backend.descent_stats(bucket, plan, ctx, partials[:, offset : offset + n])
                offset += n
            torch.sum(partials, dim=1, out=self._status[S.SECOND_PASS])
            self._sum_over_shards(S.SECOND_PASS)
        if ctx.check and self.variant.ascent in (ASCENT.VASSO, ASCENT.FSAM):
            for bucket, plan in zip(self._buckets, self._perturbed):
                if not plan.empty:
                    bucket.backend.revert_state(bucket, plan, ctx)
        self._descend(self._perturbed, plans, ctx, self.variant.descent)
        if self.variant.descent == DESCENT.LOOKSAM_FULL:
            self._store_gv_norm(plans, ctx)
        self._perturbed = None
        if scaler is not None:
            _report_to_scaler(scaler, self, mark_stepped=scaler_step_scale is None)
        self._scaler = None
        if zero_grad:
            self.zero_grad()

    def _descend(
        self, perturbed: list[Plan] | None, plans: list[Plan], ctx: StepContext, descent: int
    ) -> None:
        """Restore (when ``perturbed``) and apply the base update with the descent gradient."""
        if ctx.clip:
            self._clip_coefficient(descent)
        specs = [base_spec_for(self.base_optimizer, self.param_groups[b.group_index]) for b in self._buckets]
        if any(spec is None for spec in specs) or not self._buckets:
            self._generic_descend(perturbed, plans, ctx, descent)
        else:
            counted = False
            for i, (bucket, plan, spec) in enumerate(zip(self._buckets, plans, specs)):
                self._attach_state(bucket, plan, spec)
                done = None if perturbed is None else perturbed[i]
                bucket.backend.update(bucket, done, plan, spec, ctx, descent)
                if not plan.empty:
                    bucket.backend.advance_steps(bucket, plan, ctx, count_skip=not counted)
                    counted = True
                    bucket.note_update(plan)
        self._opt_called = True  # LR schedulers check this to warn about call order

    def _clip_coefficient(self, descent: int) -> None:
        """``status[CLIP] = min(1, max_norm / (||d|| + 1e-6))`` on the device, as
        ``torch.nn.utils.clip_grad_norm_`` computes it, for the descent gradient ``d``."""
        st = self._status
        norm2 = st[S.GP2]
        if descent == DESCENT.GSAM:  # ||(1 + alpha c) g_p - alpha g||^2 with c = <g, g_p> / ||g_p||^2
            alpha = float(self.variant_options["alpha"])
            c = torch.where(st[S.GP2] > 0, st[S.DOT] / st[S.GP2], 0.0)
            a = 1 + alpha * c
            norm2 = (a * a * st[S.GP2] - 2 * alpha * a * st[S.DOT] + alpha * alpha * st[S.G2]).clamp(min=0)
        coef = self.max_grad_norm / (norm2.sqrt() + 1e-6)
        st[S.CLIP] = coef.clamp(max=1.0)

    def _generic_descend(self, perturbed, plans, ctx: StepContext, descent: int) -> None:
        """Restore, then the base optimizer's own step (a host sync decides a skip)."""
        if descent != DESCENT.PLAIN:
            raise NotImplementedError(
                f"{self.variant.name} changes the descent gradient, which sam_fused fuses into "
                "SGD, Adam and AdamW only; use one of those as the base optimizer"
            )
        if perturbed is not None:
            for bucket, plan in zip(self._buckets, perturbed):
                bucket.backend.restore(bucket, plan)
        if ctx.check:
            skip = self._status[S.BAD1] + self._status[S.BAD2] > 0
            self._status[S.SKIPPED] += skip
            if bool(skip):  # the base optimizer's step cannot be skipped on the device
                return
        # the base optimizer reads p.grad itself: unscale and clip in place, as
        # scaler.unscale_() and clip_grad_norm_() would
        for bucket, plan in zip(self._buckets, plans):
            factor = None
            if ctx.unscale and not bucket.backend.unscales_in_place:
                factor = self._status[S.INV_SCALE2]
            if ctx.clip:
                factor = self._status[S.CLIP] if factor is None else factor * self._status[S.CLIP]
            grads = [bucket.params[i].grad for i in plan.indices]
            if factor is not None and grads:
                torch._foreach_mul_(grads, factor)
        self.base_optimizer.step()
        for bucket, plan in zip(self._buckets, plans):
            bucket.steps.add_(bucket.mask_of(plan))

    def _store_gv_norm(self, plans: list[Plan], ctx: StepContext) -> None:
        """LookSAM: ``status[GV2] = ||g_v||^2`` of the newly stored component (exact)."""
        partials = self._partials_for(plans)
        offset = 0
        for bucket, plan in zip(self._buckets, plans):
            if plan.empty:
                continue
            n = bucket.backend.partial_slots(bucket, plan)
            bucket.backend.state_sumsq(
                bucket, plan, "looksam_gv", self.state, partials[:, offset : offset + n]
            )
            offset += n
        torch.sum(partials[0], dim=0, keepdim=True, out=self._status[S.GV2 : S.GV2 + 1])
        self._sum_over_shards(slice(S.GV2, S.GV2 + 1))

    @_eager
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """A whole SAM step, calling ``closure`` (forward + backward) for each pass.

        The closure convention is ``torch.optim.LBFGS``'s: it recomputes the loss, calls
        ``backward()`` and returns the loss. Returns the first pass's loss (for RSAM, the
        loss at ``w + delta``). LookSAM and interval SAM call it once on reuse steps.
        """
        if closure is None and self._perturbed is not None:
            # after first_step(), step() finishes the step: this is what GradScaler.step(opt)
            # calls (handing over its scale, None once the user ran scaler.unscale_(opt))
            if hasattr(self, "found_inf"):
                if self._scaler is None:
                    raise RuntimeError(
                        "scaler.step(opt) after first_step() without grad_scaler=scaler: the first "
                        "pass's gradients were taken as unscaled; pass grad_scaler to first_step()"
                    )
                self._second_step(False, None, scaler_step_scale=(getattr(self, "grad_scale", None),))
            else:
                self._second_step(False, None, scaler_step_scale=None)
            return None
        if closure is None:
            raise RuntimeError(
                "SAM.step() needs a closure that runs forward and backward and returns the "
                "loss (it is called once per pass), or a first_step() before it; or call "
                "first_step() and second_step()"
            )
        closure = torch.enable_grad()(closure)
        if self.variant.noise:
            self.noise_step()
        loss = closure()
        if self.first_step(zero_grad=True):
            closure()
            self.second_step()
        return loss

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Zero the gradients in place (the default) or set them to None.

        The default differs from ``torch.optim``'s ``set_to_none=True``: the fused path
        keeps gradients as views of a flat buffer that the next backward pass accumulates
        into, and dropping them would force a gather on every step. As with
        ``set_to_none=False`` in PyTorch, a parameter that receives no gradient in a pass
        then takes part with a zero gradient. Pass ``set_to_none=True`` to drop them.
        """
        for bucket in self._buckets:
            bucket.zero_grad(set_to_none)

    # ------------------------------------------------------------------ helpers
    @property
    def skipped_steps(self) -> Tensor:
        """How many steps were skipped for non-finite gradients (a device tensor)."""
        return self._status[S.SKIPPED]

    @property
    def backends(self) -> list[str]:
        """The backend of each bucket (one per param group and dtype), in order."""
        return [bucket.backend.name for bucket in self._buckets]

    def _check_hyperparameters(self) -> None:
        for i, group in enumerate(self.param_groups):
            _check_rho(group["rho"], f"param_groups[{i}]['rho']")
            _check_eta(group["eta"], f"param_groups[{i}]['eta']")

    def _partials_for(self, plans: list[Plan]) -> Tensor:
        """The buffer of per-program partial sums for these plans (cached by size)."""
        slots = sum(b.backend.partial_slots(b, p) for b, p in zip(self._buckets, plans) if not p.empty)
        partials = self._partials.get(slots)
        if partials is None:
            partials = torch.zeros(4, slots, dtype=self._acc_dtype, device=self._device)
            if len(self._partials) > 8:
                self._partials.clear()
            self._partials[slots] = partials
        return partials

    def _attach_state(self, bucket: Bucket, plan: Plan, spec: BaseSpec) -> None:
        """Expose a fused bucket's flat state as torch.optim-style per-parameter entries.

        ``spec=None`` attaches only the variant's persistent state (before the ascent).
        """
        if not bucket.fused:
            return
        names = (state_names(spec) if spec is not None else ()) + self.variant.state
        key = (plan.key, names, isinstance(spec, AdamSpec))
        if self._attached.get((id(bucket), spec is None)) == key:
            return
        for i in plan.indices:
            st = self.state[bucket.params[i]]
            for name in names:
                if name not in st:
                    st[name] = bucket.state_view(name, i)
            if isinstance(spec, AdamSpec):
                st["step"] = bucket.steps[i]
        self._attached[(id(bucket), spec is None)] = key

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state, the variant's persistent state and the param groups.

        Never the per-step backup. Under ``"sam_fused"``: the step index (LookSAM and
        interval SAM schedules), the skipped-step count, LookSAM's ``||g_v||^2`` and RSAM's
        generator state.
        """
        if self._perturbed is not None or self._noised:
            raise RuntimeError(
                "state_dict() was called between first_step() and second_step(): the weights "
                "are perturbed. Save after second_step()."
            )
        state = super().state_dict()
        state["sam_fused"] = {
            "step_index": self._step_index,
            "status": {i: float(self._status[i]) for i in S.PERSISTENT},
            "generator": None if self._generator is None else self._generator.get_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint; state moves into the flat buffers where the layout has them."""
        if self._perturbed is not None or self._noised:
            raise RuntimeError("load_state_dict() between first_step() and second_step() is not allowed")
        state_dict = dict(state_dict)
        extra = state_dict.pop("sam_fused", None)
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state
        self._attached.clear()
        for bucket in self._buckets:
            for i, p in enumerate(bucket.params):
                st = self.state.get(p, {})
                if "step" in st:
                    bucket.steps[i] = float(st["step"])
                    st["step"] = bucket.steps[i]
                elif st.get("momentum_buffer") is not None:
                    bucket.steps[i] = 1.0
                else:
                    bucket.steps[i] = 0.0
                if bucket.fused:
                    for name, value in list(st.items()):
                        if name != "step" and isinstance(value, Tensor) and value.shape == p.shape:
                            view = bucket.state_view(name, i)
                            view.copy_(value)
                            st[name] = view
            bucket.reset_classes_from_steps()
        if extra is not None:
            self._step_index = int(extra["step_index"])
            for index, value in extra["status"].items():
                self._status[int(index)] = value
            if extra.get("generator") is not None:
                if self._generator is None:
                    self._generator = torch.Generator(device=self._device)
                self._generator.set_state(extra["generator"])


def _opt_state():
    from torch.amp.grad_scaler import OptState

    return OptState


def _active_scaler(scaler: Any, opt: SAM, where: str | None) -> Any:
    """``scaler`` when it is an enabled GradScaler ready for this step, else None (disabled)."""
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if not scaler.is_enabled():
        return None
    if scaler._scale is None:
        raise RuntimeError("the GradScaler has no scale yet: call scaler.scale(loss).backward() first")
    if scaler._scale.device != opt._device:
        raise ValueError(
            f"the GradScaler's scale is on {scaler._scale.device}, the parameters on {opt._device}"
        )
    stage = scaler._per_optimizer_states[id(opt)]["stage"]
    if where == "first_step" and stage is not _opt_state().READY:
        raise RuntimeError(
            "first_step(grad_scaler=...) found scaler.unscale_(opt) or scaler.step(opt) already "
            "called in this step: sam_fused unscales the first pass itself; call scaler.update() "
            "once per step, after the second step"
        )
    return scaler


def _report_to_scaler(scaler: Any, opt: SAM, mark_stepped: bool) -> None:
    """Tell the scaler whether either pass overflowed (on the device), so update() backs off.

    GradScaler keeps one ``found_inf`` tensor per device for each optimizer; update() reads
    them. scaler.step() and scaler.unscale_() have filled them with the second pass's check
    only; a first-pass overflow is added here. Otherwise the entry is created.
    """
    found = ((opt._status[S.BAD1] + opt._status[S.BAD2]) > 0).to(torch.float32)
    state = scaler._per_optimizer_states[id(opt)]
    per_device = state["found_inf_per_device"]
    if per_device:
        for t in per_device.values():
            torch.maximum(t, found.to(t.device), out=t)
    else:
        per_device[scaler._scale.device] = found.to(scaler._scale.device).reshape(())
    if mark_stepped:
        state["stage"] = _opt_state().STEPPED


def _check_rho(rho: Any, name: str) -> None:
    if isinstance(rho, Tensor):
        return  # device-resident schedules are validated where they are computed
    if not (isinstance(rho, (int, float)) and rho >= 0):
        raise ValueError(f"{name} must be a non-negative number, got {rho!r}")


def _check_eta(eta: Any, name: str) -> None:
    if not (isinstance(eta, (int, float)) and eta >= 0):
        raise ValueError(f"{name} (ASAM's offset) must be a non-negative number, got {eta!r}")


def _check_params(params: list[Tensor]) -> None:
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameter {i} is a {type(p).__name__}, not a tensor")
        if not p.is_floating_point():
            raise TypeError(
                f"parameter {i} has dtype {p.dtype}; SAM optimizes floating-point parameters only"
            )
        if p.is_sparse:
            raise TypeError(f"parameter {i} is a sparse tensor; SAM needs dense parameters")
        if id(p) in seen:
            raise ValueError(f"parameter {i} appears twice in the same param group")
        seen.add(id(p))


def _several_devices(devices: set[torch.device]) -> str:
    names = ", ".join(sorted(str(d) for d in devices))
    return (
        f"the parameters are on several devices ({names}); one SAM optimizer needs them on "
        "one device, since its global gradient norm is reduced there. Build one optimizer "
        "per device, or move the model first."
    )
