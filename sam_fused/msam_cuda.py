"""MSAM on the CUDA C++ library (``csrc/sam_fused_cuda_msam.cuh``): one launch per operation
per bucket over the device chunk table, as the Triton backend's; nothing is read on the host.

The library is the ``cuda`` backend's (``backends.get_backend("cuda")``): on a GPU the CUDA
extension, in the tests its emulated build on CPU tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import Bucket, Plan
from .msam_rules import WEIGHT, MSAMHyper, apply_tables, library_scalars, state_roles, stats_arguments
from .tables import TableRun

__all__ = ["CudaMSAM", "cuda_refusal"]


def _library():
    from .backends import get_backend

    return get_backend("cuda")


def cuda_refusal(device: torch.device) -> str | None:
    """Why the CUDA library cannot run MSAM on ``device``, or None."""
    try:
        library = _library()
    except (RuntimeError, ValueError) as error:
        return str(error)
    if device.type not in library.capabilities.device_types:
        return f"it runs CUDA tensors, not {device.type.upper()} ones"
    if not hasattr(library.ops, "msam_apply"):
        return "the loaded CUDA library predates MSAM (rebuild it: reinstall, or clear the JIT cache)"
    return None


def _launch(run: TableRun) -> dict:
    return {"runs": run.table, "like": run.like}


class CudaMSAM:
    name = "cuda"

    def __init__(self) -> None:
        self.ops = _library().ops

    def stats(self, bucket: Bucket, plan: Plan, h: MSAMHyper, status: Tensor) -> None:
        run = plan.run
        if run.empty or run.programs() == 0:
            return
        partials = torch.empty((2, run.programs()), dtype=torch.float64, device=bucket.device)
        self.ops.msam_stats(
            **stats_arguments(run, h),
            partials=partials,
            **_launch(run),
        )
        status += partials.sum(dim=1)

    def apply(
        self, bucket: Bucket, plan: Plan, h: MSAMHyper, status: Tensor, scales: Tensor, group: int
    ) -> None:
        run = plan.run
        if run.empty or run.programs() == 0:
            return
        self.ops.msam_apply(
            **apply_tables(run, h.base),
            steps=bucket.steps,
            status=status,
            scales=scales,
            group=group,
            adam=h.base == "adamw",
            scalars=library_scalars(h),
            **_launch(run),
        )
        index = torch.tensor(plan.indices, device=bucket.device)
        bucket.steps.index_add_(0, index, (status[1] == 0).to(torch.float32).expand(len(plan.indices)))
        bucket.counts_moved()

    def _move(self, bucket: Bucket, run: TableRun, s0: Tensor | None, scales: Tensor, group: int) -> None:
        if run.programs():
            self.ops.msam_move(
                param=run.addresses("param"),
                weight=run.addresses(WEIGHT),
                s0=s0,
                steps=bucket.steps,
                scales=scales,
                group=group,
                **_launch(run),
            )

    def restore(self, bucket: Bucket) -> None:
        self._move(bucket, bucket.all_run(), None, bucket.steps.new_zeros(1, dtype=torch.float64), 0)

    def perturb(self, bucket: Bucket, run: TableRun, base: str, scales: Tensor, group: int) -> None:
        self._move(bucket, run, run.addresses(state_roles(base)[0]), scales, group)
