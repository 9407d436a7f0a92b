"""MSAM's rules: the hyperparameters of one param group, and the math in plain PyTorch.

Momentum-SAM (Becker, Altrock & Risse 2024, arXiv 2401.12033; official code
MarlonBecker/MSAM, ``optimizer/msam.py`` and ``optimizer/adamW_msam.py``) takes the
gradient at ``w~ = w - c * v`` with ``c = rho / (||v|| + 1e-12)`` and ``v`` the base
optimizer's first moment, so a step costs one forward/backward. Between steps the
parameters hold ``w~``; the optimizer keeps ``w`` itself in a flat buffer (role
``unperturbed_weight``), so that un-perturbing is a copy, exact in every dtype.

One step over the parameters with a gradient ``g`` (taken at ``p = w~``):

* SGD: ``v' = mu * v + g + wd * p`` (the decay at ``w~``, as the official code adds it to
  the gradient before un-perturbing), ``w' = w - lr * v'``.
* AdamW: ``m' = b1 * m + (1 - b1) * g``, ``s' = b2 * s + (1 - b2) * g^2``,
  ``w' = (w - lr / bc1 * m' / (sqrt(s') / sqrt(bc2) + eps)) * (1 - lr * wd)`` (the decay
  after the Adam step, on ``w``, as the official code applies it), ``bc_k = 1 - b_k^t``.
* ``c' = rho / (||v'|| + 1e-12)``, one global norm over every parameter with a gradient
  in every group (``rho`` per group); ``p <- w' - c' * v'``.

A parameter whose update count is 0 has no ``w`` stored yet: its parameter is ``w`` (its
first moment is zero, so it was never perturbed). Every function here is the readable
specification the foreach backend and the Triton kernels are tested against; the reference
backend (``msam_backends.py``) runs them parameter by parameter.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .backends.reference import math_dtype, sum_of_squares

if TYPE_CHECKING:
    from .tables import TableRun

__all__ = [
    "BAD",
    "NORM_EPS",
    "SUMSQ",
    "WEIGHT",
    "MSAMHyper",
    "apply_tables",
    "first_moment",
    "library_scalars",
    "perturbed",
    "second_moment",
    "state_roles",
    "stats_arguments",
    "updated_weight",
]

SUMSQ, BAD = 0, 1  # the entries of MSAM's status tensor (float64, on the device)
NORM_EPS = 1e-12  # added after the square root, as the official code does
WEIGHT = "unperturbed_weight"  # the role of the stored w


@dataclass(frozen=True)
class MSAMHyper:
    """One param group's values for one step (``base``: ``"sgd"`` or ``"adamw"``)."""

    base: str
    lr: float
    rho: float
    weight_decay: float
    momentum: float = 0.0
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0

    @staticmethod
    def of(base: str, group: dict[str, Any], index: int) -> MSAMHyper:
        """Read and check group ``index``; a refusal raises before anything changes."""
        where = f"param_groups[{index}]"
        values = {name: group[name] for name in ("lr", "rho", "weight_decay")}
        if base == "sgd":
            values["momentum"] = group["momentum"]
            if group.get("nesterov", False) or group.get("dampening", 0) != 0:
                raise ValueError(
                    f"{where} sets nesterov or dampening: MSAM's step is heavy-ball momentum "
                    "v <- mu v + g + wd w~ (the official code's); set nesterov=False, dampening=0"
                )
        else:
            beta1, beta2 = group["betas"]
            values.update(beta1=beta1, beta2=beta2, eps=group["eps"])
            if group.get("amsgrad", False):
                raise ValueError(f"{where} sets amsgrad=True: MSAM's AdamW has no AMSGrad; set amsgrad=False")
        if group.get("maximize", False):
            raise ValueError(f"{where} sets maximize=True: MSAM minimizes; negate the loss instead")
        for name, value in values.items():
            if isinstance(value, Tensor):
                raise TypeError(f"{where}[{name!r}] is a tensor; MSAM takes Python numbers: use float(...)")
            if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)):
                raise ValueError(f"{where}[{name!r}] must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"{where}[{name!r}] must be >= 0, got {value!r}")
        for name in ("momentum", "beta1", "beta2"):
            if values.get(name, 0.0) >= 1:
                raise ValueError(f"{where}: {name} must be < 1, got {values[name]!r}")
        return MSAMHyper(base, **{k: float(v) for k, v in values.items()})


def state_roles(base: str) -> tuple[str, ...]:
    """The base's state, in the kernels' ``s0, s1`` order."""
    return ("momentum_buffer",) if base == "sgd" else ("exp_avg", "exp_avg_sq")


def first_moment(h: MSAMHyper, g: Tensor, p: Tensor, s0: Tensor) -> Tensor:
    """``v'`` (SGD: ``mu v + g + wd p``) or ``m'`` (AdamW: ``b1 m + (1 - b1) g``), the
    direction of the next perturbation; every argument in the math dtype."""
    if h.base == "sgd":
        d = g + h.weight_decay * p if h.weight_decay != 0 else g
        return h.momentum * s0 + d
    return h.beta1 * s0 + (1.0 - h.beta1) * g


def second_moment(h: MSAMHyper, g: Tensor, s1: Tensor) -> Tensor:
    """AdamW's ``s' = b2 s + (1 - b2) g^2``."""
    return h.beta2 * s1 + (1.0 - h.beta2) * (g * g)


def updated_weight(h: MSAMHyper, w: Tensor, v: Tensor, s1: Tensor | None, count: Tensor) -> Tensor:
    """``w'`` from the unperturbed ``w`` and the new moments; ``count``: the parameter's
    updates so far (AdamW's bias corrections use ``t = count + 1``, in float64)."""
    if h.base == "sgd":
        return w - h.lr * v
    t = count.to(torch.float64) + 1
    bias_correction1 = 1 - torch.pow(torch.tensor(h.beta1, dtype=torch.float64, device=t.device), t)
    bias_correction2 = 1 - torch.pow(torch.tensor(h.beta2, dtype=torch.float64, device=t.device), t)
    step_size = (h.lr / bias_correction1).to(w.dtype)
    denom = s1.sqrt() / bias_correction2.sqrt().to(w.dtype) + h.eps
    return (w - step_size * (v / denom)) * (1 - h.lr * h.weight_decay)


def perturbed(w: Tensor, v: Tensor, scale: Tensor) -> Tensor:
    """``w~ = w - c v`` (``scale`` holds ``c`` in float64). Every backend computes it from
    the *stored* (rounded) ``w`` and ``v``, in the step and whenever it puts ``w~`` back, so
    both give the same bits."""
    return w - scale.to(w.dtype) * v


def apply_tables(run: TableRun, base: str) -> dict[str, Tensor | None]:
    """The address tables the fused apply reads and writes: the parameters, gradients, stored
    ``w`` and the base's state (``s1`` None for SGD)."""
    roles = state_roles(base)
    return {
        "param": run.addresses("param"),
        "grad": run.addresses("grad"),
        "weight": run.addresses(WEIGHT),
        "s0": run.addresses(roles[0]),
        "s1": run.addresses(roles[1]) if len(roles) > 1 else None,
    }


def stats_arguments(run: TableRun, h: MSAMHyper) -> dict[str, Any]:
    """The C++ libraries' ``msam_stats`` roles and moment coefficients ``v' = a s0 + ...``
    (SGD: ``a = mu``, ``b = wd``; AdamW: ``a = b1``, ``b = 1 - b1``)."""
    adam = h.base == "adamw"
    return {
        "grad": run.addresses("grad"),
        "param": run.addresses("param"),
        "s0": run.addresses(state_roles(h.base)[0]),
        "adam": adam,
        "a": h.beta1 if adam else h.momentum,
        "b": 1.0 - h.beta1 if adam else h.weight_decay,
    }


def library_scalars(h: MSAMHyper) -> list[float]:
    """The C++ libraries' ``scalars`` of ``msam_apply``: SGD ``(mu, wd, lr)``; AdamW
    ``(b1, 1 - b1, b2, 1 - b2, eps, lr, 1 - lr wd)``."""
    if h.base == "sgd":
        return [h.momentum, h.weight_decay, h.lr]
    return [h.beta1, 1.0 - h.beta1, h.beta2, 1.0 - h.beta2, h.eps, h.lr, 1.0 - h.lr * h.weight_decay]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return math_dtype(dtype)


def squares(v: Tensor) -> Tensor:
    """``sum(v^2)`` in float64, in an order fixed by the length alone."""
    return sum_of_squares(v.to(torch.float64))
