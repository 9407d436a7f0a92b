"""Helpers shared by several test files: models, batches, losses, the SAM loop, run copies.

Each test file keeps its own small configuration (its model's widths, its batch size and
seeds: the numbers its tests were written for) as a one-line ``make_model`` / ``batch``
over the builders here, so what a model or a step *is* is defined once.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def copy_run_state(
    source: tuple[list[torch.Tensor], object], target: tuple[list[torch.Tensor], object]
) -> None:
    """Make ``target``'s weights and optimizer state equal ``source``'s, in place.

    Two backends compared over several steps would otherwise drift apart by rounding (one
    bf16 ulp in the state grows into many ulps of small weights); resetting the second
    run to the first one before each step makes every step start from identical inputs.
    """
    (src_params, src_opt), (dst_params, dst_opt) = source, target
    for ps, pt in zip(src_params, dst_params, strict=True):
        pt.copy_(ps)
        for key, value in src_opt.state[ps].items():
            if key != "step":
                dst_opt.state[pt][key].copy_(value)


def mlp(
    widths: list[int],
    *,
    seed: int = 0,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    activation: type[nn.Module] = nn.Tanh,
    final_activation: bool = False,
    norm: type[nn.Module] | None = None,
    init_std: float | None = None,
) -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` between them (and after the last
    when ``final_activation``), ``norm(width)`` after each hidden linear layer when given.

    The weights are torch's default initialisation drawn after ``torch.manual_seed(seed)``,
    or ``N(0, init_std^2)`` from a generator of that seed when ``init_std`` is given.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        last = i == len(widths) - 2
        if norm is not None and not last:
            layers.append(norm(fan_out))
        if not last or final_activation:
            layers.append(activation())
    model = nn.Sequential(*layers)
    if init_std is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    return model.to(device=device, dtype=dtype)


def regression_batch(
    seed: int,
    n: int,
    inputs: int,
    outputs: int,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    draw: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """``n`` standard normal inputs and targets from a generator of ``seed``, drawn in
    ``draw`` and cast to ``dtype`` (so float32 and float64 runs see the same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=gen, dtype=draw)
    y = torch.randn(n, outputs, generator=gen, dtype=draw)
    return x.to(device, dtype), y.to(device, dtype)


def classification_batch(
    seed: int, n: int, inputs: int, classes: int, device: Any = "cpu"
) -> tuple[Tensor, Tensor]:
    """``n`` standard normal inputs and uniform class labels from a generator of ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x.to(device), y.to(device)


def mse_loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(model(x), y)


def cross_entropy_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy, with the inputs cast to the model's dtype (bfloat16/float16 models)."""
    return F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)


def sam_step(model: nn.Module, opt: Any, x: Tensor, y: Tensor, loss_of: Any = mse_loss_of) -> Tensor:
    """The README's loop for one batch: RSAM's noise step first, the first pass, and the second
    pass only when ``first_step()`` asks for it (LookSAM/IntervalSAM one-pass steps do not).
    Returns the first pass's loss, detached."""
    if opt.variant.perturbs_before_pass:
        opt.noise_step()
    loss = loss_of(model, x, y)
    loss.backward()
    if opt.first_step(zero_grad=True):
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
    return loss.detach()
