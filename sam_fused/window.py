"""Late-phase SAM: SAM steps only inside a window of steps (``sam_fused.schedules.SAMWindow``).

Zhou et al. (ICLR 2025, "Sharpness-Aware Minimization Efficiently Selects Flatter Minima Late
in Training"; code: zzp1012/SAM-in-Late-Phase, ``script/ERM_to_SAM.py``) train with SGD and
switch to SAM for the last epochs. Their script builds two optimizers up front, an SGD one and
a SAM one with its own SGD inside, and steps the first for epochs ``< start_SAM`` and the second
for ``start_SAM <= epoch <= end_SAM``; one LR schedule sets both every epoch. So the SAM phase
starts with an empty momentum buffer and the learning rate goes on along its schedule. Here
one optimizer takes both kinds of step (the base step outside the window is the one-pass path
LookSAM's and interval SAM's cheap steps take), so the base state carries over unless
``reset_momentum=True`` restarts it at the window's first step, as that script's fresh
optimizer does.
"""

from __future__ import annotations

import numbers
from typing import Any

from . import options
from .optimizer import SAM
from .policies import StepKind, StepPolicy
from .step_state import Phase

__all__ = ["SAMWindow", "WindowPolicy", "reset_base_state"]


class WindowPolicy(StepPolicy):
    """The wrapped policy's steps for ``start <= index < end`` (None: no end), the base step
    outside. With ``reset_momentum`` the base optimizer's state restarts just before the update
    of step ``start`` (the window's first), as a freshly built base optimizer's would be."""

    def __init__(self, inner: StepPolicy, start: int, end: int | None, reset_momentum: bool) -> None:
        super().__init__(inner)
        self.start, self.end, self.reset_momentum = start, end, reset_momentum

    def inside(self, index: int) -> bool:
        return self.start <= index and (self.end is None or index < self.end)

    def kind(self, index: int) -> StepKind:
        return super().kind(index) if self.inside(index) else StepKind.BASE

    def before_update(self, engine: Any, index: int) -> None:
        if self.reset_momentum and index == self.start:
            reset_base_state(engine)
        super().before_update(engine, index)

    def host_decision(self) -> str | None:
        return "SAMWindow switches between SAM steps and base steps on the host, by the step count"


def reset_base_state(engine: Any) -> None:
    """Every parameter's base-optimizer state (momentum buffers, Adam's moments and step counts)
    as a freshly built base optimizer has it; the variant's running state is left alone."""
    view = engine.owner.base_optimizer.state  # the base's view of opt.state: no variant key
    for bucket in engine.buckets:
        for param in bucket.params:
            entry = view[param]
            for key in list(entry):
                if key in entry:  # deleting one key of a fused base's entry resets all of them
                    del entry[key]


def _check_window(start: Any, end: Any, reset_momentum: Any) -> tuple[int, int | None, bool]:
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
        raise ValueError(f"SAMWindow: start must be an integer >= 0 (a step index, from 0), got {start!r}")
    if end is not None:
        if isinstance(end, bool) or not isinstance(end, numbers.Integral):
            raise ValueError(f"SAMWindow: end must be an integer step index or None (no end), got {end!r}")
        if end <= start:
            raise ValueError(
                f"SAMWindow: end ({end}) must be greater than start ({start}): SAM runs for "
                "start <= step < end; use end=None to keep SAM to the end of training"
            )
    if not isinstance(reset_momentum, bool):
        raise ValueError(f"SAMWindow: reset_momentum must be True or False, got {reset_momentum!r}")
    return int(start), None if end is None else int(end), reset_momentum


class SAMWindow:
    """SAM steps only for ``start <= step < end``; the base optimizer's step outside.

    Steps are the optimizer's own count (``first_step()`` calls, one per iteration, from 0,
    saved in its ``state_dict()``), so a resumed run stays in step. Outside the window
    ``first_step()`` applies the base update with the first pass's gradient and returns False
    (RSAM's ``noise_step()`` does nothing there); inside, the optimizer's own variant runs
    as it would without a window (LookSAM keeps its every-``k`` schedule, AESAM its policy).
    There is no ``step()`` to call: the window acts on the optimizer it is given.

    ``reset_momentum=True`` restarts the base optimizer's state (momentum, Adam's moments and
    step counts) at step ``start``, as the official code's switch to a freshly built SAM
    optimizer does; the default, False, keeps it (docs/variants.md says why). Like an LR
    scheduler, the window saves its settings with ``state_dict()`` and takes them back with
    ``load_state_dict()``.

    Args:
        optimizer: a :class:`sam_fused.SAM` (any variant class).
        start: the first SAM step (0-based).
        end: the first step after the window, or None (SAM to the end).
        reset_momentum: restart the base optimizer's state at ``start`` (default False).
    """

    def __init__(
        self, optimizer: SAM, start: int, end: int | None = None, reset_momentum: bool = False
    ) -> None:
        if not isinstance(optimizer, SAM):
            raise TypeError(f"SAMWindow needs a sam_fused.SAM optimizer, got {type(optimizer).__name__}")
        start, end, reset_momentum = _check_window(start, end, reset_momentum)
        engine = optimizer.engine
        if engine.step.phase is not Phase.IDLE:
            raise RuntimeError(options.MID_STEP.format(what="SAMWindow(...)"))
        if engine.policy.find(WindowPolicy) is not None:
            raise ValueError("this optimizer already has a SAMWindow; one window per optimizer")
        self.optimizer = optimizer
        self._policy = WindowPolicy(engine.policy, start, end, reset_momentum)
        engine.policy = self._policy

    @property
    def start(self) -> int:
        return self._policy.start

    @property
    def end(self) -> int | None:
        return self._policy.end

    @property
    def reset_momentum(self) -> bool:
        return self._policy.reset_momentum

    @property
    def active(self) -> bool:
        """Whether the optimizer's coming step lies inside the window."""
        return self._policy.inside(self.optimizer.engine.step.step_index)

    def state_dict(self) -> dict[str, Any]:
        """The window's settings (the step count is the optimizer's, in its own state_dict)."""
        return {"start": self.start, "end": self.end, "reset_momentum": self.reset_momentum}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the settings of a saved window; a bad entry is refused and changes nothing."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"start", "end", "reset_momentum"}:
            raise ValueError(
                "SAMWindow.load_state_dict() takes what SAMWindow.state_dict() returns: a dict "
                f"with 'start', 'end' and 'reset_momentum', got {state_dict!r}"
            )
        start, end, reset = _check_window(
            state_dict["start"], state_dict["end"], state_dict["reset_momentum"]
        )
        self._policy.start, self._policy.end, self._policy.reset_momentum = start, end, reset

    def __repr__(self) -> str:
        return f"SAMWindow(start={self.start}, end={self.end}, reset_momentum={self.reset_momentum})"
