"""The SAM variants: what each one perturbs along, and how it descends.

Every variant follows the two-pass skeleton of ``docs/variants.md``. The ascent step is,
for every parameter ``p`` of every group,

    v_p = direction(...)                      (the variant's choice; SAM: v = g)
    T_p = |w_p| + eta  if the group is adaptive (ASAM), else 1
    u_p = T_p * v_p                           (what the global norm measures)
    eps_p = rho_group * T_p * u_p / (||u|| + norm_eps)   (normalized variants)
    eps_p = rho_group * T_p * u_p                        (USAM)

with ``||u||`` ONE L2 norm over every parameter that has a gradient, in every group. The
descent uses the second-pass gradient ``g_p``, or a variant's correction of it.

A variant is a :class:`Variant` record: which direction rule the ascent uses, which
descent rule the update uses, which state it keeps, and its options with defaults. The
reference backend implements each rule in a few lines of PyTorch; the Triton kernels switch
on the same rule numbers (``constexpr``), so a new variant adds a branch, not a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ASCENT", "DESCENT", "VARIANTS", "Variant", "get_variant"]


class ASCENT:
    """Direction rules ``v`` of the ascent step (kernel constexpr values)."""

    GRAD = 0  # v = g                                  SAM, ASAM, USAM, GSAM, LookSAM, GCSAM*
    VASSO = 1  # v = d, d <- (1 - theta) d + theta g   (d = g on the first step)
    FSAM = 2  # v = g - sigma m; then m <- lam m + (1 - lam) g   (m = 0 before the first step)
    RSAM = 3  # v = delta + lam g_hat, g_hat taken at w + delta
    # *GCSAM centralizes g in place first (docs/variants.md), then uses GRAD.


class DESCENT:
    """Descent rules: which gradient the base update receives (kernel constexpr values)."""

    PLAIN = 0  # g_p
    GSAM = 1  # g_p - alpha * (g - (<g, g_p> / ||g_p||^2) g_p)
    LOOKSAM_FULL = 2  # g_p, and store g_v = g_p - (<g_p, g> / ||g||^2) g
    LOOKSAM_REUSE = 3  # one pass: g + alpha * (||g|| / ||g_v||) g_v


@dataclass(frozen=True)
class Variant:
    """One member of the SAM family.

    Attributes:
        name: the value of ``variant=`` (and the class name in ``sam_fused``).
        normalized: whether the perturbation is divided by the global norm of ``u``.
        ascent: the direction rule (:class:`ASCENT`).
        descent: the descent rule on perturbed steps (:class:`DESCENT`).
        state: persistent per-parameter state (kept in ``state_dict``).
        keeps_first_grad: whether the first-pass gradient is stored for the second step.
        centralize: gradient centralization of both passes (GCSAM).
        every: a full SAM step every ``every`` steps, cheaper steps in between (LookSAM,
            interval SAM); 0 for variants that perturb on every step. The option named in
            ``every_option`` overrides it.
        options: the variant's own options and their defaults.
        reference: where the variant was published.
    """

    name: str
    normalized: bool = True
    ascent: int = ASCENT.GRAD
    descent: int = DESCENT.PLAIN
    state: tuple[str, ...] = ()
    keeps_first_grad: bool = False
    centralize: bool = False
    every_option: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    reference: str = ""

    @property
    def noise(self) -> bool:
        """RSAM: the first pass is taken at ``w + delta`` (``noise_step()``)."""
        return self.ascent == ASCENT.RSAM


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("sam", reference="Foret et al., ICLR 2021"),
        Variant("usam", normalized=False, reference="Andriushchenko & Flammarion, ICML 2022"),
        Variant(
            "vasso",
            ascent=ASCENT.VASSO,
            state=("vasso_d",),
            options={"theta": 0.9},
            reference="Li & Giannakis, NeurIPS 2023",
        ),
        Variant(
            "fsam",
            ascent=ASCENT.FSAM,
            state=("fsam_m",),
            options={"sigma": 1.0, "lam": 0.9},
            reference="Li et al., CVPR 2024 (the EMA of the previous step, as in the official code)",
        ),
        Variant("gcsam", centralize=True, reference="Hassan et al., 2025"),
        Variant(
            "rsam",
            ascent=ASCENT.RSAM,
            options={"lam": 1.0, "noise_std": None, "seed": 0},
            reference="Liu et al., NeurIPS 2022, in the form analysed by Khanh et al., NeurIPS 2024",
        ),
        Variant(
            "gsam",
            descent=DESCENT.GSAM,
            keeps_first_grad=True,
            options={"alpha": 0.4},
            reference="Zhuang et al., ICLR 2022",
        ),
        Variant(
            "looksam",
            descent=DESCENT.LOOKSAM_FULL,
            keeps_first_grad=True,
            state=("looksam_gv",),
            every_option="k",
            options={"k": 5, "alpha": 0.7},
            reference="Liu et al., CVPR 2022",
        ),
        Variant(
            "interval",
            every_option="k",
            options={"k": 10},
            reference="MosaicML Composer's SAM with interval",
        ),
    )
}


def get_variant(name: str) -> Variant:
    """Look a variant up by name, with an error that lists the valid names."""
    try:
        return VARIANTS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown SAM variant {name!r}; choose one of {sorted(VARIANTS)} "
            "(ASAM is variant='sam' with adaptive=True)"
        ) from None


def resolve_options(variant: Variant, given: dict[str, Any]) -> dict[str, Any]:
    """The variant's options: its defaults overridden by ``given``; unknown names refused."""
    unknown = set(given) - set(variant.options)
    if unknown:
        raise TypeError(
            f"variant {variant.name!r} has no option(s) {sorted(unknown)}; "
            f"its options are {sorted(variant.options) or 'none'}"
        )
    options = {**variant.options, **given}
    for name in ("theta", "lam"):
        if name in options and not 0 <= options[name] <= 1 and variant.name != "rsam":
            raise ValueError(f"{variant.name}: {name} must lie in [0, 1], got {options[name]}")
    if "k" in options and not (isinstance(options["k"], int) and options["k"] >= 1):
        raise ValueError(f"{variant.name}: k must be a positive integer, got {options['k']!r}")
    for name in ("alpha", "sigma", "lam"):
        if name in options and options[name] < 0:
            raise ValueError(f"{variant.name}: {name} must be non-negative, got {options[name]}")
    std = options.get("noise_std")
    if std is not None and not std >= 0:
        raise ValueError(f"rsam: noise_std must be non-negative, got {std}")
    return options
