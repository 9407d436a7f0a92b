"""transformers 5.2x: ``SAMTrainer``, a Hugging Face ``Trainer`` that takes SAM steps.

    trainer = SAMTrainer(model=model, args=TrainingArguments(..., optim="adamw_torch"),
                         train_dataset=train, sam_class=sam_fused.SAM, sam_kwargs={"rho": 0.05})

The plain ``Trainer`` runs forward and backward itself (``training_step``, once per
micro-batch) and then calls ``optimizer.step()`` with no closure: one pass, which SAM
refuses. ``SAMTrainer`` keeps the Trainer's loop and adds the second pass where the loop has
finished the first:

- the optimizer is ``sam_class`` around the base optimizer ``TrainingArguments.optim`` names
  (or ``optimizer_cls_and_kwargs``), on the Trainer's two weight-decay groups; a SAM passed
  as ``optimizers=(sam, scheduler)`` is used as it is;
- ``get_batch_samples`` keeps the accumulation window it fetched (and draws RSAM's noise
  before its first pass);
- in ``on_pre_optimizer_step`` (a callback placed first, so that other callbacks see the
  descent gradient): ``first_step(grad_scaler=...)``, then, when the step has a second
  pass, ``training_step`` over the same window at ``w + eps`` (no gradient sync but on the
  last micro-batch; BatchNorm statistics frozen). The Trainer's own ``optimizer.step()``
  then finishes the SAM step (through accelerate's scaler under fp16), or does nothing after
  a one-pass step (LookSAM, IntervalSAM);
- ``max_grad_norm`` becomes ``SAM.max_grad_norm``: the descent gradient is clipped once,
  after unscaling; the logged ``grad_norm`` is its norm before clipping (none is logged
  without clipping: computing one would cost a pass over the gradients);
- the logged loss is the first pass's (the Trainer sums what its own ``training_step``
  calls return; the second pass's are not counted), as are the FLOs and tokens it counts.

It overrides the Trainer's private ``_clip_grad_norm`` and ``_get_grad_norm`` (under fp16
they would unscale the first pass's gradients before ``first_step``); the tests pin 5.2x.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..batchnorm import frozen_bn_stats
from ..optimizer import SAM
from . import unwrap

__all__ = ["SAMTrainer"]


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer steps are SAM steps (module docs).

    Args:
        sam_class: ``sam_fused.SAM`` or one of its variants' classes (``sam_fused.GSAM``, ...).
        sam_kwargs: the SAM's own arguments (``rho``, variant options, ``backend``).
        freeze_bn_stats: run the second pass inside :func:`sam_fused.frozen_bn_stats` (default True).
        *args, **kwargs: the ``Trainer``'s.
    """

    def __init__(
        self,
        *args: Any,
        sam_class: type[SAM] = SAM,
        sam_kwargs: dict[str, Any] | None = None,
        freeze_bn_stats: bool = True,
        **kwargs: Any,
    ) -> None:
        self.sam_class, self.sam_kwargs = sam_class, dict(sam_kwargs or {})
        self.sam_freeze_bn_stats = freeze_bn_stats
        self._sam_window: tuple[list[Any], Any] = ([], None)
        self._sam_grad_norm: Tensor | None = None
        super().__init__(*args, **kwargs)
        self.callback_handler.callbacks.insert(0, _SAMSecondPass(self))

    # ------------------------------------------------------------------ the optimizer
    @property
    def sam(self) -> SAM:
        """The SAM inside the (prepared) optimizer."""
        return unwrap(self.optimizer)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            base, base_kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
                self.args, model
            )
            # sam_fused fuses the base update itself
            base_kwargs = {k: v for k, v in base_kwargs.items() if k not in ("fused", "foreach")}
            self.optimizer = self.sam_class(
                [g for g in groups if g["params"]], base, **base_kwargs, **self.sam_kwargs
            )
        return self.optimizer

    def _sam_take_clipping(self) -> None:
        """``TrainingArguments.max_grad_norm`` (default 1.0; 0 turns clipping off) to the SAM."""
        sam, clip = self.sam, self.args.max_grad_norm
        if not clip or clip <= 0:
            return
        if sam.max_grad_norm is None:
            try:
                sam.max_grad_norm = float(clip)
            except ValueError as exc:  # LookSAM
                raise ValueError(
                    f"{exc}; pass TrainingArguments(max_grad_norm=0) (its default is 1.0)"
                ) from None
        elif sam.max_grad_norm != float(clip):
            raise ValueError(
                f"TrainingArguments(max_grad_norm={clip}) but the SAM has max_grad_norm="
                f"{sam.max_grad_norm}; set one of them"
            )

    # ------------------------------------------------------------------ the step
    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, Any]:
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._sam_window = (batch_samples, num_items)
        if batch_samples and self.sam.variant.perturbs_before_pass:
            self.sam.noise_step()  # RSAM: the window's first pass runs at w + delta
        return batch_samples, num_items

    def _clip_grad_norm(self, model: nn.Module) -> None:
        return None  # SAM clips the descent gradient in its second step, after unscaling

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Tensor | None:
        # filled once the step is done (the Trainer reads it when it logs, after the step)
        self._sam_grad_norm = (
            None if self.sam.max_grad_norm is None else torch.zeros((), device=self.args.device)
        )
        return self._sam_grad_norm

    def _sam_second_pass(self) -> None:
        sam = self.sam
        if not sam.first_step(zero_grad=True, grad_scaler=self.accelerator.scaler):
            return  # a one-pass step, already applied: optimizer.step() has nothing left to do
        batch_samples, num_items = self._sam_window
        model = self.model_wrapped
        unwrapped = self.accelerator.unwrap_model(model)
        with frozen_bn_stats(unwrapped) if self.sam_freeze_bn_stats else nullcontext():
            for i, inputs in enumerate(batch_samples):
                last = i == len(batch_samples) - 1
                sync = nullcontext if last else functools.partial(self.accelerator.no_sync, model=model)
                with sync():
                    self.training_step(model, inputs, num_items)  # not added to the logged loss

    def _sam_after_step(self) -> None:
        if self._sam_grad_norm is not None:
            sam = self.sam
            norm2 = sam.variant.descent_norm2(sam.engine.status, sam.variant_options)
            self._sam_grad_norm.copy_(norm2.sqrt())


class _SAMSecondPass(TrainerCallback):
    def __init__(self, trainer: SAMTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._sam_take_clipping()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._sam_second_pass()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._sam_after_step()
