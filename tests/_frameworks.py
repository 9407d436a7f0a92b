"""What the framework tests (tests/test_integration_*.py) share; import it before any framework.

The torchvision shim: timm needs torchvision, and PyPI's x86_64 torchvision wheels link
``libtorch_cuda.so``, which a CPU build of torch lacks. torchvision then fails to load its
``_C`` library (it tolerates that) and afterwards registers fake kernels for the operators
``torchvision::nms``/``qnms`` that the library would have defined, which raises "operator
torchvision::nms does not exist" and breaks ``import torchvision`` and, through it, ``import
lightning`` (torchmetrics), ``transformers.Trainer`` and ``import timm``. Defining the two
schemas first lets the import finish; torchvision's C++ operators stay unavailable, and none
of the tests needs them. On a machine whose torchvision loads, this does nothing.

Also here: a small model and data, SAM per variant name, and the manual loop (README) with
accumulation, autocast, a GradScaler and frozen BatchNorm statistics: the independent
computation every framework run is compared with.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sam_fused
from sam_fused import frozen_bn_stats

_SHIM: list[Any] = []  # the torch.library fragment, kept alive


def _torchvision_shim() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations or _SHIM:
        return
    libraries = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C.*"))
    if not libraries:
        return
    try:
        torch.ops.load_library(str(libraries[0]))
        return  # it loads: torchvision defines its operators itself
    except (OSError, RuntimeError):
        pass
    fragment = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        fragment.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SHIM.append(fragment)


_torchvision_shim()


def framework(name: str) -> Any:
    """Import a framework the tests drive. Where scripts/setup_env.sh installed them
    (``SAM_FUSED_REQUIRE_FRAMEWORKS=1``) a missing one fails the run; elsewhere (a machine's
    own Python, ``SAM_FUSED_USE_SYSTEM_PYTHON=1``) its tests are skipped."""
    if os.environ.get("SAM_FUSED_REQUIRE_FRAMEWORKS") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)


@contextmanager
def isolated_run() -> Iterator[None]:
    """One framework test: one thread (the CI machine's cores are shared), and afterwards no
    accelerate state left behind (accelerate keeps it in process-wide singletons, which a
    later Accelerator, and SAM's first step(closure), would read)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        state = sys.modules.get("accelerate.state")
        if state is not None:
            state.AcceleratorState._reset_state(reset_partial_state=True)
            state.GradientState._reset_state()


# ---------------------------------------------------------------------------- model and data
class Net(nn.Module):
    """A small regression net; ``bn=True`` adds a BatchNorm1d (frozen in the second pass)."""

    def __init__(self, bn: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12) if bn else nn.Identity(), nn.Tanh())
        self.head = nn.Linear(12, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def batches(count: int, size: int = 8, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1000 + seed)
    return [(torch.randn(size, 6, generator=g), torch.randn(size, 1, generator=g)) for _ in range(count)]


def loss_of(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x).float(), y)


# variant name -> class and the options that make a short run exercise it
VARIANTS: dict[str, tuple[type, dict[str, Any]]] = {
    "sam": (sam_fused.SAM, {}),
    "asam": (sam_fused.ASAM, {}),
    "vasso": (sam_fused.VaSSO, {}),
    "gsam": (sam_fused.GSAM, {}),
    "rsam": (sam_fused.RSAM, {}),
    "looksam": (sam_fused.LookSAM, {"k": 2}),
    "interval": (sam_fused.IntervalSAM, {"k": 2}),
}


def make_sam(name: str, params: Any, **kwargs: Any) -> sam_fused.SAM:
    cls, options = VARIANTS[name]
    return cls(params, torch.optim.SGD, **{"rho": 0.05, "lr": 0.05, "momentum": 0.9, **options, **kwargs})


# ---------------------------------------------------------------------------- the manual loop
def manual_step(
    model: nn.Module,
    opt: sam_fused.SAM,
    window: list[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor] = loss_of,
    *,
    divide: bool = True,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    freeze_bn: bool = False,
) -> float:
    """One SAM step over an accumulation window (each micro-batch's loss divided by the
    window's size when ``divide``), the README's loop; returns the first pass's summed loss."""
    n = len(window) if divide else 1

    def one_pass() -> float:
        total = 0.0
        for micro in window:
            with torch.autocast("cpu", dtype=autocast) if autocast else nullcontext():
                loss = loss_fn(model, micro) / n
            (scaler.scale(loss) if scaler else loss).backward()
            total += float(loss)
        return total

    if opt.variant.perturbs_before_pass:
        opt.noise_step()
    first = one_pass()
    if opt.first_step(zero_grad=True, grad_scaler=scaler):
        with frozen_bn_stats(model) if freeze_bn else nullcontext():
            one_pass()
        opt.second_step(zero_grad=True)
    opt.zero_grad()
    if scaler is not None:
        scaler.update()
    return first


def weights(model: nn.Module) -> list[Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def assert_same(got: list[Tensor], want: list[Tensor], what: str, exact: bool = True) -> None:
    """Bit for bit (``exact``), else to float32 rounding; and something trained at all."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if exact:
            assert torch.equal(a, b), f"{what}: tensor {i} differs by {(a.double() - b.double()).abs().max()}"
        else:
            torch.testing.assert_close(
                a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"{what}: tensor {i}: {m}"
            )
