"""``MSAM``: momentum-SAM, a SAM step at SGD's cost (one forward/backward per step).

The front end: arguments, param groups, buckets, the step's flow, ``unperturbed()``. The
math is ``msam_rules.py``; the operations per backend ``msam_backends.py`` and
``msam_triton.py``; checkpoints ``msam_checkpoint.py``. Parameters stay where they are and
the optimizer's state lives in the buckets' flat buffers (``storage.py``), as for ``SAM``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import msam_checkpoint, options
from .grouping import layers_of
from .layout import Bucket
from .msam_backends import BAD, SUMSQ, choose_msam_backend
from .msam_rules import NORM_EPS, WEIGHT, MSAMHyper, state_roles
from .placement import is_dtensor, kernel_refusal

__all__ = ["MSAM"]

_BASES = {torch.optim.SGD: "sgd", torch.optim.AdamW: "adamw"}


class MSAM(torch.optim.Optimizer):
    r"""Momentum-SAM (Becker, Altrock & Risse 2024): the gradient is taken at
    :math:`\tilde w = w - \rho\, v / (\lVert v \rVert + 10^{-12})`, with :math:`v` the base
    optimizer's first moment (SGD's momentum buffer, AdamW's ``exp_avg``), so a step costs
    one forward/backward, as SGD's.

    .. math::
        \begin{aligned}
        &g \leftarrow \nabla L(\tilde w) \hfill \text{the parameters hold } \tilde w \\
        &\text{SGD: } v \leftarrow \mu v + g + \lambda \tilde w, \quad w \leftarrow w - \eta v \\
        &\text{AdamW: } m, s \leftarrow \text{Adam's moments}, \quad
            w \leftarrow (w - \eta \hat m / (\sqrt{\hat s} + \epsilon)) (1 - \eta\lambda) \\
        &\tilde w \leftarrow w - \rho\, v / (\lVert v \rVert + 10^{-12})
            \hfill \lVert\cdot\rVert \text{ over every parameter} \\
        \end{aligned}

    Between steps the parameters hold :math:`\tilde w`, as in the official code; the
    optimizer keeps :math:`w` itself, so ``with opt.unperturbed(): ...`` puts :math:`w` in
    the parameters for the block (evaluate and save there) and :math:`\tilde w` back after
    it, bit for bit. A non-finite gradient skips the step: nothing moves. Details, and where
    this follows the official code rather than the paper: ``docs/variants.md``.

    Args:
        params: parameters or param groups; groups may set ``rho`` and any base option.
        base_optimizer: ``torch.optim.SGD`` (heavy-ball momentum: no nesterov, no dampening)
            or ``torch.optim.AdamW`` (no amsgrad).
        rho: the radius (default 3.0, the official README's for SGD and AdamW).
        backend: ``"auto"``, ``"triton"``, ``"cpp"``, ``"cuda"``, ``"foreach"`` or
            ``"reference"``, as for ``SAM``.
        **base_kwargs: the base optimizer's options (``lr``, ``momentum``, ``weight_decay``...).

    Example::

        opt = MSAM(model.parameters(), torch.optim.SGD, rho=3.0, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        with opt.unperturbed():
            evaluate(model)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 3.0,
        *,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        base = _BASES.get(base_optimizer)  # type: ignore[call-overload]
        if base is None:
            name = getattr(base_optimizer, "__qualname__", repr(base_optimizer))
            raise TypeError(
                f"MSAM runs on torch.optim.SGD or torch.optim.AdamW (the official code's bases), not {name}; "
                "use sam_fused.SAM for other base optimizers"
            )
        if isinstance(params, Tensor):
            raise TypeError(
                "params should be an iterable of Tensors or dicts, but got " + torch.typename(params)
            )
        options.check_rho(rho, "rho")
        groups = [dict(g) if isinstance(g, dict) else g for g in params]
        torch_base = base_optimizer(groups, **base_kwargs)  # torch checks its own options first
        for group in torch_base.param_groups:
            group.setdefault("rho", rho)
        self._base = base
        self._request = backend
        self._buckets: list[Bucket] = []
        self._laid_out: list[list[Tensor]] = []
        self._inside = False
        defaults = {**torch_base.defaults, "rho": rho}
        torch.optim.Optimizer.__setstate__(self, {"defaults": defaults, "param_groups": []})
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        self._scales = torch.zeros(0, dtype=torch.float64)
        self._status = torch.zeros(2, dtype=torch.float64)
        for group in torch_base.param_groups:
            self.add_param_group(group)

    # ------------------------------------------------------------------ groups and buckets
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (checked first: a refused group changes nothing)."""
        self._check_idle("add_param_group()")
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        index = len(self.param_groups)
        MSAMHyper.of(self._base, group, index)
        buckets = self._lay_out(group["params"], index)
        self.param_groups.append(group)
        self._laid_out.append(list(group["params"]))
        self._buckets.extend(buckets)
        self._scales = torch.cat([self._scales.to(self._device), self._scales.new_zeros(1).to(self._device)])
        self._status = self._status.to(self._device)
        for bucket in buckets:
            for i, p in enumerate(bucket.params):
                self.state[p] = self._state_views(bucket, i)

    @property
    def _device(self) -> torch.device:
        return self._buckets[0].device if self._buckets else torch.device("cpu")

    def _lay_out(self, params: list[Tensor], index: int) -> list[Bucket]:
        options.check_params(params, index)
        known = [p for b in self._buckets for p in b.params]
        known_ids = {id(p) for p in known}
        if any(id(p) in known_ids for p in params):
            raise ValueError(f"param group {index} repeats a parameter of an earlier group")
        devices = {p.device for p in known + params}
        if len(devices) > 1:
            raise ValueError(options.several_devices(devices))
        for p in params:
            if is_dtensor(p) or p.is_complex():
                raise TypeError(
                    f"param group {index} holds a {'DTensor' if is_dtensor(p) else 'complex'} parameter; "
                    "MSAM runs plain real tensors (sam_fused.SAM runs FSDP2 shards and complex parameters)"
                )
        if any(layers_of(known + params)):
            raise ValueError(
                f"param group {index}: parameters share memory (dec.weight.data = enc.weight.data); "
                "MSAM keeps one stored copy per parameter, so tie them as one Parameter "
                "(dec.weight = enc.weight) instead"
            )
        kinds: dict[tuple, list[Tensor]] = {}
        for p in params:
            kinds.setdefault((p.dtype, kernel_refusal(p)), []).append(p)
        buckets = []
        for (dtype, strided), members in kinds.items():
            backend = choose_msam_backend(self._request, members[0].device, dtype, strided)
            buckets.append(Bucket(members, index, backend))
        return buckets

    def _state_views(self, bucket: Bucket, i: int) -> dict[str, Tensor]:
        roles = (*state_roles(self._base), WEIGHT)
        return {"step": bucket.steps[i], **{role: bucket.state_tensor(role, i) for role in roles}}

    @property
    def backends(self) -> list[str]:
        """Each bucket's backend, in bucket order."""
        return [bucket.backend.name for bucket in self._buckets]

    # ------------------------------------------------------------------ checks
    def _check_idle(self, what: str) -> None:
        if getattr(self, "_inside", False):
            raise RuntimeError(
                f"{what} was called inside opt.unperturbed(), where the parameters hold w rather than w~; "
                "leave the block first"
            )

    def _check_groups(self) -> list[MSAMHyper]:
        if len(self.param_groups) != len(self._laid_out):
            raise RuntimeError(options.groups_changed("param_groups gained or lost a group"))
        for index, (group, laid) in enumerate(zip(self.param_groups, self._laid_out)):
            params = group["params"]
            if len(params) != len(laid) or any(a is not b for a, b in zip(params, laid)):
                raise RuntimeError(options.groups_changed(f"param_groups[{index}]['params'] changed"))
        return [MSAMHyper.of(self._base, group, index) for index, group in enumerate(self.param_groups)]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One MSAM step with the gradients at hand (taken at ``w~``): everything is checked
        first (a refusal changes nothing), then one statistics pass and one fused pass."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_idle("step()")
        hypers = self._check_groups()
        plans = [bucket.plan() for bucket in self._buckets]  # validates every gradient
        status = self._status
        status.zero_()
        for bucket, plan in zip(self._buckets, plans):
            h = hypers[bucket.group_index]
            bucket.backend.stats(bucket, plan, h, status)
            left_out = bucket.complement_run(plan)
            if left_out is not None:  # their momentum stays, and counts in the norm
                norms = torch._foreach_norm(left_out.tensors(state_roles(self._base)[0]))
                status[SUMSQ] += torch.stack([n.to(torch.float64) for n in norms]).square().sum()
        rhos = torch.tensor([h.rho for h in hypers], dtype=torch.float64).to(self._device)
        new_scales = rhos / (status[SUMSQ].sqrt() + NORM_EPS)
        self._scales.copy_(torch.where(status[BAD] > 0, self._scales, new_scales))
        for bucket, plan in zip(self._buckets, plans):
            g = bucket.group_index
            bucket.backend.apply(bucket, plan, hypers[g], status, self._scales, g)
            left_out = bucket.complement_run(plan)
            if left_out is not None:
                bucket.backend.perturb(bucket, left_out, self._base, self._scales, g)
        return loss

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Zero the gradients in place (default: they stay slices of the flat gradient buffer,
        as with ``SAM``), or drop them with ``set_to_none=True``."""
        for bucket in self._buckets:
            bucket.zero_grad(set_to_none)

    # ------------------------------------------------------------------ w and w~
    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[MSAM]:
        """Hold ``w`` (not ``w~``) in the parameters during the block: evaluate, save the model
        there. Afterwards the parameters hold ``w~`` again, bit for bit; changes made to them
        inside the block are overwritten. ``step()`` inside the block is refused."""
        self._check_idle("unperturbed()")
        for bucket in self._buckets:
            bucket.backend.restore(bucket)
        self._inside = True
        try:
            yield self
        finally:
            self._inside = False
            self._perturb_all()

    def _perturb_all(self) -> None:
        for bucket in self._buckets:
            g = bucket.group_index
            bucket.backend.perturb(bucket, bucket.all_run(), self._base, self._scales, g)

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        # everything (torch's own keeps only defaults, state and groups), but not an LR
        # scheduler's wrapper of step(); opt.state is views of the buckets, remade on restore
        return {k: v for k, v in self.__dict__.items() if k not in ("step", "state")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        torch.optim.Optimizer.__setstate__(self, state)
        self.state = {}
        for bucket in self._buckets:
            if isinstance(bucket.backend, str):  # buckets travel with their backend's name
                bucket.backend = choose_msam_backend(bucket.backend, bucket.device, bucket.dtype, None)
            for i, p in enumerate(bucket.params):
                self.state[p] = self._state_views(bucket, i)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout plus what resumes the run exactly: per parameter the base's
        state (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``), ``step`` and the stored
        ``unperturbed_weight`` (w); ``msam_scales``: each group's ``c = rho / ||v||``."""
        return msam_checkpoint.save(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of an MSAM optimizer over the same parameters (checked first: a
        refusal changes nothing), then put every parameter at ``w~ = w - c v`` from it, so
        the run resumes exactly whichever weights the model was loaded with."""
        self._check_idle("load_state_dict()")
        msam_checkpoint.load(self, state_dict)
        self._perturb_all()
