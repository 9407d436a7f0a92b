"""SAM under ``torch.distributed``: synced SAM and m-sharpness with DistributedDataParallel.

**Synced SAM** needs nothing from this module: DDP averages both passes' gradients, so
every rank computes the same global norm from the same gradient and takes the same step,
which is single-process SAM on the global batch.

**m-sharpness** (Foret et al., 2021, with ``m`` the per-replica batch): each rank perturbs
its weights along its *own* first-pass gradient, normalised by its own norm; the second
pass is averaged by DDP as usual, so the descent stays in sync. The first pass must skip
DDP's all-reduce, and DDP decides that *during the forward pass* (``forward`` arms the
gradient hooks when gradient sync is on); putting only ``backward()`` inside
``no_sync()`` still all-reduces. :func:`local_first_pass` puts both inside, and
:func:`sam_step` runs a whole step that way.

Nothing here needs an initialised process group to import. FSDP2 (``fully_shard``) needs
nothing from this module either: the optimizer finds the DTensor parameters and sums the
norm over their shards itself (see ``sam_fused/sharding.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import status as S
from .placement import is_dtensor

if TYPE_CHECKING:
    from .optimizer import SAM

__all__ = ["agree_on_skip", "local_first_pass", "sam_step"]


def _ddp(model: nn.Module) -> nn.Module | None:
    """``model`` when it is DistributedDataParallel; None for a module that needs no sync.

    Anything whose first pass cannot be made local, or would be local only by accident,
    is refused: sharded models, DataParallel, and a plain module in a multi-rank job (most
    likely the ``.module`` inside a DDP wrapper, whose forward bypasses ``no_sync``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected the model (an nn.Module), got {type(model).__name__}")
    distributed = torch.distributed.is_available()
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            return model
    if isinstance(model, nn.DataParallel):
        raise TypeError(
            "nn.DataParallel sums the replicas' gradients inside its forward; m-sharpness needs "
            "DistributedDataParallel"
        )
    if any(is_dtensor(p) for p in model.parameters()):
        raise TypeError(
            "the model has DTensor parameters (FSDP2 / fully_shard or tensor parallel): each rank "
            "holds a shard, not a whole gradient, so a rank-local first pass is not defined. "
            "m-sharpness is supported with DistributedDataParallel"
        )
    if distributed and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise TypeError(
            f"local_first_pass got a {type(model).__name__} in a job of "
            f"{torch.distributed.get_world_size()} ranks; pass the DistributedDataParallel wrapper "
            "(not its .module): its forward is what decides whether the backward all-reduces"
        )
    return None


@contextmanager
def local_first_pass(model: nn.Module) -> Iterator[None]:
    """Run SAM's first pass (forward *and* backward) without DDP's gradient all-reduce.

    ::

        with local_first_pass(ddp_model):
            loss_fn(ddp_model(x), y).backward()       # both lines inside
        opt.first_step(zero_grad=True)                # eps from this rank's gradient and norm
        agree_on_skip(opt, ddp_model)                 # only with skip_nonfinite=True (default)
        loss_fn(ddp_model(x), y).backward()           # synced as usual
        opt.second_step(zero_grad=True)

    DDP arms its all-reduce when the forward runs, so the forward must be inside; a
    backward inside ``no_sync`` after a forward outside it still all-reduces.

    ``model`` must be the ``DistributedDataParallel`` wrapper. A module that is not DDP is
    accepted only outside a multi-rank job (no process group, or world size 1), where every
    gradient is local already: the context then does nothing, so one script runs with and
    without DDP. Sharded (FSDP2 / DTensor) models and ``nn.DataParallel`` are refused.

    On LookSAM / interval SAM steps where ``opt.perturbs_this_step`` is False, the one pass
    *is* the update: run it synced, not in this context. GSAM and LookSAM keep the first
    gradient for the descent, which would then differ between ranks; :func:`sam_step`
    refuses them with ``m_sharpness=True``.
    """
    ddp = _ddp(model)
    if ddp is None:
        yield
        return
    with ddp.no_sync():
        yield


def agree_on_skip(optimizer: SAM, model: nn.Module) -> None:
    """After a rank-local ``first_step``: skip the step on every rank if any rank saw a NaN/inf.

    With ``skip_nonfinite=True`` each rank counts non-finite entries of its own first-pass
    gradient, so one rank alone would skip and the replicas would drift apart. This sums the
    counts over DDP's process group (one tiny all-reduce, no host sync) before
    ``second_step`` decides. A rank that perturbed is still restored exactly by the skip.
    """
    ddp = _ddp(model)
    if ddp is None or not optimizer.skip_nonfinite:
        return
    torch.distributed.all_reduce(optimizer.engine.status[S.BAD1 : S.BAD1 + 1], group=ddp.process_group)


def sam_step(
    model: nn.Module,
    optimizer: SAM,
    compute_loss: Callable[[], Tensor],
    *,
    m_sharpness: bool = False,
) -> Tensor:
    """One whole SAM step under DDP; returns the first pass's loss (detached).

    ``compute_loss`` runs the forward pass through ``model`` and returns the loss, without
    calling ``backward()`` (this function does, so it can place the first pass inside
    :func:`local_first_pass`). It is called once per pass, twice on a perturbed step.

    ``m_sharpness=False``: synced SAM, both passes all-reduced (the same as
    ``optimizer.step(closure)``). ``m_sharpness=True``: the first pass stays on each rank
    (each perturbs with its own gradient and norm), the second is all-reduced. LookSAM and
    interval SAM steps that do not perturb run synced either way. RSAM's ``noise_step``
    is taken care of.
    """
    if m_sharpness and optimizer.variant.keeps_first_grad:
        raise ValueError(
            f"{optimizer.variant.name} descends along a mix of both passes' gradients; with a "
            "rank-local first gradient the replicas would take different steps. Use "
            "m_sharpness=False, or a variant without that (SAM, ASAM, USAM, VaSSO, ...)"
        )
    local = m_sharpness and optimizer.perturbs_this_step
    if local:
        _ddp(model)  # a refused model is refused before anything runs
    if optimizer.variant.perturbs_before_pass:
        optimizer.noise_step()
    with local_first_pass(model) if local else nullcontext():
        loss = compute_loss()
        loss.backward()
    perturbed = optimizer.first_step(zero_grad=True)
    if local:
        agree_on_skip(optimizer, model)
    if perturbed:
        compute_loss().backward()
        optimizer.second_step(zero_grad=True)
    return loss.detach()
