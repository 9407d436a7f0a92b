r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): an optimizer
of its own, and a base update SAM fuses.

The update of the authors' reference code (``lion_pytorch.py`` of google/automl), with
decoupled weight decay, for a gradient :math:`g` and momentum :math:`m` (zeros at first):

.. math::
    \begin{aligned}
    w &\leftarrow w\,(1 - \eta\,\lambda) \\
    c &\leftarrow \beta_1 m + (1 - \beta_1)\, g \\
    w &\leftarrow w - \eta\,\mathrm{sign}(c) \\
    m &\leftarrow \beta_2 m + (1 - \beta_2)\, g
    \end{aligned}

with the paper's defaults :math:`\eta = 10^{-4}`, :math:`\beta = (0.9, 0.99)`,
:math:`\lambda = 0` (``sign(0) = 0``). :class:`Lion` is a ``torch.optim.Optimizer``;
``SAM(params, sam_fused.Lion, ...)`` runs the same update fused with the restore on every
backend (``kernels/bases.py``, ``csrc/sam_fused_math.h``), with :func:`lion_update` as the
reference every kernel is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base_updates import BaseSpec, lr_of, register, scalar_of

__all__ = ["Lion", "LionSpec", "lion_update"]


def lion_update(
    w: Tensor, g: Tensor, m: Tensor, lr: float | Tensor, beta1: float, beta2: float, weight_decay: float
) -> tuple[Tensor, Tensor]:
    """One Lion update of ``w`` (out of place, in ``w``'s dtype): the new weight and momentum."""
    if weight_decay != 0:
        w = w * (1 - lr * weight_decay)
    update = m * beta1 + g * (1 - beta1)
    return w - lr * torch.sign(update), m * beta2 + g * (1 - beta2)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023), the authors' update with decoupled weight decay.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        lr: the step size (default 1e-4; the paper advises 3-10x smaller than AdamW's).
        betas: the interpolation and momentum coefficients (default (0.9, 0.99)).
        weight_decay: decoupled weight decay (default 0; the paper advises 3-10x AdamW's).
        maximize: ascend instead of descend (default False).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        if not (isinstance(lr, Tensor) or lr >= 0.0):
            raise ValueError(f"Invalid learning rate: {lr}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                g = -p.grad if group["maximize"] else p.grad
                w, m = lion_update(p, g, state["exp_avg"], group["lr"], beta1, beta2, group["weight_decay"])
                p.copy_(w)
                state["exp_avg"].copy_(m)
        return loss


@dataclass(frozen=True)
class LionSpec(BaseSpec):
    """Lion as a fused base update: state ``exp_avg``; option bit 0: weight decay, bit 1:
    maximize."""

    lr: float | Tensor
    beta1: float
    beta2: float
    weight_decay: float
    maximize: bool
    name: ClassVar[str] = "lion"
    kernel: ClassVar[int] = 2  # LION in kernels/bases.py and csrc/sam_fused_math.h

    @classmethod
    def from_group(cls, base: type, group: dict[str, Any]) -> LionSpec:
        beta1, beta2 = group["betas"]
        return cls(
            lr=lr_of(group["lr"]),
            beta1=scalar_of(beta1, "beta1"),
            beta2=scalar_of(beta2, "beta2"),
            weight_decay=float(group["weight_decay"]),
            maximize=bool(group.get("maximize", False)),
        )

    @classmethod
    def names_for_group(cls, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",)

    def kernel_scalars(self) -> tuple[float, ...]:
        # 1 - beta and 1 - lr wd in double on the host, as the reference's Python floats are
        decay = 1.0 - float(self.lr) * self.weight_decay if not isinstance(self.lr, Tensor) else 0.0
        return (self.beta1, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2, self.weight_decay, decay)

    def kernel_options(self) -> int:
        return (self.weight_decay != 0) | self.maximize << 1

    def reference_update(self, w, d, state, step):
        if self.maximize:
            d = -d
        w_new, m = lion_update(w, d, state["exp_avg"], self.lr, self.beta1, self.beta2, self.weight_decay)
        return w_new, {"exp_avg": m}


register(Lion, LionSpec)
