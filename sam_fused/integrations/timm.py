"""timm 1.0: ``register()`` puts every SAM variant in ``timm.optim.create_optimizer_v2``.

    from sam_fused.integrations import timm as sam_timm
    sam_timm.register()
    opt = timm.optim.create_optimizer_v2(model, "sam", lr=0.1, weight_decay=5e-4)
    opt = timm.optim.create_optimizer_v2(model, "vassoadamw", lr=1e-3, weight_decay=0.05, rho=0.1, theta=0.4)

Names are ``{variant}{base}``: the variant one of ``sam asam usam vasso fsam gcsam rsam gsam
looksam intervalsam`` (the classes of ``sam_fused``); the base ``""`` or ``sgd`` (SGD with
Nesterov momentum, as timm's ``sgd``), ``momentum`` (SGD, classical momentum), ``adam`` or
``adamw``. timm builds its weight-decay groups (no decay for 1-d parameters and biases) and
passes every other keyword through: ``rho``, the variant's options, ``backend``,
``max_grad_norm``. Its ``momentum=0.9`` default reaches the SGD bases; ``betas``/``eps``
reach the Adam ones.

Why no underscore: timm reads ``name.lower().split("_")[-1]`` and drops any prefix but
``lookahead_``, so ``"sam_adamw"`` silently builds a plain AdamW. Do not use ``sam_*``
names, nor ``lookahead_`` with SAM (timm's Lookahead calls ``step()`` once per step).

The optimizer is a SAM: train with the two-pass loop (README). timm's ``NativeScaler``
runs one pass and calls ``scaler.step(opt)``, which SAM refuses.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import family
from ..optimizer import SAM
from . import framework_missing

__all__ = ["names", "register"]

VARIANTS: dict[str, type[SAM]] = {
    "sam": SAM,
    "asam": family.ASAM,
    "usam": family.USAM,
    "vasso": family.VaSSO,
    "fsam": family.FSAM,
    "gcsam": family.GCSAM,
    "rsam": family.RSAM,
    "gsam": family.GSAM,
    "looksam": family.LookSAM,
    "intervalsam": family.IntervalSAM,
}

# suffix -> (base optimizer, its defaults, timm's flags: has_momentum, has_betas, has_eps)
_NESTEROV = (torch.optim.SGD, {"nesterov": True}, (True, False, False))
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any], tuple[bool, bool, bool]]] = {
    "": _NESTEROV,
    "sgd": _NESTEROV,
    "momentum": (torch.optim.SGD, {"nesterov": False}, (True, False, False)),
    "adam": (torch.optim.Adam, {}, (False, True, True)),
    "adamw": (torch.optim.AdamW, {}, (False, True, True)),
}


def names() -> list[str]:
    """Every name :func:`register` adds."""
    return [variant + suffix for variant in VARIANTS for suffix in BASES]


def register(registry: Any = None) -> list[str]:
    """Add the SAM optimizers to timm's registry (default: the one ``create_optimizer_v2``
    uses); returns their names. Calling it again changes nothing; a name timm already has
    for another optimizer is refused."""
    try:
        from timm.optim import OptimInfo
        from timm.optim._optim_factory import default_registry
    except ModuleNotFoundError as exc:
        what = "sam_fused.integrations.timm.register() puts SAM into timm's optimizer factory"
        framework_missing(exc, "timm", what, "timm>=1.0.31,<1.1")

    registry = default_registry if registry is None else registry
    known = set(registry.list_optimizers())
    for variant, cls in VARIANTS.items():
        for suffix, (base, defaults, (momentum, betas, eps)) in BASES.items():
            name = variant + suffix
            if name in known:
                if registry.get_optimizer_info(name).opt_class is not cls:
                    raise ValueError(f"timm already has an optimizer named {name!r}")
                continue
            registry.register(
                OptimInfo(
                    name=name,
                    opt_class=cls,
                    description=f"sam_fused.{cls.__name__} around torch.optim.{base.__name__}",
                    has_eps=eps,
                    has_momentum=momentum,
                    has_betas=betas,
                    defaults={"base_optimizer": base, **defaults},
                )
            )
    return names()
