"""Part 1: SAM-type methods on a strongly convex quadratic, ``f(x) = x^T A x / 2 - b^T x``.

Why a quadratic: every quantity the seed paper talks about is exact here. The minimizer
``x* = A^{-1} b`` is one solve away, ``f(x) - f* = (x - x*)^T A (x - x*) / 2`` has no
cancellation, and the size of the stall is predictable: near ``x*``, normalized SAM with
step ``t`` and radius ``rho`` moves along an eigenvector ``v`` (eigenvalue ``lam``) as
``e <- (1 - t lam) e - t rho lam sign(e)``, whose 2-cycle has radius
``t rho lam / (2 - t lam)``, largest for ``lam = L``. A constant step therefore leaves the
iterates oscillating at distance ``t rho L / (2 - t L)`` from ``x*``; a diminishing step or
radius shrinks that distance. USAM's perturbation ``rho g`` vanishes at ``x*``, so USAM is
plain gradient descent on a rescaled quadratic and converges with a constant step as long as
``t lam (1 + rho lam) < 2``.

The iterate is an ``nn.Parameter`` in float64 (so floors are the method's, not rounding's),
the loss is computed with torch and differentiated by autograd, and the step is a real
``sam_fused`` optimizer over ``torch.optim.SGD`` (no momentum, no weight decay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import sam_fused
from sam_fused.schedules import PolynomialRho, SeedPaperLR

__all__ = [
    "QUADRATIC_METHODS",
    "QuadConfig",
    "QuadraticProblem",
    "make_problem",
    "predicted_cycle_radius",
    "run_quadratic",
]

# The methods the seed paper analyses (plus plain gradient descent as the reference line).
QUADRATIC_METHODS: dict[str, Any] = {
    "GD": None,
    "SAM": sam_fused.SAM,
    "USAM": sam_fused.USAM,
    "VaSSO": sam_fused.VaSSO,
    "RSAM": sam_fused.RSAM,
    "F-SAM": sam_fused.FSAM,
}
NORMALIZED = ("SAM", "VaSSO", "RSAM", "F-SAM")


@dataclass(frozen=True)
class QuadraticProblem:
    """``A`` (SPD), ``b``, the minimizer and the start point, all float64."""

    A: torch.Tensor
    b: torch.Tensor
    x_star: torch.Tensor
    x0: torch.Tensor
    eigenvalues: torch.Tensor

    @property
    def L(self) -> float:
        return float(self.eigenvalues.max())

    @property
    def mu(self) -> float:
        return float(self.eigenvalues.min())


def make_problem(
    dim: int = 30, mu: float = 0.5, L: float = 5.0, start_distance: float = 10.0, seed: int = 0
) -> QuadraticProblem:
    """A random quadratic with eigenvalues log-spaced in ``[mu, L]`` (condition ``L / mu``).

    A random rotation makes the problem non-separable, so coordinate-wise effects (ASAM,
    F-SAM's EMA) are not favoured by the basis. The start is at ``start_distance`` from
    ``x*`` in a random direction.
    """
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a unique Q for the seed, whatever the LAPACK
    eig = torch.logspace(math.log10(mu), math.log10(L), dim, dtype=torch.float64)
    a = (q * eig) @ q.T
    a = (a + a.T) / 2
    b = torch.randn(dim, generator=gen, dtype=torch.float64)
    x_star = torch.linalg.solve(a, b)
    z = torch.randn(dim, generator=gen, dtype=torch.float64)
    x0 = x_star + start_distance * z / z.norm()
    return QuadraticProblem(a, b, x_star, x0, eig)


@dataclass(frozen=True)
class QuadConfig:
    """One run: a method, a step-size schedule and a radius mode.

    ``rho_mode`` is ``"constant"`` (``rho_k = rho``) or ``"poly"``
    (``rho_k = rho / (k + 1) ** rho_power``, ``k`` counting iterations).
    ``steps_per_epoch`` turns the paper's per-epoch schedules into per-iteration ones.
    """

    method: str
    schedule: str
    rho_mode: str
    steps: int = 1000
    steps_per_epoch: int = 50
    lr: float = 0.2
    rho: float = 0.1
    rho_power: float = 0.6
    seed: int = 0
    dim: int = 30
    mu: float = 0.5
    L: float = 5.0


def predicted_cycle_radius(t: float, rho: float, L: float) -> float:
    """Radius ``t rho L / (2 - t L)`` of normalized SAM's 2-cycle along the top eigenvector."""
    return t * rho * L / (2.0 - t * L)


def _build(cfg: QuadConfig, x: torch.nn.Parameter) -> torch.optim.Optimizer:
    cls = QUADRATIC_METHODS[cfg.method]
    if cls is None:
        return torch.optim.SGD([x], lr=cfg.lr)
    extra: dict[str, Any] = {"seed": cfg.seed} if cls is sam_fused.RSAM else {}
    return cls([x], torch.optim.SGD, rho=cfg.rho, lr=cfg.lr, backend="reference", **extra)


def run_quadratic(cfg: QuadConfig) -> dict[str, Any]:
    """Run one configuration; return its histories (``steps + 1`` points, ``x_0`` first).

    Histories: ``dist`` = ||x_k - x*||, ``grad`` = ||grad f(x_k)||, ``gap`` = f(x_k) - f*,
    plus the last step size and radius used (for the 2-cycle prediction).
    """
    torch.set_num_threads(1)  # identical numbers whatever the process layout
    prob = make_problem(cfg.dim, cfg.mu, cfg.L, seed=cfg.seed)
    a, b, x_star = prob.A, prob.b, prob.x_star
    x = torch.nn.Parameter(prob.x0.clone())
    opt = _build(cfg, x)
    lr_sched = SeedPaperLR(opt, cfg.schedule, steps_per_epoch=cfg.steps_per_epoch)
    rho_sched = None
    if cfg.method != "GD" and cfg.rho_mode == "poly":
        rho_sched = PolynomialRho(opt, power=cfg.rho_power)
    elif cfg.rho_mode not in ("constant", "poly"):
        raise ValueError(f"rho_mode must be 'constant' or 'poly', got {cfg.rho_mode!r}")

    def closure() -> torch.Tensor:
        loss = 0.5 * x @ (a @ x) - b @ x
        loss.backward()
        return loss

    dist = np.empty(cfg.steps + 1)
    grad = np.empty(cfg.steps + 1)
    gap = np.empty(cfg.steps + 1)

    def record(k: int) -> None:
        with torch.no_grad():
            e = x - x_star
            ae = a @ e
            dist[k] = float(e.norm())
            grad[k] = float(ae.norm())  # grad f(x) = A x - b = A (x - x*)
            gap[k] = float(0.5 * (e @ ae))

    record(0)
    last_lr, last_rho = cfg.lr, cfg.rho
    for k in range(cfg.steps):
        last_lr = float(opt.param_groups[0]["lr"])
        last_rho = float(opt.param_groups[0].get("rho", 0.0))
        opt.zero_grad()
        opt.step(closure)
        lr_sched.step()
        if rho_sched is not None:
            rho_sched.step()
        record(k + 1)
    return {
        "config": cfg,
        "dist": dist,
        "grad": grad,
        "gap": gap,
        "last_lr": last_lr,
        "last_rho": last_rho,
        "L": prob.L,
        "mu": prob.mu,
    }
