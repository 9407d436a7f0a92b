"""``step(closure)``'s first call: gradients from before it must not be added to the first pass.

``step(closure)`` runs ``closure(), first_step(), closure(), second_step()``. A loop migrated
from the popular SAM file runs one forward/backward *before* ``opt.step(closure)`` and a
closure that does not zero the gradients, so its first pass would add onto the earlier
gradients (three passes, the first counted twice). torch.optim's own pattern is harmless:
an earlier ``initial = closure()`` leaves gradients, but the closure zeroes them itself
(``opt.zero_grad()`` / ``model.zero_grad()`` inside it); and a closure that runs no backward
leaves the existing gradients as the first pass's, as torch.optim would take them.

What decides is whether the closure's backward *adds onto* gradients left from before. So
when non-zero gradients exist at the first ``step(closure)``, a tensor hook on every
parameter (torch runs it before it accumulates that parameter's gradient) looks, at the
first accumulation of the closure's backward, whether any of those gradients is still in
place: the same tensor, still not all zero (zeroed in place, set to None or replaced
counts as cleared). If one is, it raises there, before any gradient is accumulated: the
parameters, the gradients and the optimizer state are as they were. The hooks are removed
after the first closure call. The check runs until a first call passes (it reads every
gradient once, in one host sync).

FSDP2 writes a sharded (DTensor) parameter's gradient itself after its reduce-scatter, not
through autograd's accumulation, so no hook would see it: a gradient left on a DTensor
parameter is refused before the closure runs (zero the gradients before the first step).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .placement import is_dtensor

__all__ = ["FSDP2_LEFTOVERS", "MIGRATED_LOOP", "FirstClosureCheck"]

MIGRATED_LOOP = (
    "step(closure) found gradients accumulated before its first pass, and the closure's backward "
    "would add to them. sam_fused's step(closure) runs both passes through the closure (closure(), "
    "first_step(), closure(), second_step()), so a backward pass before it would be counted twice. "
    "If you migrated from the popular SAM file or pytorch-optimizer, drop the forward/backward "
    "before opt.step(closure), or zero the gradients at the start of the closure "
    "(opt.zero_grad()). If a framework accumulates gradients over micro-batches before calling "
    "step(closure) (Lightning's accumulate_grad_batches), add "
    "sam_fused.integrations.lightning.SAMCallback() to the Trainer's callbacks, or accumulate "
    "inside the closure, or use first_step()/second_step() (README, Frameworks and Gradient "
    "accumulation). Nothing was changed."
)
FSDP2_LEFTOVERS = (
    "step(closure) found gradients accumulated before its first pass on FSDP2 (DTensor) "
    "parameters. sam_fused's step(closure) runs both passes through the closure, and FSDP2 adds "
    "each pass's gradients to the ones it finds, where no check can see it: zero the gradients "
    "(opt.zero_grad()) before the first step(closure), and drop any forward/backward before it "
    "(a loop migrated from the popular SAM file). Nothing was changed."
)


class FirstClosureCheck:
    """Watches the first pass of the first ``step(closure)`` (see the module's docstring).

    Built before the step begins (it refuses leftovers on FSDP2 parameters there); ``needed``
    is False when no gradient was left, and then the first pass needs no watching.
    """

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self._params = [p for group in groups for p in group["params"]]
        self._left: list[tuple[Tensor, weakref.ref]] = []
        self._handles: list[Any] = []
        self.refused = False
        grads = [(p, p.grad) for p in self._params if p.grad is not None and not p.grad.is_sparse]
        if not grads:
            return
        nonzero = torch.stack([g.ne(0).any() for _, g in grads]).tolist()  # one host sync
        left = [(p, g) for (p, g), keep in zip(grads, nonzero) if keep]
        if any(is_dtensor(p) for p, _ in left):
            raise RuntimeError(FSDP2_LEFTOVERS)
        self._left = [(p, weakref.ref(g)) for p, g in left]

    @property
    def needed(self) -> bool:
        return bool(self._left)

    def run(self, closure: Callable[[], Any]) -> Any:
        """The first pass's ``closure()``, watched; raises if it added onto earlier gradients."""
        hook = self._before_accumulation
        self._handles = [p.register_hook(hook) for p in self._params if p.requires_grad]
        try:
            loss = closure()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
        if self.refused:  # the closure caught the hook's error and went on
            raise RuntimeError(MIGRATED_LOOP)
        return loss

    def _before_accumulation(self, grad: Tensor) -> None:
        if not self._left:
            return None
        still = []
        for p, ref in self._left:
            old = ref()
            if old is not None and p.grad is old:
                still.append(old)
        self._left = []  # decided at the backward's first accumulation
        if still and bool(torch.stack([g.ne(0).any() for g in still]).any()):
            self.refused = True
            raise RuntimeError(MIGRATED_LOOP)
        return None
