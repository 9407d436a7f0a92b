"""Part 3: robustness to noisy labels, SGD against SAM, ASAM, VaSSO, F-SAM and GSAM.

Foret et al. (ICLR 2021, section 4) report SAM's largest gains on CIFAR-10 with 20-80 % of
the training labels flipped. This part asks the same question at CPU scale, on the digits
split of part 2 (same 75/25 stratified split, same standardization):

* **Noise.** Symmetric, on the training labels only: exactly ``round(p n)`` training
  examples, chosen uniformly at random, get a label drawn uniformly from the *other* nine
  classes (so every chosen label really changes, and the realised rate is ``p`` up to one
  example instead of ``p`` up to a binomial draw). The test labels are never touched. The
  noise is seeded by the run's seed, and the draw is nested: the examples flipped at 20 %
  are the first ones flipped at 40 %, with the same new labels.
* **Model and training.** A 64-128-10 ReLU MLP (9610 weights for 1347 training images:
  enough to memorize the flipped labels), minibatch 270 (five nearly equal minibatches per
  epoch), SGD with momentum 0.9, a constant step 0.1, no weight decay, 80 epochs. In that
  regime plain SGD first learns the clean signal (test accuracy peaks within ~10 epochs)
  and then fits the flipped labels (train accuracy on the noisy labels -> 100 %) while its
  clean test accuracy falls: the setting in which SAM is supposed to help. The width and
  the batch are the cheapest that still give that regime within the lab's time budget (a
  64-256-10 MLP with minibatch 256 shows the same picture at 1.7x the cost).
* **What is recorded.** Per epoch: clean test accuracy, training accuracy against the noisy
  labels (what the optimizer sees) and against the clean ones, and the fraction of flipped
  examples predicted as their *wrong* label (how much of the noise is memorized).

Every optimizer is the real ``sam_fused`` class over ``torch.optim.SGD`` on the reference
backend, driven by ``step(closure)`` exactly as in part 2.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import sam_fused

from .digits import accuracy, load_data, make_model

__all__ = [
    "NOISE_METHODS",
    "NoiseConfig",
    "epoch_batches",
    "new_curves",
    "noisy_data",
    "noisy_run_result",
    "record_epoch",
    "run_label_noise",
    "symmetric_noise",
]

# The methods this part compares (SGD and five variants); each is run at a few radii.
NOISE_METHODS = ("SGD", "SAM", "ASAM", "VaSSO", "FSAM", "GSAM")
NUM_CLASSES = 10


@dataclass(frozen=True)
class NoiseConfig:
    """One training run. ``seed`` sets the noise draw, the initialisation and the shuffling."""

    method: str
    rho: float
    noise: float
    seed: int
    epochs: int = 80
    batch_size: int = 270
    lr: float = 0.1
    momentum: float = 0.9
    hidden: int = 128
    split_seed: int = 0


def symmetric_noise(labels: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    """A copy of ``labels`` with exactly ``round(rate * n)`` entries moved to another class.

    The flipped entries are the first ``k`` of a seeded permutation and each gets
    ``(y + offset) % 10`` with ``offset`` uniform in 1..9, i.e. a uniform draw from the other
    nine classes. The permutation and the offsets are drawn for every entry whatever the
    rate, so that a lower rate flips a subset of a higher rate's entries, identically.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    gen = torch.Generator().manual_seed(20_000 + seed)
    order = torch.randperm(len(labels), generator=gen)
    offsets = torch.randint(1, NUM_CLASSES, (len(labels),), generator=gen)
    chosen = order[: round(rate * len(labels))]
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + offsets[chosen]) % NUM_CLASSES
    return noisy


# (x_train, y_train_noisy, y_train_clean, x_test, y_test)
NoisyData = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=8)
def noisy_data(split_seed: int, rate: float, seed: int) -> NoisyData:
    """``(x_train, y_train_noisy, y_train_clean, x_test, y_test)``: noise on the training labels only."""
    x_tr, y_tr, x_te, y_te = load_data(split_seed)
    return x_tr, symmetric_noise(y_tr, rate, seed), y_tr, x_te, y_te


def make_optimizer(model: torch.nn.Module, cfg: NoiseConfig) -> torch.optim.Optimizer:
    """The optimizer for ``cfg.method`` at radius ``cfg.rho``, momentum SGD underneath.

    The variants keep their published options (VaSSO theta = 0.9, F-SAM sigma = 1 and
    lambda = 0.9, GSAM alpha = 0.4); ASAM is the official form of part 2 (eta = 0.01, biases
    not adaptive). GSAM's radius stays constant: its rho_t follows the step size, which is
    constant here.
    """
    params = list(model.parameters())
    common: dict[str, Any] = {"lr": cfg.lr, "momentum": cfg.momentum, "backend": "reference"}
    sgd = torch.optim.SGD
    if cfg.method == "SGD":
        return sgd(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.method == "ASAM":
        weights = [p for p in params if p.dim() > 1]
        biases = [p for p in params if p.dim() <= 1]
        groups = [{"params": weights}, {"params": biases, "adaptive": False}]
        return sam_fused.ASAM(groups, sgd, rho=cfg.rho, **common)
    classes = {"SAM": sam_fused.SAM, "VaSSO": sam_fused.VaSSO, "FSAM": sam_fused.FSAM, "GSAM": sam_fused.GSAM}
    if cfg.method not in classes:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {NOISE_METHODS}")
    return classes[cfg.method](params, sgd, rho=cfg.rho, **common)


def new_curves() -> dict[str, list[float]]:
    """The per-epoch curves a label-noise run records (filled by :func:`record_epoch`)."""
    return {"test": [], "train_noisy": [], "train_clean": [], "memorized": []}


def epoch_batches(
    data: NoisyData, batch_size: int, shuffle: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x, noisy y)`` minibatches in the order ``shuffle`` draws."""
    x_tr, y_noisy = data[0], data[1]
    order = torch.randperm(len(x_tr), generator=shuffle)
    for i in range(0, len(x_tr), batch_size):
        idx = order[i : i + batch_size]
        yield x_tr[idx], y_noisy[idx]


def record_epoch(model: torch.nn.Module, data: NoisyData, curves: dict[str, list[float]]) -> None:
    """Append the clean test accuracy and the fit of the training labels to ``curves``."""
    x_tr, y_noisy, y_clean, x_te, y_te = data
    flipped = y_noisy != y_clean
    # One forward pass over the training set gives all three training-side numbers.
    with torch.no_grad():
        pred = model(x_tr).argmax(dim=1)
    curves["train_noisy"].append(float((pred == y_noisy).float().mean()))
    curves["train_clean"].append(float((pred == y_clean).float().mean()))
    # Fraction of the flipped examples predicted as their wrong label (0 when nothing is flipped).
    memorized = (pred[flipped] == y_noisy[flipped]).float().mean() if flipped.any() else 0.0
    curves["memorized"].append(float(memorized))
    curves["test"].append(accuracy(model, x_te, y_te))


def noisy_run_result(
    cfg: NoiseConfig, data: NoisyData, curves: dict[str, list[float]], passes: int
) -> dict[str, Any]:
    """The record of one run: final and best-epoch metrics, and the curves as arrays."""
    _, y_noisy, y_clean, _, y_te = data
    flipped = y_noisy != y_clean
    test = np.asarray(curves["test"])
    best_epoch = int(np.argmax(test[1:])) + 1  # the untrained model's accuracy does not count
    return {
        "config": cfg,
        "flip_rate": int(flipped.sum()) / len(flipped),  # exact, not a float32 mean
        "n_train": len(y_noisy),
        "n_test": len(y_te),
        "final_test_acc": float(test[-1]),
        "best_test_acc": float(test[best_epoch]),
        "best_epoch": best_epoch,
        "final_train_noisy": curves["train_noisy"][-1],
        "final_train_clean": curves["train_clean"][-1],
        "final_memorized": curves["memorized"][-1],
        "passes": passes,
        **{f"{name}_curve": np.asarray(values) for name, values in curves.items()},
    }


def run_label_noise(cfg: NoiseConfig) -> dict[str, Any]:
    """Train one configuration; return per-epoch curves and the final and best metrics."""
    torch.set_num_threads(1)  # identical numbers whatever the process layout
    start = time.perf_counter()
    data = noisy_data(cfg.split_seed, cfg.noise, cfg.seed)
    model = make_model(cfg.hidden, cfg.seed)
    opt = make_optimizer(model, cfg)
    shuffle = torch.Generator().manual_seed(10_000 + cfg.seed)
    passes = 0
    curves = new_curves()
    record_epoch(model, data, curves)
    for _epoch in range(cfg.epochs):
        for xb, yb in epoch_batches(data, cfg.batch_size, shuffle):

            def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                nonlocal passes
                passes += 1
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            opt.zero_grad()
            opt.step(closure)
        record_epoch(model, data, curves)
    return {**noisy_run_result(cfg, data, curves, passes), "seconds": time.perf_counter() - start}
