"""The per-parameter-loop SAM that most PyTorch code uses, as the benchmark's baseline.

It follows the structure of the popular davda54 ``SAM`` class (written here from its
description, not copied): a Python loop over parameters, one ``clone`` per parameter for
the backup, ``p.data = old_p`` to restore, then the base optimizer's own ``step()``.
The base optimizer is built with ``foreach=False`` by the benchmark, the per-tensor loop
whose published timings benchmarks/README.md quotes as "per-parameter loop (popular davda54 style)".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["PerParamSAM"]


class PerParamSAM(torch.optim.Optimizer):
    """SAM as a loop over parameters around any ``torch.optim`` base optimizer class."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        super().__init__(params, dict(rho=rho, **base_kwargs))
        # the base optimizer shares the param groups, so lr schedules act on both
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def _grad_norm(self) -> Tensor:
        """One L2 norm over every gradient: the norm of the per-tensor norms."""
        norms = [
            p.grad.norm(p=2) for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        return torch.norm(torch.stack(norms), p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Back every parameter up and move it to ``w + rho * g / (||g|| + 1e-12)``."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Put the backed-up tensors back, then let the base optimizer step."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()
