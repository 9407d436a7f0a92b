"""Part 2: SGD and every SAM variant on scikit-learn's digits with a small MLP.

Why digits: it ships with scikit-learn (no download), a 64-64-10 MLP trains in about a
second on one CPU core, and several seeds per configuration fit in the lab's budget, so the
table can say whether a difference is larger than the seed-to-seed spread. The setting
follows the seed paper's experiments where it can: SGD without momentum, base step 0.1,
minibatch 128, the paper's per-epoch step schedules, rho = 0.05 for SAM. Weight decay is 0
so that the final gradient norm measures stationarity of the training loss itself.

Every variant uses its class's published defaults (``sam_fused.family``); nothing here is
tuned per method. Two choices are ours and documented in ``docs/convergence.md``: ASAM
in its official form (weights adaptive with eta = 0.01, biases in a non-adaptive group,
rho = 0.5) and GSAM with its radius following the step size (``LrProportionalRho`` with
``rho_min = 0``, ``lr_min = 0``), as the GSAM paper schedules it.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import sam_fused
from sam_fused.schedules import LrProportionalRho, SeedPaperLR

__all__ = ["DIGITS_METHODS", "DigitsConfig", "load_data", "make_optimizer", "run_digits", "sharpness"]

DIGITS_METHODS = (
    "SGD",
    "SAM",
    "USAM",
    "ASAM",
    "VaSSO",
    "FSAM",
    "GCSAM",
    "RSAM",
    "GSAM",
    "LookSAM",
    "IntervalSAM",
)


@dataclass(frozen=True)
class DigitsConfig:
    """One training run. ``seed`` sets the initialisation, the shuffling and RSAM's noise."""

    method: str
    schedule: str
    seed: int
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.1
    rho: float = 0.05
    hidden: int = 64
    sharpness_rho: float = 0.05
    split_seed: int = 0


@functools.lru_cache(maxsize=2)
def load_data(split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits, split 75/25 (stratified, fixed seed), standardized with the training statistics.

    Cached per process: each worker loads it once.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=split_seed, stratify=y)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0  # constant (always-blank) pixels stay 0 instead of becoming NaN
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
    as_y = lambda a: torch.tensor(a, dtype=torch.long)
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


def make_model(hidden: int, seed: int) -> torch.nn.Module:
    """The 64-hidden-10 ReLU MLP, initialised from ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def make_optimizer(
    method: str, model: torch.nn.Module, cfg: DigitsConfig
) -> tuple[torch.optim.Optimizer, Callable[[torch.optim.Optimizer], Any] | None]:
    """The optimizer for ``method`` and, for GSAM, a factory of its radius schedule.

    All SAM variants wrap ``torch.optim.SGD`` without momentum or weight decay and keep
    their published defaults except ``rho`` (``cfg.rho``; ASAM keeps its own 0.5).
    """
    params = list(model.parameters())
    common: dict[str, Any] = {"lr": cfg.lr, "backend": "reference"}
    sgd = torch.optim.SGD
    if method == "SGD":
        return torch.optim.SGD(params, lr=cfg.lr), None
    if method == "ASAM":
        weights = [p for p in params if p.dim() > 1]
        biases = [p for p in params if p.dim() <= 1]
        groups = [{"params": weights}, {"params": biases, "adaptive": False}]
        return sam_fused.ASAM(groups, sgd, **common), None
    simple = {
        "SAM": sam_fused.SAM,
        "USAM": sam_fused.USAM,
        "VaSSO": sam_fused.VaSSO,
        "FSAM": sam_fused.FSAM,
        "GCSAM": sam_fused.GCSAM,
        "GSAM": sam_fused.GSAM,
        "LookSAM": sam_fused.LookSAM,
        "IntervalSAM": sam_fused.IntervalSAM,
    }
    if method == "RSAM":
        return sam_fused.RSAM(params, sgd, rho=cfg.rho, seed=cfg.seed, **common), None
    if method not in simple:
        raise ValueError(f"unknown method {method!r}; choose one of {DIGITS_METHODS}")
    opt = simple[method](params, sgd, rho=cfg.rho, **common)
    rho_schedule = None
    if method == "GSAM":
        rho_schedule = lambda o: LrProportionalRho(o, rho_min=0.0, lr_min=0.0)
    return opt, rho_schedule


def full_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy over a whole set, without gradients."""
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def sharpness(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float) -> tuple[float, float]:
    """``(L(w + eps) - L(w), ||g||)`` with ``eps = rho g / ||g||``, ``g`` the full-set gradient.

    The same first-order worst-case probe SAM itself uses, so one number is comparable across
    methods; computed on a copy, so the trained model and its optimizer are untouched.
    """
    probe = copy.deepcopy(model)
    params = list(probe.parameters())
    loss = F.cross_entropy(probe(x), y)
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads))
    with torch.no_grad():
        if norm > 0:
            for p, g in zip(params, grads):
                p.add_(g, alpha=rho / float(norm))
        perturbed = float(F.cross_entropy(probe(x), y))
    return perturbed - float(loss.detach()), float(norm)


def run_digits(cfg: DigitsConfig) -> dict[str, Any]:
    """Train one configuration; return final metrics and per-epoch curves.

    The step schedule is the paper's, stepped once per epoch. Every optimizer is driven by
    ``step(closure)``, the one loop that suits them all (RSAM's noise pass and the one-pass
    reuse steps of LookSAM and interval SAM happen inside it); the closure counts the
    forward/backward passes, so the table can show what each method cost.
    """
    torch.set_num_threads(1)  # identical numbers whatever the process layout
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_data(cfg.split_seed)
    model = make_model(cfg.hidden, cfg.seed)
    opt, rho_factory = make_optimizer(cfg.method, model, cfg)
    lr_sched = SeedPaperLR(opt, cfg.schedule)
    rho_sched = rho_factory(opt) if rho_factory is not None else None
    shuffle = torch.Generator().manual_seed(10_000 + cfg.seed)
    passes = 0
    train_curve = [full_loss(model, x_tr, y_tr)]
    test_curve = [accuracy(model, x_te, y_te)]
    n = len(x_tr)
    for _epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=shuffle)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb, yb = x_tr[idx], y_tr[idx]

            def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                nonlocal passes
                passes += 1
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            opt.zero_grad()
            opt.step(closure)
        lr_sched.step()
        if rho_sched is not None:
            rho_sched.step()
        train_curve.append(full_loss(model, x_tr, y_tr))
        test_curve.append(accuracy(model, x_te, y_te))
    sharp, grad_norm = sharpness(model, x_tr, y_tr, cfg.sharpness_rho)
    return {
        "config": cfg,
        "test_acc": test_curve[-1],
        "train_loss": train_curve[-1],
        "grad_norm": grad_norm,
        "sharpness": sharp,
        "passes": passes,
        "train_curve": np.asarray(train_curve),
        "test_curve": np.asarray(test_curve),
        "seconds": time.perf_counter() - start,
    }
