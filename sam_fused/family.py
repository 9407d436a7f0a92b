"""One class per member of the SAM family, each a thin, documented front for ``SAM``.

Every class takes the same leading arguments as :class:`sam_fused.SAM`
(``params, base_optimizer=torch.optim.SGD, rho=...``), its own options as keywords with
the published defaults, and passes everything else (``lr``, ``momentum``, ``backend``,
``adaptive``, ...) through. The math of each is in ``docs/variants.md`` and, executable,
in ``sam_fused/backends/reference.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from .optimizer import SAM

__all__ = ["ASAM", "FSAM", "GCSAM", "GSAM", "RSAM", "USAM", "IntervalSAM", "LookSAM", "VaSSO"]

_SGD = torch.optim.SGD


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., ICML 2021): ``eps = rho T^2 g / ||T g||``, ``T = |w| + eta``.

    Defaults follow the paper (rho = 0.5 for CIFAR-10, eta = 0.01). ``eta=0`` on every
    parameter is the popular implementation's ``adaptive=True``; the official code keeps
    biases out (``T = 1``): give them a group with ``adaptive=False``.
    """

    def __init__(self, params, base_optimizer=_SGD, rho: float = 0.5, eta: float = 0.01, **kwargs: Any):
        super().__init__(params, base_optimizer, rho, adaptive=True, eta=eta, **kwargs)


class USAM(SAM):
    """Unnormalized SAM (Andriushchenko & Flammarion, ICML 2022): ``eps = rho g``."""

    def __init__(self, params, base_optimizer=_SGD, rho: float = 0.05, **kwargs: Any):
        super().__init__(params, base_optimizer, rho, variant="usam", **kwargs)


class VaSSO(SAM):
    """Variance-suppressed SAM (Li & Giannakis, NeurIPS 2023).

    ``d <- (1 - theta) d + theta g`` (``d = g`` on the first step), ``eps = rho d / ||d||``.
    ``d`` is kept across steps and saved in ``state_dict`` (``state[p]['vasso_d']``).
    """

    def __init__(self, params, base_optimizer=_SGD, rho: float = 0.05, theta: float = 0.9, **kwargs: Any):
        super().__init__(
            params, base_optimizer, rho, variant="vasso", variant_options={"theta": theta}, **kwargs
        )


class FSAM(SAM):
    """Friendly SAM (Li et al., CVPR 2024).

    ``d = g - sigma m`` with ``m`` the EMA of earlier gradients, then
    ``m <- lam m + (1 - lam) g``; ``eps = rho d / ||d||``. The first update uses ``d = g`` and
    sets ``m = g``, as the official code does. The paper's runs use lam = 0.6 and 0.95; the
    default 0.9 is the table's.
    """

    def __init__(
        self,
        params,
        base_optimizer=_SGD,
        rho: float = 0.05,
        sigma: float = 1.0,
        lam: float = 0.9,
        **kwargs: Any,
    ):
        options = {"sigma": sigma, "lam": lam}
        super().__init__(params, base_optimizer, rho, variant="fsam", variant_options=options, **kwargs)


class GCSAM(SAM):
    """SAM with gradient centralization (Hassan et al., 2025) of both passes.

    Each gradient of two or more dimensions loses its mean over every dimension but the
    first, in place (``p.grad`` is centralized); ``eps = rho c / ||c||`` with ``c = GC(g)``,
    and the descent uses ``GC(g_p)``.
    """

    def __init__(self, params, base_optimizer=_SGD, rho: float = 0.05, **kwargs: Any):
        super().__init__(params, base_optimizer, rho, variant="gcsam", **kwargs)


class RSAM(SAM):
    """Random SAM (Liu et al., NeurIPS 2022), in the form Khanh et al. (NeurIPS 2024) analyse.

    Each step: ``noise_step()`` moves to ``w + delta``, ``delta ~ N(0, noise_std^2 I)``;
    the first pass gives ``g_hat``; ``eps = rho (delta + lam g_hat) / ||delta + lam g_hat||``
    from ``w``. ``noise_std=None`` (default, our choice) uses, for each param group, that
    group's ``rho`` over ``sqrt(d)`` with ``d`` the total number of scalar parameters in the
    optimizer, so that ``||delta|| ~ rho``. ``seed`` seeds the optimizer's own generator,
    whose state is saved in ``state_dict``.
    """

    def __init__(
        self,
        params,
        base_optimizer=_SGD,
        rho: float = 0.05,
        lam: float = 1.0,
        noise_std: float | None = None,
        seed: int = 0,
        **kwargs: Any,
    ):
        options = {"lam": lam, "noise_std": noise_std, "seed": seed}
        super().__init__(params, base_optimizer, rho, variant="rsam", variant_options=options, **kwargs)


class GSAM(SAM):
    """Surrogate-gap guided SAM (Zhuang et al., ICLR 2022).

    The ascent is SAM's; the descent gradient is ``g_p - alpha g_perp`` with
    ``g_perp = g - (<g, g_p> / ||g_p||^2) g_p``. The paper lets rho follow the learning
    rate: see ``sam_fused.schedules.LrProportionalRho``.
    """

    def __init__(self, params, base_optimizer=_SGD, rho: float = 0.05, alpha: float = 0.4, **kwargs: Any):
        super().__init__(
            params, base_optimizer, rho, variant="gsam", variant_options={"alpha": alpha}, **kwargs
        )


class LookSAM(SAM):
    """LookSAM (Liu et al., CVPR 2022): a full SAM step every ``k`` steps, cheap steps between.

    Full steps store ``g_v = g_p - (<g_p, g> / ||g||^2) g``; the others take one pass and
    descend along ``g + alpha (||g|| / ||g_v||) g_v``. In the manual loop,
    ``first_step()`` returns False on those steps (the update is already applied).
    """

    def __init__(
        self, params, base_optimizer=_SGD, rho: float = 0.05, k: int = 5, alpha: float = 0.7, **kwargs: Any
    ):
        options = {"k": k, "alpha": alpha}
        super().__init__(params, base_optimizer, rho, variant="looksam", variant_options=options, **kwargs)


class IntervalSAM(SAM):
    """SAM every ``k``-th step and the plain base step otherwise (MosaicML Composer's SAM).

    SAM steps are the 0-based steps ``offset, offset + k, ...``: by default the first step
    of every window of ``k``; ``offset=k - 1`` gives Composer's steps ``k, 2k, ...``.
    ``first_step()`` returns False on the plain steps, which take one pass.
    """

    def __init__(
        self, params, base_optimizer=_SGD, rho: float = 0.05, k: int = 10, offset: int = 0, **kwargs: Any
    ):
        options = {"k": k, "offset": offset}
        super().__init__(params, base_optimizer, rho, variant="interval", variant_options=options, **kwargs)
