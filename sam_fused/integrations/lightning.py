"""Lightning 2.6: ``SAMCallback`` makes ``lightning.Trainer`` run both SAM passes.

    trainer = lightning.Trainer(callbacks=[SAMCallback()], precision="bf16-mixed",
                                gradient_clip_val=1.0, accumulate_grad_batches=4)

Without it, automatic optimization hands SAM a closure (``training_step``, ``zero_grad``,
``backward``) and ``step(closure)`` runs it once per pass: that trains correctly in fp32 and
bf16 without accumulation or clipping. What it cannot do, and the callback does:

- **fp16** (``16-mixed``): Lightning's plugin runs the closure once and calls
  ``scaler.step(opt)``, one pass (refused by SAM). The callback runs pass 1,
  ``first_step(grad_scaler=...)``, pass 2, then ``scaler.step(opt)`` and ``scaler.update()``.
- **accumulate_grad_batches**: Lightning runs all but the window's last micro-batch outside
  ``step`` (refused by SAM's first-call check). The callback keeps the window's batches and
  runs the second pass over all of them (``training_step`` at ``w + eps``, no all-reduce but
  the last, loss divided by the window size as in the first pass).
- **gradient_clip_val**: Lightning would clip after each pass (and under mixed precision
  refuses an optimizer with ``_step_supports_amp_scaling``). The callback hands the value to
  ``SAM.max_grad_norm``, which clips the descent gradient by its global norm.
- Hooks: ``on_before_optimizer_step`` runs once, with the descent gradient; the loss that
  Lightning reports (progress bar, ``on_train_batch_end``) is the first pass's; BatchNorm
  statistics are not updated by the second pass (``freeze_bn_stats``); RSAM's noise is drawn
  before the window's first micro-batch.
- **Manual optimization**: ``opt.first_step(...)``, the second pass, then ``opt.step()``,
  which finishes the SAM step and counts ``trainer.global_step`` (without the callback that
  ``opt.step()`` is refused: Lightning passes a closure, and the weights are perturbed).
  ``opt.second_step()`` instead of ``opt.step()`` (the popular recipe) works with or without
  the callback in fp32 and bf16, and counts ``global_step`` too (:func:`count_step`); under
  fp16 the callback's ``opt.step()`` is the way, since it runs ``scaler.step`` and ``update``.

The callback mixes ``optimizer_step`` and ``clip_gradients`` into the Trainer's precision
plugin (whichever it is) for the run, and uses Lightning hooks of the 2.6 releases that are
not public (``_training_step``, ``_build_kwargs``, the strategy's ``backward``, the closure's
``_result``; to count manual steps, ``LightningOptimizer._on_before_step``/``_on_after_step``
and the manual loop's ``optim_step_progress``); the tests pin 2.6.x.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch.optim import Optimizer  # a sam_fused.SAM (its class is above this module)

from . import framework_missing, unwrap

try:
    import lightning.pytorch as pl
except ModuleNotFoundError as exc:
    what = "sam_fused.integrations.lightning is the glue for lightning.Trainer"
    framework_missing(exc, "lightning", what, "lightning>=2.6.6,<2.7")
from lightning.pytorch.core.optimizer import LightningOptimizer, do_nothing_closure
from lightning.pytorch.loops.utilities import _block_parallel_sync_behavior
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities import GradClipAlgorithmType

from ..batchnorm import frozen_bn_stats

__all__ = ["SAMCallback", "count_step", "grad_scaler"]


def grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The Trainer's GradScaler (``16-mixed``), for ``first_step(grad_scaler=...)`` in manual
    optimization; None under other precisions."""
    return getattr(trainer.precision_plugin, "scaler", None)


def count_step(optimizer: Any, one_pass: bool = False) -> None:
    """A SAM step that ended in a call on Lightning's ``LightningOptimizer`` (``self.optimizers()``
    in manual optimization: ``first_step()`` / ``second_step()`` without ``opt.step()``) counts
    in ``trainer.global_step``, as ``opt.step()`` would count it: Lightning counts the steps
    that go through ``LightningOptimizer.step()`` only, so ``max_steps``, step-based
    checkpoints and schedules would otherwise never see these. A one-pass step under
    ``SAMCallback`` may still be finished by ``opt.step()``, which counts it: it is counted at
    the end of the batch unless ``opt.step()`` came. (Through ``opt.step()`` SAM's own calls
    are made on the SAM, not on this wrapper: counted once.)"""
    if not isinstance(optimizer, LightningOptimizer):
        return
    plugin = optimizer._strategy.precision_plugin if optimizer._strategy is not None else None
    if one_pass and isinstance(plugin, _SAMPrecision):
        plugin._sam_callback.uncounted = True
        return
    optimizer._on_before_step()
    optimizer._on_after_step()


def _sam(optimizer: Any) -> Optimizer | None:
    try:
        return unwrap(optimizer)
    except TypeError:
        return None


class _SAMPrecision:
    """Mixed into the Trainer's precision plugin: Optimizer's passes around Lightning's closure."""

    _sam_callback: SAMCallback

    def clip_gradients(
        self,
        optimizer: Any,
        clip_val: float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if _sam(optimizer) is None:
            super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)
        # a SAM clips its descent gradient in second_step (max_grad_norm, set at fit start)

    def optimizer_step(
        self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        sam = _sam(optimizer)
        if sam is None:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if not model.automatic_optimization and closure is do_nothing_closure:
            # manual optimization: the user ran first_step() and the second pass; finish
            self._sam_callback.uncounted = False  # opt.step() counts this step
            self._after_closure(model, optimizer)
            return self._sam_finish(sam, kwargs)
        return self._sam_passes(sam, model, optimizer, closure, kwargs)

    def _sam_passes(
        self,
        sam: Optimizer,
        model: pl.LightningModule,
        optimizer: Any,
        closure: Callable[[], Any],
        kwargs: dict,
    ) -> Any:
        automatic = model.automatic_optimization
        # RSAM's noise (under automatic optimization: drawn before the window's first micro-batch)
        if sam.variant.perturbs_before_pass and not automatic:
            sam.noise_step()
        first = closure()  # pass 1 of the window's last micro-batch (the others ran before)
        reported = getattr(closure, "_result", None)
        if first is None and automatic:  # training_step returned None: Lightning skips the step
            sam.abort_step()
            return None
        if sam.first_step(zero_grad=True, grad_scaler=grad_scaler(model.trainer)):
            callback = self._sam_callback
            with torch.enable_grad(), frozen_bn_stats(model) if callback.freeze_bn_stats else nullcontext():
                if automatic:
                    self._sam_replay(model.trainer, optimizer, callback.window[:-1])
                closure()
            if reported is not None:
                closure._result = reported  # what Lightning reports: the first pass's loss
        self._after_closure(model, optimizer)  # on_before_optimizer_step: the descent gradient
        self._sam_finish(sam, kwargs)
        return first

    @staticmethod
    def _sam_replay(trainer: pl.Trainer, optimizer: Any, batches: list[tuple[Any, int]]) -> None:
        """The second pass of the window's earlier micro-batches, as Lightning ran their first."""
        loop = trainer.fit_loop.epoch_loop
        for batch, batch_idx in batches:
            with _block_parallel_sync_behavior(trainer.strategy, block=True):
                result = loop.automatic_optimization._training_step(
                    loop._build_kwargs(OrderedDict(), batch, batch_idx)
                )
                if result.closure_loss is not None:
                    call._call_strategy_hook(trainer, "backward", result.closure_loss, optimizer)

    def _sam_finish(self, sam: Optimizer, kwargs: dict) -> Any:
        """``step()`` after first_step(): the second step, or nothing after a one-pass step;
        under fp16 through the scaler, which then updates its scale once for the step."""
        scaler = getattr(self, "scaler", None)
        if scaler is None:
            return sam.step()
        out = scaler.step(sam, **kwargs)
        scaler.update()
        return out


class SAMCallback(pl.Callback):
    """Run ``sam_fused.SAM`` (any variant) correctly under ``lightning.Trainer`` (module docs).

    Args:
        freeze_bn_stats: run the second pass inside :func:`sam_fused.frozen_bn_stats`, so
            that BatchNorm running statistics see each batch once, at ``w`` (default True).
    """

    def __init__(self, freeze_bn_stats: bool = True) -> None:
        self.freeze_bn_stats = freeze_bn_stats
        self.window: list[tuple[Any, int]] = []  # (batch, batch_idx) of the accumulation window
        self._plugin_class: type | None = None
        self.uncounted = False  # a manual one-pass step, not counted yet (count_step)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.strategy.handles_gradient_accumulation and trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"SAMCallback: {type(trainer.strategy).__name__} accumulates gradients itself, so the "
                "second pass could not see the window; use accumulate_grad_batches=1"
            )
        plugin = trainer.strategy.precision_plugin
        if not isinstance(plugin, _SAMPrecision):
            self._plugin_class = type(plugin)
            plugin.__class__ = type(f"SAM{type(plugin).__name__}", (_SAMPrecision, type(plugin)), {})
        plugin._sam_callback = self
        self.window, self.uncounted = [], False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._plugin_class is not None:
            trainer.strategy.precision_plugin.__class__ = self._plugin_class
            self._plugin_class = None
        self.window = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sams = [sam for sam in map(_sam, trainer.optimizers) if sam is not None]
        if not sams:
            raise ValueError("SAMCallback: configure_optimizers returned no sam_fused.SAM optimizer")
        clip = trainer.gradient_clip_val
        if not clip:
            return
        algorithm = trainer.gradient_clip_algorithm
        if algorithm not in (None, GradClipAlgorithmType.NORM):
            raise ValueError(
                f"SAMCallback: gradient_clip_algorithm={algorithm!r}; SAM clips its descent gradient by "
                "the global norm only (gradient_clip_algorithm='norm')"
            )
        for sam in sams:
            if sam.max_grad_norm is None:
                sam.max_grad_norm = float(clip)  # checked there (LookSAM refuses)
            elif sam.max_grad_norm != float(clip):
                raise ValueError(
                    f"SAMCallback: gradient_clip_val={clip} but the SAM has max_grad_norm="
                    f"{sam.max_grad_norm}; set one of them"
                )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not pl_module.automatic_optimization:
            return
        if batch_idx % trainer.accumulate_grad_batches == 0:  # as Lightning zeroes the gradients
            self.window = []
            sam = _sam(trainer.optimizers[0])
            if sam is not None and sam.variant.perturbs_before_pass:
                sam.noise_step()  # RSAM: every micro-batch's first pass runs at w + delta
        self.window.append((batch, batch_idx))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.uncounted:  # a one-pass step that no opt.step() finished (count_step); the
            # LightningOptimizer's counting hooks are unset by now: count as they do
            progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
            progress.increment_ready()
            progress.increment_completed()
            self.uncounted = False

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        for sam in map(_sam, trainer.optimizers):
            if sam is not None:
                sam.abort_step()  # the weights go back to w: the model stays usable
