"""Step-size and radius schedules, including those of the seed paper.

Khanh, Luong, Mordukhovich & Tran, "Fundamental Convergence Analysis of Sharpness-Aware
Minimization" (NeurIPS 2024) prove convergence of SAM-type methods under *diminishing*
step sizes (sum t_k = inf, t_k -> 0) and radii that shrink fast enough relative to the
steps, and show that a constant step can stall. Their experiments use, per epoch ``e``
and base step size ``t0`` (0.1 in the paper):

=============  ===============================================
Constant       ``t0``
Diminish 1     ``t0 / (e + 1)``
Diminish 2     ``t0 / (e + 1) ** 0.5001``
Diminish 3     ``t0 / (k ln k)`` with ``k = 3 + floor(e / 5)``
=============  ===============================================

:class:`SeedPaperLR` is an ordinary ``torch.optim.lr_scheduler.LRScheduler``: it works on a
SAM optimizer or any other, saves and loads with ``state_dict``, and chains with other
schedulers. Call ``step()`` once per epoch for the paper's setting, or once per iteration
with ``steps_per_epoch`` set (the epoch is then ``iteration // steps_per_epoch``), or once
per iteration with ``steps_per_epoch=1`` to apply the formulas per step.

The radius schedules set every group's ``rho`` (a Python float read by the kernels as an
argument, so changing it costs no recompilation and no host sync):

* :class:`ConstantRho`: ``rho_k = rho0`` (here for symmetry; it restores rho0 on step 0);
* :class:`PolynomialRho`: ``rho_k = rho0 / (k + 1) ** p`` (the "almost constant" radii
  the paper allows for small ``p``);
* :class:`LrProportionalRho`: GSAM's
  ``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from .options import rho_key
from .window import SAMWindow

__all__ = [
    "SEED_PAPER_SCHEDULES",
    "ConstantRho",
    "LrProportionalRho",
    "PolynomialRho",
    "RhoScheduler",
    "SAMWindow",
    "SeedPaperLR",
    "seed_paper_factor",
]

SEED_PAPER_SCHEDULES = ("constant", "diminish1", "diminish2", "diminish3")


def seed_paper_factor(schedule: str, epoch: int) -> float:
    """The multiplier of the base step size at ``epoch`` (0-based) for a paper schedule."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if schedule == "constant":
        return 1.0
    if schedule == "diminish1":
        return 1.0 / (epoch + 1)
    if schedule == "diminish2":
        return 1.0 / (epoch + 1) ** 0.5001
    if schedule == "diminish3":
        k = 3 + epoch // 5
        return 1.0 / (k * math.log(k))
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SEED_PAPER_SCHEDULES}")


class SeedPaperLR(LRScheduler):
    """The seed paper's step sizes: ``lr = base_lr * factor(epoch)``.

    Args:
        optimizer: the optimizer whose groups' ``lr`` it sets (their initial lr is the base).
        schedule: ``"constant"``, ``"diminish1"``, ``"diminish2"`` or ``"diminish3"``.
        steps_per_epoch: how many ``step()`` calls make one epoch (default 1: call it once
            per epoch, as the paper does).
        last_epoch: as for every ``LRScheduler`` (-1 to start fresh).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: str = "diminish1",
        steps_per_epoch: int = 1,
        last_epoch: int = -1,
    ) -> None:
        seed_paper_factor(schedule, 0)  # validates the name
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.schedule = schedule
        self.steps_per_epoch = int(steps_per_epoch)
        super().__init__(optimizer, last_epoch)

    def _factor(self) -> float:
        return seed_paper_factor(self.schedule, max(self.last_epoch, 0) // self.steps_per_epoch)

    def get_lr(self) -> list[float]:
        return [base * self._factor() for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


class RhoScheduler:
    """Sets every param group's ``rho`` from the step count; ``step()`` after each step.

    ``state_dict()``/``load_state_dict()`` save and restore the counter, like an LR
    scheduler's. Groups that should keep their own radius can be excluded by index.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, exclude: tuple[int, ...] = ()) -> None:
        self.key = rho_key(optimizer)  # "sam_rho" where the base optimizer has a rho of its own
        for i, group in enumerate(optimizer.param_groups):
            if self.key not in group:
                raise ValueError(
                    f"param group {i} has no {self.key!r}: a radius schedule needs a SAM optimizer"
                )
        self.optimizer = optimizer
        self.exclude = tuple(exclude)
        self.base_rhos = [float(group[self.key]) for group in optimizer.param_groups]  # read once
        self.last_step = 0
        self._apply()

    def rho(self, index: int, base_rho: float, group: dict[str, Any]) -> float:
        raise NotImplementedError

    def _apply(self) -> None:
        for i, (group, base) in enumerate(zip(self.optimizer.param_groups, self.base_rhos, strict=True)):
            if i not in self.exclude:
                value = float(self.rho(i, base, group))
                if not 0 <= value < math.inf:
                    raise ValueError(f"{type(self).__name__} produced rho={value} for group {i}")
                if isinstance(group[self.key], torch.Tensor):
                    group[self.key].fill_(value)  # a device-resident rho (CUDA graphs) keeps its storage
                else:
                    group[self.key] = value

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_rho(self) -> list[float]:
        return [float(group[self.key]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._apply()


class ConstantRho(RhoScheduler):
    """``rho_k = rho0`` for every step."""

    def rho(self, index: int, base_rho: float, group: dict[str, Any]) -> float:
        return base_rho


class PolynomialRho(RhoScheduler):
    """``rho_k = rho0 / (k + 1) ** power``, ``k`` counting ``step()`` calls from 0."""

    def __init__(self, optimizer: torch.optim.Optimizer, power: float = 0.5, **kwargs: Any) -> None:
        if power < 0:
            raise ValueError(f"power must be >= 0, got {power}")
        self.power = float(power)
        super().__init__(optimizer, **kwargs)

    def rho(self, index: int, base_rho: float, group: dict[str, Any]) -> float:
        return base_rho / (self.last_step + 1) ** self.power


class LrProportionalRho(RhoScheduler):
    """GSAM's radius, following the learning rate linearly between two end points.

    ``rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)``, with
    ``lr_t`` read from the group when ``step()`` runs (so step the LR scheduler first).
    ``rho_max`` defaults to each group's initial rho and ``lr_max`` to its initial lr.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rho_min: float = 0.0,
        lr_min: float = 0.0,
        rho_max: float | None = None,
        lr_max: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.rho_min = float(rho_min)
        self.lr_min = float(lr_min)
        self.rho_max = rho_max
        self.lr_max = [float(lr_max if lr_max is not None else g["lr"]) for g in optimizer.param_groups]
        for i, top in enumerate(self.lr_max):
            if top <= self.lr_min:
                raise ValueError(f"group {i}: lr_max ({top}) must exceed lr_min ({self.lr_min})")
        super().__init__(optimizer, **kwargs)

    def rho(self, index: int, base_rho: float, group: dict[str, Any]) -> float:
        top = base_rho if self.rho_max is None else float(self.rho_max)
        lr = float(group["lr"])
        fraction = (lr - self.lr_min) / (self.lr_max[index] - self.lr_min)
        return self.rho_min + (top - self.rho_min) * fraction
