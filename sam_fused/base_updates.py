"""The base-optimizer updates sam_fused fuses with the weight restore: a registry.

The fused backends do not call ``torch.optim.SGD.step`` or ``torch.optim.AdamW.step``:
they apply the same update inside the kernel that restores the weights. Each entry of the
registry is a *spec* class: it reads a param group of the user's base optimizer
(``from_group``), names the per-parameter state it keeps under torch.optim's key names
(``state_names``) and holds the PyTorch math of the update: ``update_`` in place, over one
parameter or many in a flat buffer (the foreach backend), and ``reference_update``, the same
math on copies of one parameter's tensors, which the reference backend runs and every kernel
is tested against (a spec may define either; ``elementwise.py`` says how update counts
reach the math). A base optimizer class that is not in :data:`REGISTRY` runs its own ``step()``
after the restore (the generic path).

The update rules (PyTorch's exact semantics, math in float32 or wider):

SGD (``lr, momentum, dampening, weight_decay, nesterov, maximize``)::

    g = -g if maximize
    d = g + weight_decay * w
    buf = d                                        on the parameter's first update
    buf = momentum * buf + (1 - dampening) * d     afterwards
    d = d + momentum * buf if nesterov else buf    (only when momentum != 0)
    w = w - lr * d

Adam / AdamW (``lr, betas, eps, weight_decay, amsgrad, maximize``), step count ``t``::

    g = -g if maximize
    AdamW: w = w * (1 - lr * weight_decay)      Adam: g = g + weight_decay * w
    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    v_max = max(v_max, v) if amsgrad
    w = w - (lr / (1 - beta1^t)) * m / (sqrt(v or v_max) / sqrt(1 - beta2^t) + eps)

Lion (``sam_fused/lion.py``) registers itself the same way, from its own module.

**A spec drives the kernels.** Every fused backend runs one generic update over the
bucket's tensors; what it needs of a base is its ``kernel`` number (the element math in
``kernels/bases.py`` and ``csrc/sam_fused_math.h`` under the same number), up to six float32
``kernel_scalars()`` in a documented order, an ``kernel_options()`` bit mask, and for Adam
the float64 ``device_scalars()`` of its bias corrections. So a new fused base is a spec (with
its ``register`` call), its Triton math in ``kernels/bases.py`` and its C++ functor in
``csrc/sam_fused_math.h``; no backend changes. A backend whose library lacks a kernel
says so through its capabilities, and groups using it run the generic path there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .elementwise import add_product, add_quotient_, first_or_, is_zero, narrow, per_count, wide
from .options import check_tensor_scalar

__all__ = [
    "REGISTRY",
    "AdamSpec",
    "BaseSpec",
    "SGDSpec",
    "check_group_values",
    "lr_of",
    "register",
    "scalar_of",
    "spec_for",
]


class _NotFusable(Exception):
    pass


def scalar_of(value: Any, name: str) -> float:
    """A hyperparameter as a Python float, without a device sync.

    A CPU tensor is read directly; a tensor on an accelerator would need a sync to read,
    so such groups take the generic path (the base optimizer handles it).
    """
    if isinstance(value, Tensor):
        if value.device.type != "cpu" or value.numel() != 1:
            raise _NotFusable(f"{name} is a tensor on {value.device}")
        return float(value.item())
    return float(value)


def lr_of(value: Any) -> float | Tensor:
    """The learning rate: a float, or a one-element tensor kept as a 0-d view of itself, so
    that the fused kernels read its current value on the device (no sync, and a captured
    CUDA graph sees what a scheduler writes into it)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise _NotFusable("lr is a tensor with several values")
        return value.reshape(())
    return float(value)


class BaseSpec:
    """A fused base update read from one param group (one frozen dataclass per update)."""

    name: ClassVar[str]
    kernel: ClassVar[int]  # the number of its element math in kernels/bases.py and sam_fused_math.h
    names: tuple[str, ...]  # state_names(), set when the spec is made
    # True: the update count is exposed as torch.optim's state["step"] (Adam's bias correction)
    counts_steps: ClassVar[bool] = False
    lr: float | Tensor

    def state_names(self) -> tuple[str, ...]:
        """The per-parameter state tensors the update keeps, under torch.optim's names."""
        return self.names

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", self.names_for_group(vars(self)))

    @classmethod
    def names_for_group(cls, group: dict[str, Any]) -> tuple[str, ...]:
        """The state names for a param group (also where the group cannot be fused)."""
        raise NotImplementedError

    def reference_update(
        self, w: Tensor, d: Tensor, state: dict[str, Tensor], step: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One parameter's update: new ``w`` and new state, from ``d`` at update count ``step``
        (the number of earlier updates; the state holds zeros where it is fresh).

        A spec defines this or :meth:`update_`; this default runs ``update_`` on copies."""
        if type(self).update_ is BaseSpec.update_:
            raise NotImplementedError(f"{type(self).__name__} defines neither reference_update nor update_")
        w, state = w.clone(), {name: t.clone() for name, t in state.items()}
        self.update_(w, d, state, step)
        return w, state

    def update_(self, w: Tensor, d: Tensor, state: dict[str, Tensor], step: Any) -> None:
        """The update in place: ``w`` and the tensors of ``state`` are overwritten (``d`` is
        only read). ``w``, ``d`` and the state may hold one parameter or many laid out in a
        flat buffer; ``step`` is a number, a tensor, or a :class:`~sam_fused.elementwise.PerTensor`
        (``elementwise.py``). This default runs :meth:`reference_update` and copies back."""
        if type(self).reference_update is BaseSpec.reference_update:
            raise NotImplementedError(f"{type(self).__name__} defines neither reference_update nor update_")
        counts = per_count(step, lambda c: torch.as_tensor(c, dtype=torch.float32, device=w.device))
        w_new, new = self.reference_update(w, d, state, counts)
        w.copy_(w_new)
        for name, value in new.items():
            state[name].copy_(value)

    def kernel_scalars(self) -> tuple[float, ...]:
        """The float32 scalars of the kernels' element math (at most six, in its order)."""
        raise NotImplementedError

    def kernel_options(self) -> int:
        """The kernels' option bits (which branches of the element math run)."""
        raise NotImplementedError

    def device_scalars(self) -> tuple[float, ...]:
        """float64 scalars the kernels read from the device (none but Adam's betas)."""
        return ()


@dataclass(frozen=True)
class SGDSpec(BaseSpec):
    lr: float | Tensor  # a one-element tensor stays one (LR schedulers fill it in place)
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    name: ClassVar[str] = "sgd"
    kernel: ClassVar[int] = 0  # SGD in kernels/bases.py and csrc/sam_fused_math.h

    @classmethod
    def from_group(cls, base: type, group: dict[str, Any]) -> SGDSpec:
        return cls(
            lr=lr_of(group["lr"]),
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group.get("maximize", False)),
        )

    @classmethod
    def names_for_group(cls, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def kernel_scalars(self) -> tuple[float, ...]:
        return (self.momentum, 1.0 - self.dampening, self.weight_decay)

    def kernel_options(self) -> int:
        # bit 0: weight decay, 1: momentum, 2: nesterov, 3: maximize
        has_momentum = self.momentum != 0
        return (
            (self.weight_decay != 0)
            | has_momentum << 1
            | (self.nesterov and has_momentum) << 2
            | self.maximize << 3
        )

    def update_(self, w, d, state, step):
        # the rounding of the formulas above, product by product (no fused multiply-add):
        # the compiled SGD kernels give the same bits on the CPU
        if self.maximize:
            d = -d
        if self.weight_decay != 0:
            d = add_product(d, w, self.weight_decay)  # d + weight_decay * w
        if self.momentum != 0:
            buf = state["momentum_buffer"]
            damped = d if self.dampening == 0 else d * (1 - self.dampening)  # (1 - 0) * d is d
            # buf = d on the first update, momentum * buf + (1 - dampening) * d afterwards
            later = lambda b: add_product(damped, b, self.momentum, out=b)
            first_or_(per_count(step, is_zero), buf, d, later)
            d = add_product(d, buf, self.momentum) if self.nesterov else buf
        add_product(w, d, -self.lr, out=w)  # w - lr * d


@dataclass(frozen=True)
class AdamSpec(BaseSpec):
    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled: bool  # True for AdamW: decay multiplies w instead of joining g
    name: ClassVar[str] = "adam"
    kernel: ClassVar[int] = 1  # ADAM in kernels/bases.py and csrc/sam_fused_math.h
    counts_steps: ClassVar[bool] = True

    @classmethod
    def from_group(cls, base: type, group: dict[str, Any]) -> AdamSpec:
        beta1, beta2 = group["betas"]
        return cls(
            lr=lr_of(group["lr"]),
            beta1=scalar_of(beta1, "beta1"),
            beta2=scalar_of(beta2, "beta2"),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            amsgrad=bool(group.get("amsgrad", False)),
            maximize=bool(group.get("maximize", False)),
            decoupled=base is torch.optim.AdamW or bool(group.get("decoupled_weight_decay", False)),
        )

    @classmethod
    def names_for_group(cls, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad", False) else ())

    def kernel_scalars(self) -> tuple[float, ...]:
        # 1 - lr wd in double on the host, as torch forms it (the kernels form it from a
        # device lr themselves)
        decay = 1.0 - float(self.lr) * self.weight_decay if not isinstance(self.lr, Tensor) else 0.0
        return (1.0 - self.beta1, self.beta2, 1.0 - self.beta2, self.eps, self.weight_decay, decay)

    def kernel_options(self) -> int:
        # bit 0: weight decay, 1: decoupled (AdamW), 2: amsgrad, 3: maximize
        return (self.weight_decay != 0) | self.decoupled << 1 | self.amsgrad << 2 | self.maximize << 3

    def device_scalars(self) -> tuple[float, ...]:
        return (self.beta1, self.beta2)  # the bias corrections 1 - beta^t, formed in float64

    def bias_corrections(self, step: Any) -> tuple[Any, Any]:
        """``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` at update ``t = step + 1``, in float64."""
        t = wide(step) + 1
        return 1 - self.beta1**t, (1 - self.beta2**t) ** 0.5

    def update_(self, w, d, state, step):
        # torch.optim's single-tensor Adam, operation by operation
        if self.maximize:
            d = -d
        if self.weight_decay != 0:
            if self.decoupled:
                w.mul_(1 - self.lr * self.weight_decay)
            else:
                d = add_product(d, w, self.weight_decay)  # d + weight_decay * w
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(d, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(d, d, value=1 - self.beta2)
        if self.amsgrad:
            v = torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        bias_correction1, bias_correction2_sqrt = per_count(step, self.bias_corrections)
        step_size = narrow(self.lr / bias_correction1, w.dtype)
        denom = v.sqrt().div_(narrow(bias_correction2_sqrt, w.dtype)).add_(self.eps)
        add_quotient_(w, m, denom, -step_size)  # w - step_size * m / denom


# optimizer classes whose update sam_fused runs itself (exact classes: a subclass may
# override step(), so it runs its own)
REGISTRY: dict[type, type[BaseSpec]] = {
    torch.optim.SGD: SGDSpec,
    torch.optim.Adam: AdamSpec,
    torch.optim.AdamW: AdamSpec,
}


def register(optimizer: type, spec: type[BaseSpec]) -> None:
    """Fuse ``optimizer``'s update (an exact class) with ``spec`` (sam_fused.Lion registers here)."""
    REGISTRY[optimizer] = spec


def spec_for(base: type, group: dict[str, Any]) -> tuple[BaseSpec | None, str | None]:
    """The fused update for ``group`` of an optimizer of class ``base``, and why not.

    Returns ``(spec, None)`` when the update can be fused, ``(None, reason)`` when the
    base optimizer's own ``step()`` must run (an unknown class, a differentiable group, a
    hyperparameter that cannot be read without a device sync).
    """
    spec_class = REGISTRY.get(base)
    if spec_class is None:
        fused = ", ".join(sorted({cls.__name__ for cls in REGISTRY}))
        return None, f"{base.__name__} is not one of the updates sam_fused fuses ({fused})"
    if group.get("differentiable", False):
        return None, "the group is differentiable"
    try:
        return spec_class.from_group(base, group), None
    except _NotFusable as exc:
        return None, str(exc)


_NOT_VALUES = ("params", "param_names")
_PLAIN = frozenset({float, int, bool, str, type(None)})  # nothing to check (the common case, fast)


def check_group_values(group: dict[str, Any], index: int, device: torch.device | None) -> None:
    """A group's hyperparameter tensors each hold one value, on the parameters' device or the CPU.

    torch.optim's constructors hold ``lr`` and each of Adam's ``betas`` to that rule; a group
    edited later (a schedule, or a user between first_step() and second_step()) is held to it
    at every step, before anything changes: otherwise the update (fused, or the base
    optimizer's own step()) would fail halfway through, with the weights restored and part of
    the state moved. Any base optimizer's keys are checked, tuples (``betas``) item by item.
    """
    for key, value in group.items():
        if type(value) in _PLAIN:
            continue
        if isinstance(value, Tensor):
            check_tensor_scalar(value, key, index, device)
        elif isinstance(value, (tuple, list)) and key not in _NOT_VALUES:
            for i, item in enumerate(value):
                if isinstance(item, Tensor):
                    check_tensor_scalar(item, f"param_groups[{index}][{key!r}][{i}]", None, device)
