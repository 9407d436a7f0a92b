"""AE-SAM: a SAM step only where the gradient norm says the iterate sits in a sharp region.

Jiang, Yang, Zhang & Kwok, "An Adaptive Policy to Employ Sharpness-Aware Minimization",
ICLR 2023 (arXiv 2304.14647). No official code was found. Per step ``t`` (0-based, the
optimizer's own count), with ``q = ||g||^2`` of the first pass's gradient (global, unscaled):

    mu      <- delta mu + (1 - delta) q
    sigma^2 <- delta sigma^2 + (1 - delta) (q - mu)^2          (with the new mu)
    c_t      = (t / T) lambda1 + (1 - t / T) lambda2            (t / T capped at 1)
    SAM step if q >= mu + c_t sigma, else the base step with g

The decision is the one host read of the step: ``[||g||^2, non-finite count]`` is read after
the first pass's statistics (one synchronisation), which is also why a CUDA graph cannot
replay AESAM (``graph.py`` refuses it). On a SAM step of plain SAM those statistics are the
perturbation's norm as well and are not taken again. mu, sigma^2 and the counts
(``opt.statistics``) are saved with the step count, in the "sam_fused" entry of
``state_dict()``'s groups (where torch.distributed.checkpoint keeps it). A step whose
gradient is not finite is a skipped base step and leaves mu and sigma^2 where they were.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from . import status as S
from .optimizer import SAM
from .policies import StepKind, StepPolicy
from .variants import _number, fraction, get_variant, non_negative, positive_int

__all__ = ["AESAM", "AdaptivePolicy"]

KEY = "aesam"  # the policy's entry in a checkpoint: {"mean", "var", "sam_steps", "steps"}
# ascent rules that take their first pass at w and perturb every step they are asked to
# (RSAM's first pass is at w + delta; LookSAM and interval SAM keep schedules of their own)
VARIANTS_OVER = ("sam", "usam", "vasso", "fsam", "gcsam", "gsam")


class AdaptivePolicy(StepPolicy):
    """AE-SAM's rule around the variant's schedule: each SAM step becomes a ``BY_NORM`` one."""

    def __init__(self, inner: StepPolicy, total_steps: int, settings: dict[str, float]) -> None:
        super().__init__(inner)
        self.total_steps = total_steps
        self.delta, self.lambda1, self.lambda2 = settings["delta"], settings["lambda1"], settings["lambda2"]
        mean, var = settings["initial_mean"], settings["initial_var"]
        self.initial = {"mean": mean, "var": var, "sam_steps": 0, "steps": 0}
        self.values = dict(self.initial)  # {"mean", "var", "sam_steps", "steps"}
        self._before: tuple[int, dict] | None = None  # (step, values) before the last settle

    def kind(self, index: int) -> StepKind:
        kind = super().kind(index)
        return StepKind.BY_NORM if kind is StepKind.SAM else kind

    def threshold_scale(self, index: int) -> float:
        """``c_t``: lambda2 at the first step, lambda1 from step T on."""
        progress = min(index / self.total_steps, 1.0)
        return progress * self.lambda1 + (1 - progress) * self.lambda2

    def settle(self, engine: Any, index: int) -> bool:
        q, bad = engine.status[S.FIRST_PASS].tolist()  # the step's one host read
        old = self.values
        self._before = (index, old)
        new = {**old, "steps": old["steps"] + 1}
        sam = False
        if bad == 0 and math.isfinite(q):  # else skipped on the device: mu and sigma^2 stay
            d = self.delta
            new["mean"] = mean = d * old["mean"] + (1 - d) * q
            new["var"] = var = d * old["var"] + (1 - d) * (q - mean) ** 2
            sam = q >= mean + self.threshold_scale(index) * math.sqrt(var)
            new["sam_steps"] = old["sam_steps"] + int(sam)
        self.values = new  # a new dict: a state_dict() taken before keeps its values
        return sam

    def abandon(self, index: int) -> None:
        if self._before is not None and self._before[0] == index:
            self.values = self._before[1]
        self._before = None
        super().abandon(index)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), KEY: dict(self.values)}

    def checked_state(self, saved: dict[str, Any] | None) -> dict[str, Any]:
        entry = None if saved is None else saved.get(KEY) if isinstance(saved, dict) else saved
        own = dict(self.initial) if entry is None else check_entry(entry)
        return {**super().checked_state(saved), KEY: own}

    def load_state(self, checked: dict[str, Any]) -> None:
        self.values, self._before = checked[KEY], None
        super().load_state(checked)

    def host_decision(self) -> str | None:
        return "AESAM reads ||g||^2 on the host every step to choose between a SAM and a base step"


def check_entry(entry: Any) -> dict[str, Any]:
    """A saved AE-SAM entry (the "policy" of the checkpoint's "sam_fused" group entry), checked."""
    where = f"the checkpoint's AESAM statistics ({KEY!r})"
    if not isinstance(entry, dict) or set(entry) != {"mean", "var", "sam_steps", "steps"}:
        raise ValueError(f"{where} must be a dict with 'mean', 'var', 'sam_steps' and 'steps', got {entry!r}")
    values: dict[str, Any] = {}
    for key in ("mean", "var"):
        values[key] = non_negative(f"{where}[{key!r}]", entry[key])
    for key in ("sam_steps", "steps"):
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{where}[{key!r}] must be a non-negative integer, got {value!r}")
        values[key] = int(value)
    if values["sam_steps"] > values["steps"]:
        raise ValueError(f"{where}: sam_steps ({values['sam_steps']}) exceeds steps ({values['steps']})")
    return values


class AESAM(SAM):
    r"""AE-SAM (Jiang et al., ICLR 2023): SAM where ``||g||^2`` is high for its running statistics.

    .. math::
        \mu \leftarrow \delta\mu + (1-\delta) q, \quad
        \sigma^2 \leftarrow \delta\sigma^2 + (1-\delta)(q-\mu)^2, \quad
        \text{SAM step iff } q \ge \mu + c_t \sigma, \quad
        c_t = \tfrac{t}{T}\lambda_1 + (1 - \tfrac{t}{T})\lambda_2

    with ``q = ||g||^2`` of the first pass. ``first_step()`` returns False on a base step
    (the update is done), as LookSAM's cheap steps do; a run costs ``1 + sam_fraction``
    forward/backward passes per step. One host read per step decides (no CUDA graphs).

    Args:
        params, base_optimizer, rho: as for :class:`sam_fused.SAM` (``adaptive=True`` gives
            AE-ASAM).
        total_steps: ``T``, the number of steps of the whole run (required).
        delta: the running statistics' forgetting rate (default 0.9).
        lambda1, lambda2: ``c_t`` at the end and at the start of the run (defaults -1, 1).
        initial_mean, initial_var: ``mu`` and ``sigma^2`` before the first step (default 0, 0:
            our choice, docs/variants.md).
        variant: the SAM step's ascent, one of ``"sam"`` (default), ``"usam"``, ``"vasso"``,
            ``"fsam"``, ``"gcsam"``, ``"gsam"``.
        **kwargs: SAM's other arguments and the base optimizer's options.
    """

    def __init__(
        self,
        params,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        *,
        total_steps: int,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        initial_mean: float = 0.0,
        initial_var: float = 0.0,
        variant: str = "sam",
        **kwargs: Any,
    ) -> None:
        total_steps = positive_int("AESAM: total_steps", total_steps)
        settings = {
            "delta": fraction("AESAM: delta", delta),
            "lambda1": _number("AESAM: lambda1", lambda1),
            "lambda2": _number("AESAM: lambda2", lambda2),
            "initial_mean": non_negative("AESAM: initial_mean", initial_mean),
            "initial_var": non_negative("AESAM: initial_var", initial_var),
        }
        name = get_variant(variant).name
        if name not in VARIANTS_OVER:
            raise ValueError(
                f"AESAM chooses per step between a SAM step and a base step; variant={variant!r} "
                f"cannot be one of them (RSAM's first pass is at w + delta, LookSAM and interval SAM "
                f"have their own schedules). Choose one of {list(VARIANTS_OVER)}"
            )
        super().__init__(params, base_optimizer, rho, variant=name, **kwargs)
        engine = self.engine
        engine.policy = AdaptivePolicy(engine.policy, total_steps, settings)

    @property
    def policy(self) -> AdaptivePolicy:
        found = self.engine.policy.find(AdaptivePolicy)
        assert isinstance(found, AdaptivePolicy)
        return found

    @property
    def statistics(self) -> dict[str, Any]:
        """``{"mean": mu, "var": sigma^2, "sam_steps": ..., "steps": ...}`` so far (a copy)."""
        return dict(self.policy.values)

    @property
    def sam_fraction(self) -> float:
        """The fraction of the steps so far that were SAM steps (0 before the first step)."""
        values = self.policy.values
        return values["sam_steps"] / values["steps"] if values["steps"] else 0.0
