"""Which base-optimizer updates sam_fused fuses with the weight restore, and their settings.

The fused backends do not call ``torch.optim.SGD.step`` or ``torch.optim.AdamW.step``:
they apply the same update inside the kernel that restores the weights. This module reads
a param group of the user's base optimizer and says whether that is possible and with
which numbers; anything it does not recognise falls back to "restore, then the base
optimizer's own ``step()``".

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["AdamSpec", "BaseSpec", "SGDSpec", "base_spec_for", "state_names"]


@dataclass(frozen=True)
class SGDSpec:
    lr: float | Tensor  # a one-element tensor stays one (LR schedulers fill it in place)
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool


@dataclass(frozen=True)
class AdamSpec:
    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled: bool  # True for AdamW: decay multiplies w instead of joining g


BaseSpec = SGDSpec | AdamSpec | None  # None: restore, then the base optimizer's step()


def _scalar(value: Any, name: str) -> float:
    """A hyperparameter as a Python float, without a device sync.

    A CPU tensor is read directly; a tensor on an accelerator would need a sync to read,
    so such groups take the generic path (the base optimizer handles it).
    """
    if isinstance(value, Tensor):
        if value.device.type != "cpu" or value.numel() != 1:
            raise _NotFusable(f"{name} is a tensor on {value.device}")
        return float(value.item())
    return float(value)


def _lr(value: Any) -> float | Tensor:
    """The learning rate: a float, or a one-element tensor kept as a 0-d view of itself, so
    that the fused kernels read its current value on the device (no sync, and a captured
    CUDA graph sees what a scheduler writes into it)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise _NotFusable("lr is a tensor with several values")
        return value.reshape(())
    return float(value)


class _NotFusable(Exception):
    pass


def base_spec_for(base: torch.optim.Optimizer, group: dict[str, Any]) -> BaseSpec:
    """The fused update for ``group`` of ``base``, or None when it must run ``base.step()``."""
    kind = type(base)
    if group.get("differentiable", False):
        return None
    try:
        if kind is torch.optim.SGD:
            return SGDSpec(
                lr=_lr(group["lr"]),
                momentum=float(group["momentum"]),
                dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]),
                nesterov=bool(group["nesterov"]),
                maximize=bool(group.get("maximize", False)),
            )
        if kind is torch.optim.AdamW or kind is torch.optim.Adam:
            beta1, beta2 = group["betas"]
            return AdamSpec(
                lr=_lr(group["lr"]),
                beta1=_scalar(beta1, "beta1"),
                beta2=_scalar(beta2, "beta2"),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                amsgrad=bool(group.get("amsgrad", False)),
                maximize=bool(group.get("maximize", False)),
                decoupled=kind is torch.optim.AdamW or bool(group.get("decoupled_weight_decay", False)),
            )
    except _NotFusable:
        return None
    return None


def state_names(spec: BaseSpec) -> tuple[str, ...]:
    """The per-parameter state tensors an update keeps, under torch.optim's key names."""
    if isinstance(spec, SGDSpec):
        return ("momentum_buffer",) if spec.momentum != 0 else ()
    if isinstance(spec, AdamSpec):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if spec.amsgrad else ())
    return ()
