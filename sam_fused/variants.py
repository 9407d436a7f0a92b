"""The SAM variants: each one is a :class:`Variant` object that the engine and backends ask.

Every variant follows the two-pass skeleton of ``docs/variants.md``. The ascent step is,
for every parameter ``p`` of every group,

    v_p = direction(...)                      (the variant's choice; SAM: v = g)
    T_p = |w_p| + eta  if the group is adaptive (ASAM), else 1
    u_p = T_p * v_p                           (what the global norm measures)
    eps_p = rho_group * T_p * u_p / (||u|| + norm_eps)   (normalized variants)
    eps_p = rho_group * T_p * u_p                        (USAM)

with ``||u||`` ONE L2 norm over every parameter that has a gradient, in every group. The
descent uses the second-pass gradient ``g_p``, or a variant's correction of it.

A variant says which ascent rule (:class:`Ascent`) and descent rule (:class:`Descent`) it
uses, which running state it keeps, how its options are validated, which two scalars its
kernels take, and (for clipping) the norm of its descent gradient. The rules are integer
enums: the reference backend branches on them in PyTorch, and the Triton kernels take them
as ``tl.constexpr`` names (``sam_fused/kernels/common.py``), so a new variant is one object
here, one class in ``family.py``, one branch in ``backends/reference.py`` and one branch in
``kernels/ascent.py``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch
from torch import Tensor

from . import status as S
from .elementwise import select

__all__ = ["VARIANTS", "Ascent", "Descent", "Option", "Variant", "descent_gradient", "get_variant"]


class Ascent(IntEnum):
    """Direction rules ``v`` of the ascent step."""

    GRAD = 0  # v = g                                   SAM, ASAM, USAM, GSAM, LookSAM, GCSAM*
    VASSO = 1  # d <- (1 - theta) d + theta g, v = d    (d = g on its first update)
    FSAM = 2  # v = g - sigma m, then m <- lam m + (1 - lam) g   (v = m = g on the first update)
    RSAM = 3  # v = delta + lam g_hat, g_hat taken at w + delta
    # *GCSAM centralizes g in place first (docs/variants.md), then uses GRAD.


class Descent(IntEnum):
    """Descent rules: which gradient the base update receives."""

    PLAIN = 0  # g_p
    GSAM = 1  # g_p - alpha * (g - (<g, g_p> / ||g_p||^2) g_p)
    LOOKSAM_FULL = 2  # g_p, and store g_v = g_p - (<g_p, g> / ||g||^2) g
    LOOKSAM_REUSE = 3  # one pass: g + alpha * (||g|| / ||g_v||) g_v


# ---------------------------------------------------------------------- option checks
def _number(name: str, value: Any) -> float:
    # numpy scalars are numbers too; bools and strings are not
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def non_negative(name: str, value: Any) -> float:
    value = _number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def fraction(name: str, value: Any) -> float:
    value = _number(name, value)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def optional_non_negative(name: str, value: Any) -> float | None:
    return None if value is None else non_negative(name, value)


def seed(name: str, value: Any) -> int:
    # the range torch.Generator.manual_seed accepts, checked here so that a bad seed is
    # refused when the optimizer is built, not when the first noise is drawn
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -(2**63) <= value < 2**64:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**64), got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Option:
    """A variant option: its default and the check that returns the validated value."""

    default: Any
    check: Callable[[str, Any], Any]


# ---------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One member of the SAM family.

    Attributes:
        name: the value of ``variant=`` (and, capitalised, the class in ``sam_fused``).
        normalized: whether the perturbation is divided by the global norm of ``u``.
        ascent: the direction rule.
        descent: the descent rule on perturbed steps.
        running_state: the name of the one persistent per-parameter tensor the variant
            keeps (in ``opt.state[p]`` and ``state_dict``), or None.
        keeps_first_grad: whether the first-pass gradient is stored for the second step.
        centralize: gradient centralization of both passes (GCSAM).
        periodic: a full SAM step every ``k`` steps, cheaper steps in between (options
            ``k`` and ``offset``).
        options: the variant's own options, with their defaults and checks.
        reference: where the variant was published.
    """

    name: str
    normalized: bool = True
    ascent: Ascent = Ascent.GRAD
    descent: Descent = Descent.PLAIN
    running_state: str | None = None
    keeps_first_grad: bool = False
    centralize: bool = False
    periodic: bool = False
    options: Mapping[str, Option] = field(default_factory=dict)
    reference: str = ""
    # derived once (read on every step): whether the variant perturbs before the first pass
    # (RSAM's noise_step(): its first pass runs at w + delta, and the backup is taken then);
    # whether the perturbation updates the running state (VaSSO's d, F-SAM's m)
    perturbs_before_pass: bool = field(init=False, repr=False)
    ascent_updates_state: bool = field(init=False, repr=False)
    aux_role: str | None = field(init=False, repr=False)  # the role the direction reads besides g

    def __post_init__(self) -> None:
        object.__setattr__(self, "perturbs_before_pass", self.ascent == Ascent.RSAM)
        object.__setattr__(
            self, "ascent_updates_state", self.running_state is not None and self.ascent != Ascent.GRAD
        )
        if self.perturbs_before_pass:
            aux = "rsam_delta"
        else:
            aux = self.running_state if self.ascent_updates_state else None
        object.__setattr__(self, "aux_role", aux)

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The variant's options: defaults overridden by ``given``, each checked."""
        unknown = set(given) - set(self.options)
        if unknown:
            raise TypeError(
                f"variant {self.name!r} has no option(s) {sorted(unknown)}; "
                f"its options are {sorted(self.options) or 'none'}"
            )
        resolved = {
            name: option.check(f"{self.name}: {name}", given.get(name, option.default))
            for name, option in self.options.items()
        }
        self.check_together(resolved)
        return resolved

    def check_together(self, options: dict[str, Any]) -> None:
        """Checks that involve several options (none by default)."""

    def kernel_scalars(self, options: Mapping[str, Any]) -> tuple[float, float]:
        """The two scalars ``c1, c2`` the ascent kernels take for this variant."""
        return 0.0, 0.0

    def direction(
        self, options: Mapping[str, Any], g: Tensor, aux: Tensor | None, first: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """The ascent direction ``v`` and the new running state (None: the variant keeps none),
        in PyTorch: the specification of ``kernels/variants.py`` and ``csrc/sam_fused_math.h``.

        ``aux`` is the variant's running state before this step (VaSSO's ``d``, F-SAM's ``m``)
        or RSAM's noise ``delta``; ``first`` is True while the running state was never updated
        (a bool tensor, per element over a flat buffer, or a Python bool: ``elementwise.py``).
        """
        return g, None  # SAM, ASAM, USAM, GSAM, LookSAM, GCSAM (after centralization)

    def perturbs(self, step_index: int, options: Mapping[str, Any]) -> bool:
        """Whether the step with this 0-based index takes the full two-pass SAM step."""
        return True

    def descent_norm2(self, status: Tensor, options: Mapping[str, Any]) -> Tensor:
        """``||d||^2`` of the descent gradient, from the second pass's statistics (clipping)."""
        return status[S.GP2]


@dataclass(frozen=True)
class _VaSSO(Variant):
    def kernel_scalars(self, options: Mapping[str, Any]) -> tuple[float, float]:
        return float(options["theta"]), 0.0

    def direction(self, options, g, aux, first):
        # d <- (1 - theta) d + theta g, with d = g on the first update
        theta = options["theta"]
        d = select(first, g, (1 - theta) * aux + theta * g)
        return d, d


@dataclass(frozen=True)
class _FSAM(Variant):
    def kernel_scalars(self, options: Mapping[str, Any]) -> tuple[float, float]:
        return float(options["sigma"]), float(options["lam"])

    def direction(self, options, g, aux, first):
        # v = g - sigma m (the previous m), then m <- lam m + (1 - lam) g; the first update
        # takes v = g and m = g (the official code)
        lam = options["lam"]
        v = select(first, g, g - options["sigma"] * aux)
        return v, select(first, g, lam * aux + (1 - lam) * g)


@dataclass(frozen=True)
class _RSAM(Variant):
    def kernel_scalars(self, options: Mapping[str, Any]) -> tuple[float, float]:
        return float(options["lam"]), 0.0

    def direction(self, options, g, aux, first):
        return aux + options["lam"] * g, None  # v = delta + lam g_hat, g_hat taken at w + delta


@dataclass(frozen=True)
class _GSAM(Variant):
    def descent_norm2(self, status: Tensor, options: Mapping[str, Any]) -> Tensor:
        # d = (1 + alpha c) g_p - alpha g with c = <g, g_p> / ||g_p||^2, so
        # ||d||^2 = a^2 ||g_p||^2 - 2 alpha a <g, g_p> + alpha^2 ||g||^2 with a = 1 + alpha c
        alpha = float(options["alpha"])
        gp2, dot = status[S.GP2], status[S.DOT]
        a = 1 + alpha * torch.where(gp2 > 0, dot / gp2, 0.0)
        return (a * a * gp2 - 2 * alpha * a * dot + alpha * alpha * status[S.G2]).clamp(min=0)


@dataclass(frozen=True)
class _Periodic(Variant):
    """A full SAM step on steps ``offset, offset + k, offset + 2k, ...`` (0-based; offset 0
    when the variant has no such option)."""

    def check_together(self, options: dict[str, Any]) -> None:
        if not 0 <= options.get("offset", 0) < options["k"]:
            raise ValueError(f"{self.name}: offset must lie in [0, k), got {options['offset']!r}")

    def perturbs(self, step_index: int, options: Mapping[str, Any]) -> bool:
        offset = options.get("offset", 0)
        return step_index >= offset and (step_index - offset) % options["k"] == 0


def _offset(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("sam", reference="Foret et al., ICLR 2021"),
        Variant("usam", normalized=False, reference="Andriushchenko & Flammarion, ICML 2022"),
        _VaSSO(
            "vasso",
            ascent=Ascent.VASSO,
            running_state="vasso_d",
            options={"theta": Option(0.9, fraction)},
            reference="Li & Giannakis, NeurIPS 2023",
        ),
        _FSAM(
            "fsam",
            ascent=Ascent.FSAM,
            running_state="fsam_m",
            options={"sigma": Option(1.0, non_negative), "lam": Option(0.9, fraction)},
            reference="Li et al., CVPR 2024 (m starts at g and the previous step's m is used, as in "
            "the official code)",
        ),
        Variant("gcsam", centralize=True, reference="Hassan et al., 2025"),
        _RSAM(
            "rsam",
            ascent=Ascent.RSAM,
            options={
                "lam": Option(1.0, non_negative),
                "noise_std": Option(None, optional_non_negative),
                "seed": Option(0, seed),
            },
            reference="Liu et al., NeurIPS 2022, in the form analysed by Khanh et al., NeurIPS 2024",
        ),
        _GSAM(
            "gsam",
            descent=Descent.GSAM,
            keeps_first_grad=True,
            options={"alpha": Option(0.4, non_negative)},
            reference="Zhuang et al., ICLR 2022",
        ),
        _Periodic(
            "looksam",
            descent=Descent.LOOKSAM_FULL,
            keeps_first_grad=True,
            running_state="looksam_gv",
            periodic=True,
            # no offset: the reuse steps need the g_v of a full step, so the first step is one
            options={"k": Option(5, positive_int), "alpha": Option(0.7, non_negative)},
            reference="Liu et al., CVPR 2022",
        ),
        _Periodic(
            "interval",
            periodic=True,
            options={"k": Option(10, positive_int), "offset": Option(0, _offset)},
            reference="MosaicML Composer's SAM with interval (offset=k-1 gives Composer's steps)",
        ),
    )
}


def descent_gradient(
    rule: Descent, options: Mapping[str, Any], gp: Tensor, aux: Tensor | None, status: Tensor
) -> Tensor:
    """The gradient the base update receives, in PyTorch (the specification of
    ``kernels/variants.py`` and ``csrc/sam_fused_math.h``).

    GSAM: ``g_p - alpha g_perp`` with ``g_perp = g - (<g, g_p> / ||g_p||^2) g_p`` (aux = g).
    LookSAM reuse steps: ``g + alpha (||g|| / ||g_v||) g_v`` (aux = g_v, gp = this pass's g).
    Ratios of the status's sums are formed in its dtype (float64), then cast.
    """
    if rule in (Descent.PLAIN, Descent.LOOKSAM_FULL):
        return gp
    dt = gp.dtype
    if rule == Descent.GSAM:
        gp2 = status[S.GP2]
        coef = torch.where(gp2 > 0, status[S.DOT] / gp2, 0).to(dt)
        return gp - options["alpha"] * (aux - coef * gp)
    if rule == Descent.LOOKSAM_REUSE:
        gv_norm = status[S.GV2].sqrt()
        scale = torch.where(gv_norm > 0, status[S.SUMSQ].sqrt() / gv_norm, 0).to(dt)
        return gp + options["alpha"] * scale * aux
    raise NotImplementedError(f"descent rule {rule}")


def get_variant(name: str) -> Variant:
    """Look a variant up by name, with an error that lists the valid names."""
    try:
        return VARIANTS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown SAM variant {name!r}; choose one of {sorted(VARIANTS)} "
            "(ASAM is variant='sam' with adaptive=True)"
        ) from None
