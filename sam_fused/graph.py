"""A whole SAM training step captured in one CUDA graph.

For small and medium models a SAM step is bound by kernel launches and host overhead: two
forward/backward passes and the optimizer issue thousands of small launches. The fused
optimizer never synchronises with the host, so the complete step can be recorded once in a
CUDA graph and replayed with a single launch per step::

    step = GraphedSAMStep(model, loss_fn, opt, example_input, example_target,
                          autocast_dtype=torch.bfloat16)
    for x, y in loader:
        loss = step(x, y)          # copies the batch in, replays both passes + the optimizer
        sched.step()               # LR / rho schedulers keep working (their values live on the device)

What it takes care of:

* ``lr`` and ``rho`` of every param group become one-element device tensors (values
  unchanged). The kernels read them on the device, and ``torch.optim.lr_scheduler`` and
  ``sam_fused.schedules`` update such tensors in place, so replays see new values.
* Warm-up: a few eager steps on a side stream compile the kernels and allocate every buffer
  (gradients, optimizer state, autograd workspaces) before capture. They run with
  ``lr = 0``, and the model's buffers (BatchNorm statistics) and the optimizer's state are
  restored afterwards: building the helper does not train the model.
* What cannot be captured is refused with the reason: parameters off CUDA, a backend other
  than ``triton``, a base optimizer sam_fused does not fuse (its step
  would synchronise), RSAM (host-side noise draws) and LookSAM / interval SAM (the host
  decides each step which path runs). ``graphs=False`` runs the same step eagerly instead,
  on any device — for debugging, for CPU runs, or where capture is refused.

The returned loss is the first pass's loss in a static tensor that the next call
overwrites; ``.item()`` it or clone it if it must be kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .batchnorm import frozen_bn_stats
from .grouping import fused_specs
from .optimizer import SAM

__all__ = ["GraphedSAMStep"]

# The reference backend replaces its state tensors each step (out of place), which a graph
# cannot follow; the Triton backend updates the buckets' flat buffers in place.
CAPTURABLE_BACKENDS = ("triton",)


class GraphedSAMStep:
    """One SAM training step (both passes and the optimizer), replayed from a CUDA graph.

    Args:
        model: the module; its parameters are those of ``optimizer``.
        loss_fn: ``loss_fn(model(input), target) -> scalar loss``.
        optimizer: a :class:`sam_fused.SAM` (or variant class) over the model's parameters.
        example_input: a tensor with the shape and dtype of every batch's input (it
            becomes the static buffer that each call copies into).
        example_target: the same for the targets.
        autocast_dtype: run both forward passes under ``torch.autocast`` with this dtype
            (e.g. ``torch.bfloat16``); None (default) for no autocast.
        graphs: capture and replay a CUDA graph (default True); False runs the same step
            eagerly on each call.
        freeze_bn_stats: run the second pass inside :func:`sam_fused.frozen_bn_stats`, so
            BatchNorm running statistics record only the pass at ``w`` (default False).
        warmup_steps: eager steps (with ``lr = 0``) before capture (default 3).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        optimizer: SAM,
        example_input: Tensor,
        example_target: Tensor,
        *,
        autocast_dtype: torch.dtype | None = None,
        freeze_bn_stats: bool = False,
        graphs: bool = True,
        warmup_steps: int = 3,
    ) -> None:
        if not isinstance(optimizer, SAM):
            raise TypeError(f"optimizer must be a sam_fused.SAM, got {type(optimizer).__name__}")
        if not isinstance(example_input, Tensor) or not isinstance(example_target, Tensor):
            raise TypeError("example_input and example_target must be tensors (the static batch buffers)")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.autocast_dtype = autocast_dtype
        self.freeze_bn_stats = bool(freeze_bn_stats)
        self.graphs = bool(graphs)
        self.device = optimizer.engine.device
        self._graph: Any = None
        self.static_loss: Tensor | None = None
        if not self.graphs:
            return
        self._check_capturable()
        _move_hyperparameters_to_device(optimizer, self.device)
        self.static_input = example_input.detach().to(self.device).clone()
        self.static_target = example_target.detach().to(self.device).clone()
        self._capture(warmup_steps)

    # ------------------------------------------------------------------ the step
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # no cast cache under capture: a cached bf16 copy of a weight would be recorded once
        # and then go stale as the optimizer updates the weight in place
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=not self.graphs)

    def _body(self, x: Tensor, y: Tensor) -> Tensor:
        opt = self.optimizer
        with self._autocast():
            loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if opt.first_step(zero_grad=True):
            frozen = frozen_bn_stats(self.model) if self.freeze_bn_stats else contextlib.nullcontext()
            with self._autocast(), frozen:
                loss2 = self.loss_fn(self.model(x), y)
            loss2.backward()
            opt.second_step(zero_grad=True)
        return loss.detach()

    def __call__(self, input: Tensor, target: Tensor) -> Tensor:
        """Run one training step on this batch; returns the first pass's loss."""
        if not self.graphs:
            return self._body(input, target)
        if input.shape != self.static_input.shape or target.shape != self.static_target.shape:
            raise ValueError(
                "a captured step takes batches shaped like its example: input "
                f"{tuple(self.static_input.shape)} and target {tuple(self.static_target.shape)}, "
                f"got {tuple(input.shape)} and {tuple(target.shape)} (drop the last partial batch, "
                "or capture another step)"
            )
        self.static_input.copy_(input, non_blocking=True)
        self.static_target.copy_(target, non_blocking=True)
        self._graph.replay()
        assert self.static_loss is not None
        return self.static_loss

    # ------------------------------------------------------------------ capture
    def _check_capturable(self) -> None:
        opt = self.optimizer
        if opt.variant.perturbs_before_pass:
            raise ValueError(
                "RSAM draws its noise on the host each step and cannot be captured; graphs=False"
            )
        if opt.variant.periodic:
            raise ValueError(
                f"{opt.variant.name} decides on the host which kind of step runs (every "
                "k steps), so one graph cannot replay it; graphs=False"
            )
        engine = opt.engine
        why_not = engine.policy.host_decision()
        if why_not is not None:  # AESAM, SAMWindow
            raise ValueError(f"{why_not}, so one graph cannot replay its steps; graphs=False")
        specs, why = fused_specs(engine.buckets, opt.param_groups, type(opt.base_optimizer), engine.device)
        if specs is None:
            raise ValueError(
                f"{type(opt.base_optimizer).__name__} with these options is not fused by sam_fused "
                f"({why}), and its own step would synchronise "
                "with the host; use torch.optim.SGD, Adam or AdamW, or graphs=False"
            )
        bad = sorted({name for name in opt.backends if name not in CAPTURABLE_BACKENDS})
        if bad:
            # on a CPU the Triton backend cannot capture either: the fix there is the eager step
            fix = (
                "build the optimizer with backend='triton', or pass graphs=False to run the same step eagerly"
                if self.device.type == "cuda"
                else f"CUDA graphs also need CUDA tensors (the parameters are on {self.device}): "
                "pass graphs=False to run the same step eagerly"
            )
            raise ValueError(
                f"backend(s) {bad} cannot be captured (the reference backend replaces its state "
                f"tensors each step; the compiled ones read hyperparameters on the host); {fix}"
            )
        if self.device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need CUDA tensors (the parameters are on {self.device}); pass graphs=False "
                "to run the same step eagerly"
            )

    def _capture(self, warmup_steps: int) -> None:
        opt = self.optimizer
        saved = _snapshot(self.model, opt)
        lrs = [group["lr"].clone() for group in opt.param_groups]
        for group in opt.param_groups:
            group["lr"].fill_(0.0)  # warm-up steps must not train
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            opt.zero_grad(set_to_none=False)
            for _ in range(warmup_steps):
                self._body(self.static_input, self.static_target)
        torch.cuda.current_stream(self.device).wait_stream(side)
        _restore(self.model, opt, saved)
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"].copy_(lr)
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: the graph accumulates into them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_loss = self._body(self.static_input, self.static_target)
        self._graph = graph


def _move_hyperparameters_to_device(opt: SAM, device: torch.device) -> None:
    """Make each group's lr and rho a one-element float32 tensor on ``device``."""
    for group in opt.param_groups:
        for key in ("lr", opt.engine.keys["rho"]):
            value = group[key]
            if isinstance(value, Tensor) and value.device == device and value.numel() == 1:
                continue
            group[key] = torch.tensor(float(value), dtype=torch.float32, device=device)


def _snapshot(model: torch.nn.Module, opt: SAM) -> dict[str, Any]:
    """Copies of what warm-up steps may change besides the weights (kept by lr = 0). On the
    Triton backend all optimizer state lives in the buckets' flat buffers and counts (the
    gradients and backups there are rewritten by every step)."""
    engine = opt.engine
    return {
        "buffers": [b.detach().clone() for b in model.buffers()],
        "state": [_state_buffers(b) for b in engine.buckets],
        "counts": [(b.steps.clone(), b.vsteps.clone()) for b in engine.buckets],
        "status": engine.status.clone(),
        "step_index": engine.step.step_index,
    }


def _state_buffers(bucket: Any, copy: bool = True) -> dict[str, Tensor]:
    """A bucket's flat buffers of optimizer state and running state (copies, or themselves)."""
    buffers = bucket.storage.buffers
    return {k: v.clone() if copy else v for k, v in buffers.items() if k not in ("grad", "backup")}


def _restore(model: torch.nn.Module, opt: SAM, saved: dict[str, Any]) -> None:
    """Put back, in place, what :func:`_snapshot` copied; state that the warm-up created
    (first momentum buffers, Adam moments) goes back to zero, as a fresh optimizer's."""
    engine = opt.engine
    with torch.no_grad():
        for buf, value in zip(model.buffers(), saved["buffers"]):
            buf.copy_(value)
        for bucket, state, (steps, vsteps) in zip(engine.buckets, saved["state"], saved["counts"]):
            for name, buf in _state_buffers(bucket, copy=False).items():
                if name in state:
                    buf.copy_(state[name])
                else:
                    buf.zero_()
            bucket.steps.copy_(steps)
            bucket.vsteps.copy_(vsteps)
            bucket.counts_moved()
        engine.status.copy_(saved["status"])
    engine.step.step_index = saved["step_index"]
