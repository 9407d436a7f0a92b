"""GradScaler: the only module that touches ``torch.amp.GradScaler``'s internals.

A SAM step under fp16 loss scaling has two scaled passes but one ``scaler.update()``.
sam_fused writes ``1/scale`` of each pass into the status vector (``INV_SCALE1``,
``INV_SCALE2``) for the kernels to unscale as they read gradients, and after the step tells
the scaler whether either pass overflowed, on the device. GradScaler's public contract
covers the pass it sees in ``scaler.step(opt)`` (through ``_step_supports_amp_scaling``);
the first pass needs three of its private attributes, all read or written here:
``_scale`` (the current scale tensor), ``_per_optimizer_states[id(opt)]["stage"]`` (whether
``unscale_`` or ``step`` ran) and ``["found_inf_per_device"]`` (what ``update()`` reads).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import status as S

__all__ = [
    "active_scaler",
    "handed_scale",
    "report_overflow",
    "scaler_scale",
    "second_scaler",
    "unscaled_by_user",
    "write_inverse_scale",
]


def _stages():
    from torch.amp.grad_scaler import OptState

    return OptState


def active_scaler(scaler: Any, key: int, device: torch.device, first_pass: bool) -> Any:
    """``scaler`` when it is an enabled GradScaler ready for this pass, None when disabled.

    ``key`` is ``id`` of the optimizer the scaler knows. Refuses (before anything changes) a
    non-GradScaler, a scaler with no scale yet, one on another device, and, for the first
    pass, a scaler whose ``unscale_``/``step`` already ran this iteration.
    """
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if not scaler.is_enabled():
        return None
    if scaler._scale is None:
        raise RuntimeError("the GradScaler has no scale yet: call scaler.scale(loss).backward() first")
    if scaler._scale.device != device:
        raise ValueError(f"the GradScaler's scale is on {scaler._scale.device}, the parameters on {device}")
    if first_pass and scaler._per_optimizer_states[key]["stage"] is not _stages().READY:
        raise RuntimeError(
            "first_step(grad_scaler=...) found scaler.unscale_(opt) or scaler.step(opt) already "
            "called in this step: sam_fused unscales the first pass itself; call scaler.update() "
            "once per step, after the second step"
        )
    return scaler


def handed_scale(opt: Any, scaler: Any) -> tuple | None:
    """What ``GradScaler.step(opt)`` handed over when it calls ``opt.step()`` (it sets
    ``opt.grad_scale`` and ``opt.found_inf`` around the call): ``(scale or None,)``; None when
    ``step()`` was called directly. ``scaler`` is the one the first pass was scaled by."""
    if not hasattr(opt, "found_inf"):
        return None
    if scaler is None:
        raise RuntimeError(
            "scaler.step(opt) after first_step() without grad_scaler=scaler: the first pass's "
            "gradients were taken as unscaled; pass grad_scaler to first_step() (finish this step "
            "with opt.second_step(), or abandon it with opt.abort_step())"
        )
    return (getattr(opt, "grad_scale", None),)


def scaler_scale(scaler: Any) -> Tensor:
    return scaler._scale


def unscaled_by_user(scaler: Any, key: int) -> bool:
    """Whether ``scaler.unscale_(opt)`` already ran on this pass's gradients."""
    return scaler._per_optimizer_states[key]["stage"] is _stages().UNSCALED


def write_inverse_scale(status: Tensor, scale: Tensor | None, passes: slice) -> None:
    """``status[passes] = 1 / scale`` on the device (1 when ``scale`` is None: unscaled)."""
    target = status[passes]
    if scale is None:
        target.fill_(1.0)
    else:
        target.copy_(scale.to(target).reshape(1).expand(target.numel())).reciprocal_()


def report_overflow(scaler: Any, key: int, status: Tensor, mark_stepped: bool) -> None:
    """Tell the scaler whether either pass overflowed (on the device), so update() backs off.

    GradScaler keeps one ``found_inf`` tensor per device for each optimizer; update() reads
    them. scaler.step() and scaler.unscale_() have filled them with the second pass's check
    only; a first-pass overflow is added here. Otherwise the entry is created.
    """
    found = ((status[S.BAD1] + status[S.BAD2]) > 0).to(torch.float32)
    state = scaler._per_optimizer_states[key]
    per_device = state["found_inf_per_device"]
    if per_device:
        for t in per_device.values():
            torch.maximum(t, found.to(t.device), out=t)
    else:
        per_device[scaler._scale.device] = found.to(scaler._scale.device).reshape(())
    if mark_stepped:
        state["stage"] = _stages().STEPPED


def second_scaler(first: Any, scaler_arg: Any, key: int, device: torch.device) -> Any:
    """The second pass's scaler: the first pass's (``first``) unless ``second_step(grad_scaler=)``
    names one (``scaler_arg``), which must then be that same scaler."""
    if scaler_arg is None:
        return first
    scaler = active_scaler(scaler_arg, key, device, first_pass=False)
    if scaler is not None and first is None:
        raise RuntimeError(
            "second_step(grad_scaler=...) needs first_step(grad_scaler=...) with the same "
            "scaler: the first pass's gradients were taken as unscaled"
        )
    if scaler is not first:
        raise RuntimeError("second_step() got another GradScaler than first_step()")
    return scaler
