"""Keep SAM's second forward pass out of the BatchNorm running statistics.

A SAM step runs the same batch forward twice: at ``w`` and at ``w + eps``. In train mode
every BatchNorm layer folds the batch statistics into ``running_mean``/``running_var`` and
counts ``num_batches_tracked`` on *each* forward, so without care the running estimates
see every batch twice, once through weights that are never kept. :func:`frozen_bn_stats`
wraps the second pass so that it normalizes exactly as a train-mode pass does (with the
batch's own statistics) but leaves the running buffers untouched::

    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with frozen_bn_stats(model):
        loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["frozen_bn_stats"]


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[list[_BatchNorm]]:
    """Inside the block, BatchNorm layers in train mode normalize with batch statistics
    but do not update ``running_mean``, ``running_var`` or ``num_batches_tracked``.

    Covers every subclass of ``torch.nn.modules.batchnorm._BatchNorm`` anywhere in
    ``model`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, the lazy ones), ``model`` itself
    included. In train mode, ``_BatchNorm.forward`` hands its running buffers to
    ``F.batch_norm`` (which updates them) only while ``track_running_stats`` is True, and
    normalizes with the batch statistics either way; so the block switches that attribute
    off and restores it on the way out, also when the block raises. ``momentum`` and the
    buffers themselves are never touched, so nothing has to be copied back.

    Left as they are: layers in eval mode (switching the attribute there would make them
    normalize with batch statistics instead of their running ones) and layers built with
    ``track_running_stats=False``. Other normalization layers (LayerNorm, GroupNorm) keep
    no running statistics; InstanceNorm with ``track_running_stats=True`` is not covered.

    Yields the list of layers it froze (for inspection; empty when there are none).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: a lazy BatchNorm layer is still uninitialized. Its first forward
            would materialize the running buffers only while ``track_running_stats`` is
            True, so initializing it inside the block would leave them unmaterialized; run
            the ordinary (first) pass before the block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"frozen_bn_stats expects an nn.Module, got {type(model).__name__}")
    frozen: list[_BatchNorm] = []
    for name, module in model.named_modules():
        if not (isinstance(module, _BatchNorm) and module.training and module.track_running_stats):
            continue
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise RuntimeError(
                f"BatchNorm layer {name or type(module).__name__!r} is lazy and not initialized yet; "
                "run an ordinary forward pass (SAM's first pass) before frozen_bn_stats"
            )
        frozen.append(module)
    # switched only after the whole walk, so a refused model is left exactly as it was
    try:
        for module in frozen:
            module.track_running_stats = False
        yield frozen
    finally:
        for module in frozen:
            module.track_running_stats = True
