"""Part 4: cost against benefit. Which cheap SAM variant keeps SAM's gain at SGD's cost?

The setting is part 3's (:mod:`lab.label_noise`: digits, 20 % and 40 % of the training
labels flipped, momentum SGD, 80 epochs, seeds 0-4), with one change that every method
shares: a LayerNorm after the hidden layer (:class:`NormMLP`), so that SAM-ON has
normalization parameters to perturb. It is there for SGD too, so the comparison is between
optimizers on one model.

Each method is one :class:`CostMethod` entry: how to build its optimizer and which training
loop drives it, written against the public API only:

* ``"sgd"``: one backward, ``opt.step()`` (plain ``torch.optim.SGD``);
* ``"two_pass"``: SAM's loop, ``first_step()`` then a second backward and ``second_step()``;
* ``"first_step"``: the loop of LookSAM, IntervalSAM, AESAM and SAMWindow, where
  ``first_step()`` returns False on a one-pass step (the update is then already done);
* ``"msam"``: one backward and ``opt.step()``, every evaluation inside ``opt.unperturbed()``
  (MSAM keeps the weights at its ascent point ``w~`` between steps).

Gradient evaluations are counted, not assumed: a hook on the output layer's weight fires
once per backward pass that reaches the model, whichever code called it. Wall time per epoch
is measured around the minibatch loop only (the per-epoch evaluation is excluded), with the
process's CPU time beside it: each run computes on one thread, so on an idle core the two
agree, and when other processes share the machine the CPU time is the figure that does not
depend on them.
"""

from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import sam_fused

from .label_noise import NoiseConfig, epoch_batches, new_curves, noisy_data, noisy_run_result, record_epoch

__all__ = ["COST_METHODS", "CostMethod", "NormMLP", "missing_api", "run_cost", "total_steps"]


class NormMLP(torch.nn.Module):
    """Part 3's 64-hidden-10 MLP with a LayerNorm after the hidden layer.

    LayerNorm, not BatchNorm: it has no running statistics, so a model evaluates the same
    function in training and evaluation mode, and no method's extra passes (SAM's second
    pass at ``w + eps``, MSAM's passes at ``w~``) leave statistics behind that another
    method would not. The attribute is called ``norm`` so that selection by module type
    and selection by name (SAM-ON's official code looks for 'norm' or 'bn') agree.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(64, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.out = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.hidden(x))))


def total_steps(cfg: NoiseConfig, n_train: int) -> int:
    """Optimizer steps in a run: one per minibatch (AESAM's ``T``, SAMWindow's reference)."""
    return cfg.epochs * -(-n_train // cfg.batch_size)


Build = Callable[[NormMLP, NoiseConfig, int], Any]


@dataclass(frozen=True)
class CostMethod:
    """One method of part 4: its optimizer (``build(model, cfg, T)``) and its loop.

    ``build`` returns the optimizer, or ``(optimizer, keep)`` when something else must stay
    alive during training (SAMWindow's window object). ``needs`` names the ``sam_fused``
    attributes the entry uses, so that a missing one is reported before anything runs.
    """

    loop: str
    build: Build
    needs: tuple[str, ...] = ()


# The foreach backend (pure PyTorch over flat buffers): the fused path that runs on any
# machine without compiling the C++ library, so the lab's numbers do not depend on a compiler.
BACKEND = "foreach"


def _base(cfg: NoiseConfig) -> dict[str, Any]:
    # Part 3's base optimizer for every method: momentum SGD, no weight decay.
    return {"lr": cfg.lr, "momentum": cfg.momentum}


def _sam_kwargs(cfg: NoiseConfig) -> dict[str, Any]:
    return {"rho": cfg.rho, "backend": BACKEND, **_base(cfg)}


def _sam_window(model: NormMLP, cfg: NoiseConfig, steps: int) -> tuple[Any, Any]:
    from sam_fused.schedules import SAMWindow

    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, **_sam_kwargs(cfg))
    # SAM for the last 20 % of the steps, keeping the momentum buffer across the switch.
    return opt, SAMWindow(opt, start=int(0.8 * steps), end=None, reset_momentum=False)


def _whole_model(name: str, loop: str) -> CostMethod:
    """``sam_fused.<name>`` over momentum SGD, every parameter in one group."""
    build = lambda m, c, t: getattr(sam_fused, name)(m.parameters(), torch.optim.SGD, **_sam_kwargs(c))
    return CostMethod(loop, build, (name,))


COST_METHODS: dict[str, CostMethod] = {
    "SGD": CostMethod("sgd", lambda m, c, t: torch.optim.SGD(m.parameters(), **_base(c))),
    "SAM": _whole_model("SAM", "two_pass"),  # Foret et al., ICLR 2021
    "LookSAM": _whole_model("LookSAM", "first_step"),  # Liu et al., CVPR 2022
    "IntervalSAM": _whole_model("IntervalSAM", "first_step"),  # MosaicML Composer
    "MSAM": _whole_model("MSAM", "msam"),  # Becker et al., 2024
    "AESAM": CostMethod(  # Jiang et al., ICLR 2023: its c_t runs over the whole training
        "first_step",
        lambda m, c, t: sam_fused.AESAM(m.parameters(), torch.optim.SGD, total_steps=t, **_sam_kwargs(c)),
        ("AESAM",),
    ),
    "SAM-ON": CostMethod(  # Mueller et al., NeurIPS 2023
        "two_pass",
        # The official recipe: elementwise adaptive (ASAM-ON) with eta = 0 on the norm layers only.
        lambda m, c, t: sam_fused.SAM(
            sam_fused.norm_param_groups(m), torch.optim.SGD, adaptive=True, eta=0.0, **_sam_kwargs(c)
        ),
        ("SAM", "norm_param_groups"),
    ),
    "SAMWindow": CostMethod(
        "first_step", _sam_window, ("SAM", "schedules.SAMWindow")
    ),  # Zhou et al., ICLR 2025
}


def missing_api(methods: list[str] | tuple[str, ...]) -> list[str]:
    """``"method: sam_fused.X"`` for every name an entry needs that this install lacks."""
    missing = []
    for name in methods:
        for needed in COST_METHODS[name].needs:
            module, _, attr = f"sam_fused.{needed}".rpartition(".")
            if not hasattr(importlib.import_module(module), attr):
                missing.append(f"{name}: sam_fused.{needed}")
    return missing


def _train_step(loop: str, opt: Any, backward: Callable[[], None]) -> None:
    """One optimizer step of ``loop`` on the current minibatch (``backward`` runs one pass)."""
    opt.zero_grad()
    backward()
    if loop in ("sgd", "msam"):
        opt.step()
    elif loop == "two_pass":
        if not opt.first_step(zero_grad=True):
            raise RuntimeError("a SAM step's first_step() returned False: it skipped its second pass")
        backward()
        opt.second_step(zero_grad=True)
    elif loop == "first_step":
        if opt.first_step(zero_grad=True):  # False: a one-pass step, already applied
            backward()
            opt.second_step(zero_grad=True)
    else:
        raise ValueError(f"unknown loop {loop!r}")


def _evaluation(loop: str, opt: Any) -> contextlib.AbstractContextManager:
    # MSAM's weights sit at w~ between steps; every measurement is taken at w.
    return opt.unperturbed() if loop == "msam" else contextlib.nullcontext()


def run_cost(cfg: NoiseConfig) -> dict[str, Any]:
    """Train one method of part 4; part 3's record plus counted gradient evaluations and timing."""
    torch.set_num_threads(1)  # identical numbers whatever the process layout
    start = time.perf_counter()
    entry = COST_METHODS[cfg.method]
    data = noisy_data(cfg.split_seed, cfg.noise, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = NormMLP(cfg.hidden)
    steps = total_steps(cfg, len(data[0]))
    built = entry.build(model, cfg, steps)
    opt = built[0] if isinstance(built, tuple) else built  # the rest (a window) stays alive here
    backward_passes = 0

    def count(grad: torch.Tensor) -> None:
        nonlocal backward_passes
        backward_passes += 1

    hook = model.out.weight.register_hook(count)
    shuffle = torch.Generator().manual_seed(10_000 + cfg.seed)
    curves = new_curves()
    with _evaluation(entry.loop, opt):
        record_epoch(model, data, curves)
    epoch_seconds, epoch_cpu_seconds = [], []
    for _epoch in range(cfg.epochs):
        tick, cpu_tick = time.perf_counter(), time.process_time()
        for xb, yb in epoch_batches(data, cfg.batch_size, shuffle):
            _train_step(entry.loop, opt, lambda xb=xb, yb=yb: F.cross_entropy(model(xb), yb).backward())
        epoch_seconds.append(time.perf_counter() - tick)
        epoch_cpu_seconds.append(time.process_time() - cpu_tick)
        with _evaluation(entry.loop, opt):
            record_epoch(model, data, curves)
    hook.remove()
    return {
        **noisy_run_result(cfg, data, curves, backward_passes),
        "steps": steps,
        "grad_evals_per_step": backward_passes / steps,
        # The median: robust to another process taking the core for a moment.
        "epoch_seconds": statistics.median(epoch_seconds),
        "epoch_cpu_seconds": statistics.median(epoch_cpu_seconds),
        "seconds": time.perf_counter() - start,
    }
