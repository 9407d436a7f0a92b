"""Glue between SAM and training frameworks, one module per framework (README, Frameworks).

- ``sam_fused.integrations.lightning``: ``SAMCallback`` for ``lightning.Trainer`` (2.6).
- ``sam_fused.integrations.accelerate``: ``SAMBackward``, accelerate's gradient accumulation
  and fp16 with both passes (1.15).
- ``sam_fused.integrations.transformers``: ``SAMTrainer``, a Hugging Face ``Trainer`` (5.2x).
- ``sam_fused.integrations.timm``: ``register()``, SAM in ``timm.optim.create_optimizer_v2`` (1.0).

Importing ``sam_fused`` or this package imports no framework; each module imports its own.
What is here is shared by them and by ``SAM.step(closure)``'s first call.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from ..engine import StepEngine

__all__ = ["check_closure_loop", "framework_missing", "unwrap"]


def unwrap(optimizer: Any) -> Any:
    """The ``sam_fused.SAM`` inside a framework's optimizer wrapper, or ``optimizer`` itself.

    accelerate's ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer`` both name the
    optimizer they wrap ``.optimizer`` (Lightning's also imitates its class, so ``isinstance``
    cannot tell the wrapper from the SAM); a SAM has no such attribute, and has a step engine.
    """
    found = optimizer
    for _ in range(8):  # wrappers of wrappers, never a cycle
        inner = getattr(found, "optimizer", None)
        if inner is None:
            break
        found = inner
    if not isinstance(getattr(found, "engine", None), StepEngine):
        raise TypeError(
            f"expected a sam_fused.SAM (or a framework's wrapper of one), got {type(optimizer).__name__}"
        )
    return found


def check_closure_loop() -> None:
    """Refuse, at the first ``step(closure)``, a framework loop that cannot run both SAM passes
    through the closure. Reads only frameworks that are already imported.

    accelerate's ``accumulate()`` skips ``optimizer.step(closure)`` (and so the closure) on all
    but the last micro-batch of a window: those micro-batches would never reach SAM.
    """
    state = sys.modules.get("accelerate.state")
    if state is None or not state.GradientState._shared_state:  # no Accelerator was built
        return
    steps = state.GradientState().num_steps
    if steps > 1:
        raise RuntimeError(
            f"step(closure) under accelerate with gradient_accumulation_steps={steps}: "
            "accelerator.accumulate() runs optimizer.step(closure), and so the closure, only on the "
            "last micro-batch of each window, so the others would never reach SAM. Use "
            "sam_fused.integrations.accelerate.SAMBackward, which runs both passes over every "
            "micro-batch (README, Frameworks). If your closure loops over the micro-batches itself, "
            "build the Accelerator with gradient_accumulation_steps=1 and divide the loss yourself."
        )


def framework_missing(exc: ModuleNotFoundError, framework: str, what: str, pins: str) -> NoReturn:
    """Raise the error for a glue module used without its framework: the install to run, with
    the release line the glue is tested with. ``exc`` is raised as it is when what is missing
    is not the framework itself (one of its own dependencies: its message says which)."""
    if exc.name is None or exc.name.split(".")[0] != framework:
        raise exc
    raise ModuleNotFoundError(
        f"{what}, and {framework} is not installed: pip install 'sam_fused[{framework}]' ({pins}, the "
        "release line this glue is tested with)",
        name=framework,
    ) from exc
