"""Step policies: which kind of step each ``first_step()`` takes.

The engine asks one :class:`StepPolicy` per step (``StepEngine.policy``) where it used to ask
the variant alone. Policies wrap each other, the variant's own schedule innermost, so they
compose: a window (``window.py``, ``sam_fused.schedules.SAMWindow``) around LookSAM leaves
LookSAM's schedule alone inside its window and takes the base step outside it; AESAM's
policy (``sam_fused.aesam``) decides from the first pass's gradient norm. Each kind of step
is one the engine already fuses: the two-pass SAM step, the variant's one-pass step (LookSAM's
reuse, interval SAM's base step) or the plain base step with the first pass's gradient, which
is the one-pass path with the plain descent.

A policy never changes anything in :meth:`StepPolicy.kind` (it is asked again when a step is
retried, and by ``opt.perturbs_this_step``); what it keeps across steps moves in
:meth:`StepPolicy.settle` and :meth:`StepPolicy.before_update`, inside the step's apply half,
and :meth:`StepPolicy.abandon` puts it back when the engine abandons the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any

from .variants import VARIANTS, Variant

if TYPE_CHECKING:
    from .engine import StepEngine

__all__ = [
    "StepKind",
    "StepPolicy",
    "VariantSchedule",
    "plain_stats_serve",
]


class StepKind(Enum):
    SAM = "sam"  # two passes: first_step() perturbs, second_step() restores and updates
    CHEAP = "cheap"  # the variant's own one-pass step (LookSAM's reuse, interval SAM's base step)
    BASE = "base"  # the base optimizer's plain step with the first pass's gradient
    BY_NORM = "by_norm"  # SAM or BASE, decided from the first pass's statistics (settle())


class StepPolicy:
    """The hook the engine consults per step; the default forwards to the policy it wraps."""

    def __init__(self, inner: StepPolicy | None) -> None:
        self.inner = inner

    def kind(self, index: int) -> StepKind:
        """The kind of the step with this 0-based index (the optimizer's own count)."""
        assert self.inner is not None
        return self.inner.kind(index)

    def settle(self, engine: StepEngine, index: int) -> bool:
        """A ``BY_NORM`` step, after the first pass's plain statistics (``status[SUMSQ]`` is
        ``||g||^2``, ``status[BAD1]`` its non-finite count): True for a SAM step."""
        assert self.inner is not None
        return self.inner.settle(engine, index)

    def before_update(self, engine: StepEngine, index: int) -> None:
        """Just before the base update of step ``index`` (either kind), once it runs for sure."""
        if self.inner is not None:
            self.inner.before_update(engine, index)

    def abandon(self, index: int) -> None:
        """The engine abandoned step ``index``, which will run again: undo what :meth:`settle`
        moved for it."""
        if self.inner is not None:
            self.inner.abandon(index)

    def state_dict(self) -> dict[str, Any]:
        """What the chain keeps across steps, by policy (saved in the "sam_fused" group entry)."""
        return {} if self.inner is None else self.inner.state_dict()

    def checked_state(self, saved: dict[str, Any] | None) -> dict[str, Any]:
        """``saved`` (a checkpoint's, None: none) checked, as :meth:`load_state` takes it."""
        return {} if self.inner is None else self.inner.checked_state(saved)

    def load_state(self, checked: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.load_state(checked)

    def host_decision(self) -> str | None:
        """Why one CUDA graph cannot replay the steps (the host picks their kind), or None."""
        return None if self.inner is None else self.inner.host_decision()

    def find(self, cls: type) -> StepPolicy | None:
        """The policy of class ``cls`` in this chain, or None."""
        policy: StepPolicy | None = self
        while policy is not None and not isinstance(policy, cls):
            policy = policy.inner
        return policy


class VariantSchedule(StepPolicy):
    """The innermost policy: the variant's own schedule (a SAM step every step, or LookSAM's
    and interval SAM's every ``k``-th)."""

    def __init__(self, variant: Variant, options: Mapping[str, Any]) -> None:
        super().__init__(None)
        self.variant, self.options = variant, options

    def kind(self, index: int) -> StepKind:
        return StepKind.SAM if self.variant.perturbs(index, self.options) else StepKind.CHEAP

    def settle(self, engine: StepEngine, index: int) -> bool:
        raise AssertionError("the variant's schedule never defers a decision")


def plain_stats_serve(engine: StepEngine, kind: StepKind) -> bool:
    """Whether a ``BY_NORM`` step's plain ``||g||^2``, already taken, is the ascent's norm as well
    (plain SAM, no adaptive group, every group perturbed), so that its SAM step does not take
    it twice. A SAM-ON group (``perturb=False``) is in ``||g||^2`` but not in the ascent's norm."""
    if kind is not StepKind.BY_NORM or engine.variant is not VARIANTS["sam"]:
        return False
    adaptive, perturb = engine.keys["adaptive"], engine.keys["perturb"]
    return not any(group[adaptive] or not group[perturb] for group in engine.owner.param_groups)
