"""torch.optim's step hooks and profiler ranges, for a step that is one call or three.

``torch.optim`` fires the step pre-hooks, a profiler range and the post-hooks around
``step()``. A SAM step is ``step(closure)``, or the manual ``first_step()`` /
``second_step()`` (RSAM: ``noise_step()`` first): the pre-hooks fire when the step begins,
the post-hooks when it ends (after ``second_step()``, or after a ``first_step()`` that took
a one-pass step), each once per SAM step, and every call gets its profiler range. The
global hooks of ``torch.optim.optimizer.register_optimizer_step_pre_hook`` are read from
torch's private registry (there is no public way to run them), and whether a profiler runs
from a private flag (docs/design.md lists both).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
import torch.optim.optimizer as torch_optimizer

__all__ = ["begin", "end", "profiled"]


def profiled(opt: Any, call: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` inside the profiler range of ``call``, named as torch names ``step()``'s;
    the range is entered only while a profiler runs (it costs ~15 us of host time, more than
    the rest of a step's checks)."""
    if not torch._C._autograd._profiler_enabled():
        return fn(*args)
    with torch.autograd.profiler.record_function(f"Optimizer.step#{type(opt).__name__}.{call}"):
        return fn(*args)


def begin(opt: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Fire the step pre-hooks if this call begins a SAM step; returns the (maybe replaced) arguments."""
    step = opt.engine.step
    if step.hooks_open or step.in_closure_step:
        return args, kwargs
    for hook in chain(
        torch_optimizer._global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()
    ):
        result = hook(opt, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(
                    f"a step pre-hook must return None or a tuple (new_args, new_kwargs), got {result!r}"
                )
            args, kwargs = result
    step.hooks_open = True
    return args, kwargs


def end(opt: Any, args: tuple, kwargs: dict, one_pass: bool = False) -> None:
    """Fire the step post-hooks: the SAM step is complete (``one_pass``: by a first_step() that
    took a whole one-pass step)."""
    step = opt.engine.step
    if step.in_closure_step:
        return
    step.hooks_open = False
    owner = opt.engine.owner
    owner._opt_called = True  # what LR schedulers check to warn about the call order
    if torch._C._autograd._profiler_enabled():
        owner._optimizer_step_code()  # the profiler's entry point after a step
    for hook in chain(
        opt._optimizer_step_post_hooks.values(), torch_optimizer._global_optimizer_post_hooks.values()
    ):
        hook(opt, args, kwargs)
    if sys.modules.get("lightning.pytorch") is not None:  # Lightning's optimizer wrapper: global_step counts
        from .integrations.lightning import count_step

        count_step(opt, one_pass)
