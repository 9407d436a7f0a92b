"""What every backend operation of one step needs besides the bucket: :class:`StepContext`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import status as S
from .variants import Variant

__all__ = ["StepContext"]


@dataclass(frozen=True)
class StepContext:
    """The step's variant and switches, and the device status vector its kernels share.

    ``check``: skip the step on non-finite gradients. ``unscale``: gradients hold
    ``loss_scale * g`` (GradScaler) and every read multiplies by ``status[INV_SCALE1/2]``.
    ``clip``: the descent gradient is multiplied by ``status[CLIP]`` (``max_grad_norm``).
    """

    variant: Variant
    options: Mapping[str, Any]
    norm_eps: float
    check: bool
    status: Tensor
    unscale: bool = False
    clip: bool = False
    # derived once (the kernels take them on every launch): the variant's two ascent scalars
    # and the descent's alpha (GSAM, LookSAM)
    scalars: tuple[float, float] = field(init=False, repr=False)
    alpha: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scalars", self.variant.kernel_scalars(self.options))
        object.__setattr__(self, "alpha", float(self.options.get("alpha", 0.0)))

    def unscaled(self, g: Tensor, index: int) -> Tensor:
        """``g`` (already in the math dtype) divided by its pass's loss scale."""
        return g * self.status[index].to(g.dtype) if self.unscale else g

    def skip(self, device: torch.device) -> Tensor:
        """Whether this step is skipped, as a 0-d bool tensor (no host sync)."""
        if not self.check:
            return torch.zeros((), dtype=torch.bool, device=device)
        return (self.status[S.BAD1] + self.status[S.BAD2] > 0).to(device)
