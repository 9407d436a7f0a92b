"""What the PyTorch math of variants and base updates is written with, so that it runs
unchanged on one tensor or on many tensors laid out in one flat buffer.

The same definitions run in three settings:

* the reference backend, one parameter at a time: an update count is a 0-d device tensor,
  a flag (``count == 0``) a 0-d bool tensor, and both branches of a choice are computed,
  then one is selected elementwise (``torch.where``), so nothing waits for the device;
* the foreach backend on the CPU, over flat buffers: counts and flags are read on the host
  (a CPU tensor's value is a memory read, not a device synchronisation) and arrive as
  Python numbers, so only the branch that applies is computed, with scalar arguments;
* the foreach backend elsewhere (CUDA, MPS, ...), over flat buffers: a count is one value
  per tensor (:class:`PerTensor`), expanded to every element of its tensor's slice, and
  choices are again ``torch.where``.

Python numbers and tensors mix in these helpers as they do in torch's operators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PerTensor",
    "add_product",
    "add_quotient_",
    "first_or_",
    "is_zero",
    "narrow",
    "one_like",
    "per_count",
    "select",
    "wide",
]

Flag = bool | Tensor


class PerTensor:
    """One value per tensor of a run of consecutive tensors in a flat buffer (their update
    counts), for math over the run's elements: :meth:`map` applies a function to the values
    and expands each result to the elements, every tensor's value repeated over its slice
    (padding included). No host synchronisation: the run's length is known on the host."""

    __slots__ = ("numel", "repeats", "values")

    def __init__(self, values: Tensor, repeats: Tensor, numel: int) -> None:
        self.values = values  # one per tensor
        self.repeats = repeats  # each tensor's slice length in the flat buffer, on the same device
        self.numel = numel  # their sum

    def expand(self, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        return torch.repeat_interleave(value, self.repeats, output_size=self.numel)

    def map(self, fn: Callable[[Tensor], Any]) -> Any:
        out = fn(self.values)
        return tuple(map(self.expand, out)) if isinstance(out, tuple) else self.expand(out)


def per_count(count: int | float | Tensor | PerTensor, fn: Callable[[Any], Any]) -> Any:
    """``fn(count)`` (a count per tensor: per element, from ``fn`` of each tensor's count).

    Quantities derived from an update count (Adam's bias corrections, SGD's first update)
    are computed once per tensor, never once per element."""
    return count.map(fn) if isinstance(count, PerTensor) else fn(count)


def is_zero(count: Any) -> Any:
    """Whether an update count is 0 (the first update): a bool, or a bool tensor."""
    return count == 0


def wide(count: Any) -> Any:
    """A count as a float64 tensor (float32 where the device has no float64: MPS), or the
    Python number itself (Python floats are already doubles)."""
    if not isinstance(count, Tensor):
        return count
    return count.to(torch.float32 if count.device.type == "mps" else torch.float64)


def narrow(value: Any, dtype: torch.dtype) -> Any:
    """A tensor cast to the math's dtype (a Python number stays one)."""
    return value.to(dtype) if isinstance(value, Tensor) else value


def select(flag: Flag, if_true: Any, if_false: Any) -> Any:
    """``torch.where(flag, if_true, if_false)``; a flag known on the host picks one side."""
    if isinstance(flag, bool):
        return if_true if flag else if_false
    return torch.where(flag, if_true, if_false)


def first_or_(first: Flag, target: Tensor, value: Tensor, update_: Callable[[Tensor], Any]) -> None:
    """In place: ``target <- value`` where ``first`` holds, else ``update_(target)``.

    With a flag known on the host only that branch runs; with a tensor flag ``update_``
    runs everywhere and ``torch.where`` puts ``value`` where the flag holds."""
    if isinstance(first, bool):
        if first:
            target.copy_(value)
        else:
            update_(target)
        return
    update_(target)
    torch.where(first, value, target, out=target)


def add_product(y: Tensor, x: Tensor, scale: Any, out: Tensor | None = None) -> Tensor:
    """``y + scale * x`` in one pass, ``scale * x`` rounded before the sum (no fused
    multiply-add: the rounding of ``y + scale * x`` in two operations, which the compiled
    kernels share). ``out`` may be ``y`` or ``x`` (in place); ``scale`` a number or a tensor."""
    if isinstance(scale, Tensor):
        return torch.addcmul(y, x, scale, out=out)
    return torch.addcmul(y, x, one_like(x), value=scale, out=out)  # (scale * x) * 1, then + y


_ONES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def one_like(like: Tensor) -> Tensor:
    """A 0-d one of ``like``'s dtype and device (one per process: no allocation per call)."""
    key = (like.dtype, like.device)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), dtype=like.dtype, device=like.device)
    return one


def add_quotient_(w: Tensor, numerator: Tensor, denominator: Tensor, scale: Any) -> None:
    """In place: ``w <- w + (scale * numerator) / denominator``, rounded as ``addcdiv_``
    rounds it (one pass for a number; a tensor ``scale`` takes three, with the same bits)."""
    if isinstance(scale, Tensor):
        w.add_(numerator.mul(scale).div_(denominator))
    else:
        w.addcdiv_(numerator, denominator, value=scale)
