"""MSAM's operations over one bucket, per backend, and the choice of backend.

Four operations (``msam_rules.py`` holds their math):

* ``stats``: add ``sum(v'^2)`` (the new first moment's squares, in float64) and the count of
  non-finite gradient entries into ``status[SUMSQ]``, ``status[BAD]``;
* ``apply``: unless ``status[BAD] > 0`` (then nothing moves): the new moments, ``w'`` from the
  stored ``w``, the stored ``w <- w'``, and ``p <- w' - c v'``; the update counts advance;
* ``restore``: ``p <- w`` for every parameter that has a stored ``w`` (``unperturbed()``);
* ``perturb``: ``p <- w - c v`` for those parameters (leaving ``unperturbed()``, loading a
  checkpoint, and the parameters without a gradient at a step, which take the new ``c``).

``reference`` runs the rules parameter by parameter with ``torch.where`` (no host sync);
``foreach`` runs them over the bucket's tensors with ``torch._foreach_*`` and reads the skip
flag and the update counts on the host (free for CPU tensors, one sync a step elsewhere);
``triton`` (``msam_triton.py``), ``cpp`` (``msam_cpp.py``, ``csrc/sam_fused_cpu_msam.cpp``) and
``cuda`` (``msam_cuda.py``, ``csrc/sam_fused_cuda_msam.cuh``) run each operation as one call
per bucket.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .backends import BACKEND_ENV, BACKEND_NAMES
from .backends.triton import interpreting, triton_available
from .layout import Bucket, Plan
from .msam_rules import (
    BAD,
    SUMSQ,
    WEIGHT,
    MSAMHyper,
    compute_dtype,
    first_moment,
    perturbed,
    second_moment,
    squares,
    state_roles,
    updated_weight,
)
from .tables import TableRun

__all__ = ["BAD", "SUMSQ", "ReferenceMSAM", "choose_msam_backend"]


class ReferenceMSAM:
    """The specification: one parameter at a time, ``torch.where`` for the skip."""

    name = "reference"

    def stats(self, bucket: Bucket, plan: Plan, h: MSAMHyper, status: Tensor) -> None:
        ct = compute_dtype(bucket.dtype)
        s0_role = state_roles(h.base)[0]
        for i in plan.indices:
            g = bucket.grad(i)
            v = first_moment(h, g.to(ct), bucket.weight(i).to(ct), bucket.state_tensor(s0_role, i).to(ct))
            status[SUMSQ] += squares(v)
            status[BAD] += (~torch.isfinite(g)).sum()

    def apply(
        self, bucket: Bucket, plan: Plan, h: MSAMHyper, status: Tensor, scales: Tensor, group: int
    ) -> None:
        ct, skip, scale = compute_dtype(bucket.dtype), status[BAD] > 0, scales[group]
        roles = state_roles(h.base)
        for i in plan.indices:
            p, g, count = bucket.weight(i), bucket.grad(i).to(ct), bucket.steps[i]
            stored = bucket.state_tensor(WEIGHT, i)
            s0 = bucket.state_tensor(roles[0], i)
            w = torch.where(count > 0, stored.to(ct), p.to(ct))  # no stored w yet: p is w
            v = first_moment(h, g, p.to(ct), s0.to(ct))
            s1_new = None
            if h.base == "adamw":
                s1 = bucket.state_tensor(roles[1], i)
                s1_new = second_moment(h, g, s1.to(ct))
                s1.copy_(torch.where(skip, s1, s1_new.to(s1.dtype)))
            w_new = updated_weight(h, w, v, s1_new, count)
            stored.copy_(torch.where(skip, stored, w_new.to(stored.dtype)))
            s0.copy_(torch.where(skip, s0, v.to(s0.dtype)))
            # from the stored (rounded) values, as perturb() recomputes it
            p.copy_(torch.where(skip, p, perturbed(stored.to(ct), s0.to(ct), scale).to(p.dtype)))
            count.add_((~skip).to(count.dtype))
        bucket.counts_moved()

    def restore(self, bucket: Bucket) -> None:
        for i in range(len(bucket.params)):
            p = bucket.weight(i)
            p.copy_(torch.where(bucket.steps[i] > 0, bucket.state_tensor(WEIGHT, i), p))

    def perturb(self, bucket: Bucket, run: TableRun, base: str, scales: Tensor, group: int) -> None:
        ct, s0_role, scale = compute_dtype(bucket.dtype), state_roles(base)[0], scales[group]
        for i in run.indices:
            p = bucket.weight(i)
            w, v = bucket.state_tensor(WEIGHT, i).to(ct), bucket.state_tensor(s0_role, i).to(ct)
            p.copy_(torch.where(bucket.steps[i] > 0, perturbed(w, v, scale).to(p.dtype), p))


def choose_msam_backend(request: str, device: torch.device, dtype: torch.dtype, strided: str | None):
    """The MSAM backend of one bucket: ``auto`` takes triton for CUDA tensors (where it is
    installed and the parameters are dense float32/bfloat16/float16; ``cuda`` only by name, as
    for SAM), cpp for dense CPU
    tensors where the C++ library is here, foreach everywhere else; an explicit request that
    cannot run the bucket is refused by name."""
    name = request
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if name not in BACKEND_NAMES:
            raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKEND_NAMES)}, got {name!r}")
    fused_dtype = dtype in (torch.float32, torch.bfloat16, torch.float16)
    if name == "auto":
        name = "foreach"
        if device.type == "cuda" and strided is None and fused_dtype and triton_available():
            name = "triton"
        elif device.type == "cpu" and strided is None and _cpp_refusal() is None:
            name = "cpp"
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")
    if name == "reference":
        return ReferenceMSAM()
    if name == "foreach":
        from .msam_foreach import ForeachMSAM

        return ForeachMSAM()
    reason = None
    if name == "cuda":
        if not fused_dtype:
            reason = f"it handles float32, bfloat16 and float16, not {str(dtype).removeprefix('torch.')}"
        elif strided is not None:
            reason = f"its multi-tensor kernels need dense tensors, and a parameter is not: {strided}"
        else:
            from .msam_cuda import cuda_refusal

            reason = cuda_refusal(device)
    elif name == "cpp":
        if device.type != "cpu":
            reason = f"it runs CPU tensors, not {device.type.upper()} ones"
        elif strided is not None:
            reason = f"its multi-tensor loops need dense tensors, and a parameter is not: {strided}"
        else:
            reason = _cpp_refusal()
    elif not triton_available():
        reason = "triton is not installed"
    elif device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        reason = (
            f"it runs CUDA tensors, not {device.type.upper()} ones (TRITON_INTERPRET=1 runs it on the CPU)"
        )
    elif not fused_dtype:
        reason = f"it handles float32, bfloat16 and float16, not {str(dtype).removeprefix('torch.')}"
    elif strided is not None:
        reason = f"its multi-tensor kernels need dense tensors, and a parameter is not: {strided}"
    if reason is not None:
        raise ValueError(
            f"MSAM cannot run these parameters on the {name} backend: {reason}; use backend='foreach'"
        )
    if name == "cpp":
        from .msam_cpp import CppMSAM

        return CppMSAM()
    if name == "cuda":
        from .msam_cuda import CudaMSAM

        return CudaMSAM()
    from .msam_triton import TritonMSAM  # imports triton

    return TritonMSAM()


def _cpp_refusal() -> str | None:
    from .msam_cpp import cpp_refusal

    return cpp_refusal()
