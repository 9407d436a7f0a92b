"""The SAM optimizer's front end: arguments, param groups and the public calls.

Everything a step does happens in the step engine (``engine.py``); state is owned by the
buckets and shown through ``opt.state`` (``state.py``); checkpoints are ``checkpoint.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import amp, arguments, checkpoint, hooks, options
from . import status as S
from .closure_check import FirstClosureCheck
from .engine import StepEngine
from .integrations import check_closure_loop
from .policies import StepKind
from .state import OptimizerState
from .step_state import Phase

__all__ = ["SAM"]

# torch.compile does not trace into the optimizer: its kernels, layout checks and device
# skip logic run eagerly (a graph break where a compiled function calls them)
_eager = torch.compiler.disable


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization around any base optimizer, with fused kernels.

    .. math::
        \begin{aligned}
        &\textbf{input}: w_0, \text{base update } B, \rho \text{ (per group)}, \epsilon_n
            \text{ (norm\_eps)}, \eta, \text{variant} \\
        &\textbf{for } t = 1, 2, \ldots: \\
        &\quad g \leftarrow \nabla L(w)  \hfill \text{pass 1 (RSAM: at } w + \delta) \\
        &\quad v \leftarrow \text{direction}(g) \hfill \text{SAM: } v = g \text{; VaSSO, F-SAM, RSAM} \\
        &\quad T \leftarrow |w| + \eta \text{ if adaptive (ASAM) else } 1, \quad u \leftarrow T v \\
        &\quad \varepsilon \leftarrow \rho\, T u / (\lVert u \rVert + \epsilon_n)
            \text{ (USAM: } \rho\, T u) \hfill \lVert\cdot\rVert \text{ over all groups} \\
        &\quad b \leftarrow w, \quad w \leftarrow w + \varepsilon \hfill \texttt{first\_step()} \\
        &\quad g_p \leftarrow \nabla L(w) \hfill \text{pass 2} \\
        &\quad w \leftarrow b, \quad w \leftarrow B(w, d(g_p)) \hfill \texttt{second\_step()};
            d = g_p \text{ (GSAM, LookSAM: corrected)} \\
        &\textbf{return } w
        \end{aligned}

    A non-finite gradient in either pass skips the whole step on the device. The base
    optimizer (a ``torch.optim`` class) is built on this optimizer's param groups, so LR
    schedulers, per-group options and ``add_param_group`` act on both; for SGD, Adam and
    AdamW its update runs fused with the restore. Math and defaults: ``docs/variants.md``.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups, as for any
            ``torch.optim`` optimizer. Groups may set ``rho``, ``adaptive``, ``eta`` (named
            ``sam_rho``, ... where the base optimizer has an option of that name, such as
            Adadelta's ``rho``), ``perturb`` (False: SAM-ON's groups, left out of the ascent;
            ``sam_fused.norm_param_groups``) and any base-optimizer option.
        base_optimizer: the base optimizer *class* (default ``torch.optim.SGD``).
        rho: the radius of the perturbation (default 0.05).
        adaptive: ASAM: scale the perturbation by ``T = |w| + eta`` (default False).
        eta: ASAM's offset (default 0; 0.01 is the official ASAM's).
        variant: ``"sam"``, ``"usam"``, ``"vasso"``, ``"fsam"``, ``"gcsam"``, ``"rsam"``,
            ``"gsam"``, ``"looksam"`` or ``"interval"`` (the classes of the same names).
        norm_eps: added to the global norm after the square root (default 1e-12).
        backend: ``"auto"``, ``"triton"``, ``"foreach"``, ``"reference"``, ``"cpp"`` or ``"cuda"``; the
            environment variable ``SAM_FUSED_BACKEND`` replaces ``"auto"``.
        skip_nonfinite: skip steps whose gradients hold a NaN or infinity (default True).
        max_grad_norm: clip the descent gradient to this global norm (default None).
        variant_options: the variant's own options (``sam_fused.VARIANTS``).
        **base_kwargs: options of the base optimizer (``lr``, ``momentum``, ...).

    Example::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """

    # GradScaler.step(opt) hands over its scale instead of unscaling in place (README)
    _step_supports_amp_scaling = True
    variant, variant_options, norm_eps = arguments.Fixed(), arguments.Fixed(), arguments.Fixed()
    skip_nonfinite, max_grad_norm = arguments.Fixed(), arguments.MaxGradNorm()  # the latter settable

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
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
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, not {base_optimizer!r}"
            )
        if isinstance(params, Tensor):  # torch.optim's own message
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or dicts, but got "
                + torch.typename(params)
            )
        groups = [dict(g) if isinstance(g, dict) else g for g in params]
        base = base_optimizer(groups, **base_kwargs)  # the base optimizer checks its own options first
        found, resolved = arguments.check_arguments(
            variant, variant_options, rho, adaptive, eta, norm_eps, skip_nonfinite, max_grad_norm, backend
        )
        keys = options.group_keys(base.defaults)
        defaults = {
            **base.defaults,
            keys["rho"]: rho,
            keys["adaptive"]: bool(adaptive),
            keys["eta"]: float(eta),
            keys["perturb"]: True,  # SAM-ON's groups set False (norm_param_groups)
        }
        # torch.optim's own bookkeeping (hook registries) on the base optimizer's groups
        torch.optim.Optimizer.__setstate__(self, {"defaults": defaults, "param_groups": base.param_groups})
        self.base_optimizer = base
        fixed = (float(norm_eps), bool(skip_nonfinite), max_grad_norm and float(max_grad_norm), backend)
        self._engine = StepEngine(self, found, resolved, keys, *fixed)
        self.state = OptimizerState(self._engine)
        base.state = self.state.base_view()  # its lazy init sees its own keys only
        self._engine.adopt(self.param_groups, 0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a refused group changes nothing (the given dict is not modified)."""
        if self._engine.step.phase is not Phase.IDLE:
            raise RuntimeError(options.MID_STEP.format(what="add_param_group()"))
        group = dict(param_group)
        self.base_optimizer.add_param_group(group)  # appends to the shared list, after torch's checks
        try:
            self._engine.adopt([group], len(self.param_groups) - 1)
        except BaseException:
            self.param_groups.pop()
            raise

    @_eager
    @torch.no_grad()
    def noise_step(self) -> None:
        """RSAM: back the weights up and move them to ``w + delta`` for the first pass."""
        if not self.variant.perturbs_before_pass:
            raise RuntimeError(f"noise_step() belongs to RSAM; this optimizer runs {self.variant.name!r}")
        hooks.begin(self, (), {})
        hooks.profiled(self, "noise_step", self._engine.noise)

    @_eager
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> bool:
        """Perturb the weights: back them up and move them to ``w + eps``.

        Returns True when a second pass is due; LookSAM and interval SAM return False on
        their one-pass steps, where this call has already applied the whole update.
        ``grad_scaler``: the ``torch.amp.GradScaler`` that scaled these gradients (README).
        """
        args, kwargs = hooks.begin(self, (zero_grad,), {"grad_scaler": grad_scaler})
        engine = self._engine
        perturbed = hooks.profiled(
            self, "first_step", engine.first_step, kwargs.get("grad_scaler"), id(engine.owner)
        )
        if not perturbed:
            hooks.end(self, args, kwargs, one_pass=True)
        if args[0] if args else kwargs.get("zero_grad", zero_grad):
            self.zero_grad()
        return perturbed

    @_eager
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """Restore the weights exactly and apply the base update with the current gradients. A
        refusal changes nothing: fix the cause and call it again, or :meth:`abort_step`."""
        self._second_step(grad_scaler, None, (zero_grad,), {"grad_scaler": grad_scaler})
        if zero_grad:
            self.zero_grad()

    def _second_step(self, grad_scaler: Any, step_scale: tuple | None, args: tuple, kwargs: dict) -> None:
        engine = self._engine
        hooks.profiled(self, "second_step", engine.second_step, grad_scaler, id(engine.owner), step_scale)
        hooks.end(self, args, kwargs)

    @_eager
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """A whole SAM step, calling ``closure`` (forward + backward, returning the loss) once per
        pass; returns the first pass's loss. Without a closure it finishes what first_step() began."""
        engine, st = self._engine, self._engine.step
        if closure is None:  # after first_step(): finish the step (what GradScaler.step(opt) calls)
            if not (st.one_pass_done or st.phase is Phase.PERTURBED):
                if st.phase is Phase.IDLE and checkpoint.initialize_state(self):  # DCP's state creation
                    return None
                raise RuntimeError(options.no_closure())
            handed = amp.handed_scale(self, st.scaler)
            if not engine.finish_one_pass(handed):  # a one-pass step is already applied
                with torch.no_grad():
                    self._second_step(None, handed, (), {})
            return None
        if st.phase is not Phase.IDLE:
            raise RuntimeError(options.mid_step_closure())
        check = None
        if not st.closure_checked:  # the first call: loops that cannot work are refused here
            check_closure_loop()
            check = FirstClosureCheck(self.param_groups)
            if not check.needed:
                st.closure_checked, check = True, None
        args, kwargs = hooks.begin(self, (closure,), {})
        closure = torch.enable_grad()(args[0] if args else closure)
        st.in_closure_step = True
        try:
            loss = hooks.profiled(self, "step", self._closure_step, closure, check)
        except BaseException:
            engine.abort()  # an exception in either pass leaves the weights at w
            st.hooks_open = False  # the next step fires its pre-hooks again
            raise
        finally:
            st.in_closure_step = False
        hooks.end(self, args, kwargs)
        return loss

    step.hooked = True  # torch.optim must not wrap it: the hooks above fire once per SAM step

    def _closure_step(self, closure: Callable[[], Tensor], check: FirstClosureCheck | None) -> Tensor:
        if self.variant.perturbs_before_pass:
            self.noise_step()
        if check is None:
            loss = closure()
        else:  # gradients were left from before: the first pass must not add onto them
            loss = check.run(closure)
            self._engine.step.closure_checked = True
        if self.first_step(zero_grad=True):
            closure()
            self.second_step()
        return loss

    def abort_step(self) -> bool:
        """Abandon the step in flight (after ``noise_step()`` or ``first_step()``): the weights
        and all optimizer state go back to what they were before it. False when none is."""
        return self._engine.abort()

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Zero the gradients in place (the default: they stay views of the flat gradient
        buffer the next backward writes into), or set them to None (``set_to_none=True``)."""
        for bucket in self._engine.buckets:
            bucket.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's checkpoint of the base and variant state, plus sam_fused's own entry."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint (also a plain torch.optim one); a mismatch changes nothing."""
        checkpoint.load_state_dict(self, state_dict)

    @property
    def perturbed(self) -> bool:
        """Whether the weights sit at ``w + eps`` (between the passes): the second pass runs."""
        return self._engine.step.phase is Phase.PERTURBED

    @property
    def perturbs_this_step(self) -> bool | None:
        """Whether the coming step perturbs (False on LookSAM and interval SAM one-pass steps and
        outside a SAMWindow); None for AESAM, which decides from the step's gradient."""
        kind = self._engine.policy.kind(self._engine.step.step_index)
        return None if kind is StepKind.BY_NORM else kind is StepKind.SAM

    @property
    def skipped_steps(self) -> Tensor:
        """How many steps were skipped for non-finite gradients (a device tensor)."""
        return self._engine.status[S.SKIPPED]

    @property
    def engine(self) -> StepEngine:
        """The step engine behind this optimizer: what sam_fused's own helpers (checkpoints,
        hooks, CUDA graphs, the distributed and framework glue) build on. Not a stable API."""
        return self._engine

    @property
    def backends(self) -> list[str]:
        """The backend of each bucket (param group x dtype x layout), in order."""
        return [bucket.backend.name for bucket in self._engine.buckets]

    def __getstate__(self) -> dict[str, Any]:
        # not an LR scheduler's wrapper of the original's step(); and the base optimizer by its
        # class and defaults only: its own __setstate__ (Adam's, RMSprop's, ...) reads its state,
        # a view of this optimizer's, which a copy can show only once this object is restored
        state = {k: v for k, v in self.__dict__.items() if k != "step"}
        base = state["base_optimizer"]
        state["base_optimizer"] = (type(base), base.defaults)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        base = state.pop("base_optimizer")
        torch.optim.Optimizer.__setstate__(self, state)
        for group in self.param_groups:  # checkpoints of older versions: SAM's keys default
            for key in self._engine.keys.values():
                group.setdefault(key, self.defaults[key])
        if isinstance(base, tuple):  # rebuilt on the shared groups, then given its view of the state
            cls, defaults = base
            base = cls.__new__(cls)
            base.__setstate__({"defaults": defaults, "state": {}, "param_groups": self.param_groups})
            base.state = self.state.base_view()
        self.base_optimizer = base
