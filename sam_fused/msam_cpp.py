"""MSAM on the C++ CPU library (``csrc/sam_fused_cpu_msam.cpp``): one call per operation per
bucket, over the run's address tables, as the SAM operations of ``backends/cpp.py``.

MSAM's status (two float64 entries) lives in host memory for CPU tensors, so the library
reads the skip flag itself and a skipped step writes nothing; the scale is read on the host
(a memory read). The update counts are advanced by the library in the same call.
"""

from __future__ import annotations

from torch import Tensor

from ._extension import cpu_extension
from .layout import Bucket, Plan
from .msam_rules import WEIGHT, MSAMHyper, apply_tables, library_scalars, state_roles, stats_arguments
from .tables import TableRun

__all__ = ["CppMSAM", "cpp_refusal"]


def cpp_refusal() -> str | None:
    """Why the C++ library cannot run MSAM here, or None."""
    info = cpu_extension().info()
    if not info:
        return f"the C++ CPU library is unavailable: {info.detail}"
    if not hasattr(cpu_extension().ops(), "msam_apply"):
        return "the loaded C++ CPU library predates MSAM (rebuild it: reinstall, or clear the JIT cache)"
    return None


def _launch(run: TableRun) -> dict:
    return {"runs": run.tensor_rows(), "like": run.like}


class CppMSAM:
    name = "cpp"

    def __init__(self) -> None:
        self.ops = cpu_extension().ops()

    def stats(self, bucket: Bucket, plan: Plan, h: MSAMHyper, status: Tensor) -> None:
        run = plan.run
        if run.empty:
            return
        self.ops.msam_stats(
            **stats_arguments(run, h),
            status=status,
            **_launch(run),
        )

    def apply(
        self, bucket: Bucket, plan: Plan, h: MSAMHyper, status: Tensor, scales: Tensor, group: int
    ) -> None:
        run = plan.run
        if run.empty:
            return
        self.ops.msam_apply(
            **apply_tables(run, h.base),
            steps=bucket.steps,
            status=status,
            adam=h.base == "adamw",
            scalars=library_scalars(h),
            scale=float(scales[group]),
            **_launch(run),
        )
        bucket.counts_moved()

    def restore(self, bucket: Bucket) -> None:
        run = bucket.all_run()
        self.ops.msam_move(
            param=run.addresses("param"),
            weight=run.addresses(WEIGHT),
            s0=None,
            steps=bucket.steps,
            scale=0.0,
            **_launch(run),
        )

    def perturb(self, bucket: Bucket, run: TableRun, base: str, scales: Tensor, group: int) -> None:
        self.ops.msam_move(
            param=run.addresses("param"),
            weight=run.addresses(WEIGHT),
            s0=run.addresses(state_roles(base)[0]),
            steps=bucket.steps,
            scale=float(scales[group]),
            **_launch(run),
        )
