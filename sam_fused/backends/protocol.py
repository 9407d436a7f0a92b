"""What a backend is: the operations the step engine calls, and what it can run.

Every backend implements every operation of :class:`Backend` for the buckets it accepts,
and says through its :class:`Capabilities` which buckets those are; ``choose_backend``
(``backends/__init__.py``) asks the capabilities, so nothing is refused halfway through a
step. The reference backend (``reference.py``) is the specification of each operation.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..base_updates import BaseSpec
from ..context import StepContext
from ..layout import Bucket, Plan
from ..variants import Ascent, Descent, Variant

__all__ = ["Backend", "Capabilities"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend runs; None means "any".

    ``strided``: whether it also runs tensors whose memory has gaps (the reference does,
    parameter by parameter; the multi-tensor kernels walk each tensor as ``numel``
    consecutive elements from its address, so they need dense tensors).
    ``updates``: the base updates (``BaseSpec.name``) it fuses; groups of another base
    optimizer take the generic path (restore, then the base optimizer's own ``step()``).
    """

    device_types: Set[str] | None
    dtypes: Set[torch.dtype] | None
    ascents: Set[Ascent]
    descents: Set[Descent]
    updates: Set[str] | None
    strided: bool = False

    def refusal(self, device: torch.device, dtype: torch.dtype, variant: Variant) -> str | None:
        """Why a bucket of ``dtype`` on ``device`` running ``variant`` is not for this backend."""
        if self.device_types is not None and device.type not in self.device_types:
            kinds = "/".join(sorted(self.device_types)).upper()
            return f"it runs {kinds} tensors, not {device.type.upper()} ones"
        if self.dtypes is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in sorted(self.dtypes, key=str))
            return f"it handles {names}, not {str(dtype).removeprefix('torch.')}"
        if variant.ascent not in self.ascents or variant.descent not in self.descents:
            return f"it has no kernels for variant {variant.name!r}"
        return None

    def fuses(self, spec: BaseSpec) -> bool:
        return self.updates is None or spec.name in self.updates


class Backend(Protocol):
    """The operations of a SAM step over one bucket (see ``reference.py`` for their math)."""

    name: str
    capabilities: Capabilities

    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        """How many partial sums a statistics operation writes for this plan."""

    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        """GCSAM: centralize the gradients in place."""

    def noise(self, bucket: Bucket, ctx: StepContext, std: float, generator: torch.Generator) -> None:
        """RSAM: back every parameter up, then ``w <- w + delta``."""

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext, partials: Tensor
    ) -> None:
        """Partial sums of ``u^2`` and of non-finite first-gradient entries into ``partials[:2]``."""

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        """Back up and perturb the plan's parameters; update the variant's running state."""

    def revert_state(self, bucket: Bucket, plan: Plan, ctx: StepContext, force: bool = False) -> None:
        """Undo ``perturb``'s running-state update if the step is skipped (always if ``force``)."""

    def descent_stats(self, bucket: Bucket, plan: Plan, ctx: StepContext, partials: Tensor) -> None:
        """Partial sums of the second pass (non-finite count, <g, g_p>, ||g_p||^2, ||g||^2)."""

    def restore(self, bucket: Bucket, plan: Plan | None) -> None:
        """``w <- backup`` for the plan's parameters (all of them when ``plan`` is None)."""

    def update(
        self,
        bucket: Bucket,
        perturbed: Plan | None,
        plan: Plan,
        spec: BaseSpec,
        ctx: StepContext,
        descent: Descent,
    ) -> None:
        """Restore ``perturbed``, then the fused base update of ``plan``'s parameters."""

    def state_sumsq(self, bucket: Bucket, plan: Plan, name: str, partials: Tensor) -> None:
        """The sum of squares of state ``name`` over the plan into ``partials[0]``."""

    def advance_steps(
        self, bucket: Bucket, plan: Plan, ctx: StepContext, count_skip: bool, base: bool, variant: bool
    ) -> None:
        """Advance the update counts of the plan's parameters unless the step was skipped."""
