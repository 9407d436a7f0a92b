"""The host side of the step in flight: one object, mutated in place and never rebound.

Framework wrappers that stand in for the optimizer (Lightning's ``LightningOptimizer``
runs SAM's methods with itself as ``self``) reach this object through the step engine, so
whatever a call records about the step (the phase, the perturbed plans, the step index, the
GradScaler, RSAM's generator) is seen by every later call, whoever makes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .layout import Plan

__all__ = ["Phase", "StepState"]


class Phase(Enum):
    IDLE = "idle"  # between steps
    NOISED = "noised"  # RSAM: at w + delta, before the first pass's first_step()
    PERTURBED = "perturbed"  # at w + eps, before second_step()


@dataclass
class StepState:
    """The host side of the step in flight (mutated in place, never replaced)."""

    phase: Phase = Phase.IDLE
    plans: list[Plan] | None = None  # the perturbed plans
    backed_up: int = 0  # buckets (in order) that hold this step's backup
    perturbed: tuple = ()  # RSAM: whether noise_step() perturbed each bucket (SAM-ON's key)
    step_index: int = 0  # steps taken; periodic variants perturb by it
    index_before: int = 0
    scaler: Any = None
    scaler_key: int = 0
    generator: torch.Generator | None = None  # RSAM's noise
    generator_before: Tensor | None = None
    hooks_open: bool = False  # the step's pre-hooks fired, its post-hooks are due
    one_pass_done: bool = False  # the last first_step() took a whole one-pass step
    in_closure_step: bool = False
    closure_checked: bool = False
