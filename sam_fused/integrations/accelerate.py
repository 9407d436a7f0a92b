"""accelerate 1.15: ``SAMBackward``, both SAM passes under ``accumulate()`` and fp16.

    model, optimizer, loader = accelerator.prepare(model, SAM(...), loader)
    backward = SAMBackward(accelerator, model, optimizer, lambda batch: loss_fn(model(batch[0]), batch[1]))
    for batch in loader:
        with accelerator.accumulate(model):
            loss = backward(batch)      # instead of accelerator.backward(loss)
            optimizer.step()            # accelerate's: finishes the SAM step on the window's last micro-batch
            optimizer.zero_grad()

What accelerate does with a SAM and why the helper exists:

- ``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, which forwards
  ``step``, ``zero_grad``, the state and the param groups but not ``first_step``:
  :func:`unwrap` returns the SAM for the manual loop. ``save_state``/``load_state`` go through
  SAM's ``state_dict`` and work as they are.
- ``optimizer.step(closure)`` without accumulation (fp32, bf16) runs both passes through the
  closure, as in any loop. Under ``accumulate()`` the wrapper skips ``step`` and the closure
  on all but a window's last micro-batch (refused by SAM's first ``step(closure)``), and under
  fp16 it hands the closure to ``GradScaler.step``, which checks the scale and overflows
  before the closure runs (torch's assertion). The helper runs the first pass of each
  micro-batch as it comes, and on the window's last one ``first_step(grad_scaler=...)`` and
  the second pass over the whole window (no gradient sync but on the last, BatchNorm
  statistics frozen); accelerate's own ``optimizer.step()`` then finishes the SAM step
  through its scaler (one ``update()`` per step), or does nothing after a one-pass step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from accelerate import Accelerator
from torch import Tensor, nn

from ..batchnorm import frozen_bn_stats
from . import unwrap

__all__ = ["SAMBackward", "unwrap"]


class SAMBackward:
    """``accelerator.backward`` for SAM: call it on every micro-batch, inside
    ``accelerator.accumulate(model)`` when accumulating, then ``optimizer.step()``.

    Args:
        accelerator: the ``Accelerator`` that prepared ``model`` and ``optimizer``.
        model: the prepared model (its BatchNorm layers are frozen in the second pass, and
            gradient sync is held back on all but the window's last micro-batch).
        optimizer: the prepared optimizer (or the SAM itself).
        loss_fn: ``batch -> loss``, a scalar; accelerate divides it by the accumulation steps.
        freeze_bn_stats: run the second pass inside :func:`sam_fused.frozen_bn_stats`
            (default True).

    Returns (on each call) the first pass's loss of the micro-batch, detached.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: Any,
        loss_fn: Callable[[Any], Tensor],
        freeze_bn_stats: bool = True,
    ) -> None:
        self.accelerator, self.model, self.loss_fn = accelerator, model, loss_fn
        self.sam = unwrap(optimizer)
        self.freeze_bn_stats = freeze_bn_stats
        self._window: list[Any] = []  # the accumulation window's micro-batches so far

    def __call__(self, batch: Any) -> Tensor:
        accelerator, sam = self.accelerator, self.sam
        if not self._window and sam.variant.perturbs_before_pass:
            sam.noise_step()  # RSAM: the whole window's first pass runs at w + delta
        self._window.append(batch)
        loss = self.loss_fn(batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            window, self._window = self._window, []
            if sam.first_step(zero_grad=True, grad_scaler=accelerator.scaler):
                self._second_pass(window)
        return loss.detach()

    def _second_pass(self, window: list[Any]) -> None:
        accelerator = self.accelerator
        frozen = (
            frozen_bn_stats(accelerator.unwrap_model(self.model)) if self.freeze_bn_stats else nullcontext()
        )
        with frozen:
            for i, batch in enumerate(window):
                last = i == len(window) - 1
                with nullcontext() if last else accelerator.no_sync(self.model):
                    accelerator.backward(self.loss_fn(batch))
