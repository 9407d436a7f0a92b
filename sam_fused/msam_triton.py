"""MSAM on the Triton backend: one launch per operation per bucket (``kernels/msam.py``).

Nothing is read on the host: the skip flag, the update counts and the perturbation scale
stay on the device, so a step costs a statistics launch and an apply launch per bucket, two
tiny reductions, and no synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends.triton import WARPS
from .kernels import msam as K
from .layout import Bucket, Plan
from .msam_rules import WEIGHT, MSAMHyper, apply_tables, state_roles
from .tables import CHUNK, TableRun

__all__ = ["TritonMSAM"]


def _launch(kernel, run: TableRun, **args) -> None:
    kernel[(run.programs(),)](
        table=run.table, like=run.like, TABLE=run.layout_code, BLOCK=CHUNK, num_warps=WARPS, **args
    )


def _moment_args(h: MSAMHyper) -> dict:
    if h.base == "sgd":
        return {"momentum": h.momentum, "weight_decay": h.weight_decay, "one_minus_beta1": 0.0}
    return {"momentum": h.beta1, "weight_decay": 0.0, "one_minus_beta1": 1.0 - h.beta1}


class TritonMSAM:
    name = "triton"

    def stats(self, bucket: Bucket, plan: Plan, h: MSAMHyper, status: Tensor) -> None:
        run = plan.run
        if run.empty or run.programs() == 0:
            return
        partials = torch.empty((2, run.programs()), dtype=torch.float64, device=bucket.device)
        _launch(
            K.msam_stats_kernel,
            run,
            grad=run.addresses("grad"),
            param=run.addresses("param"),
            s0=run.addresses(state_roles(h.base)[0]),
            sumsq_out=partials[0],
            bad_out=partials[1],
            ADAM=h.base == "adamw",
            **_moment_args(h),
        )
        status += partials.sum(dim=1)

    def apply(
        self, bucket: Bucket, plan: Plan, h: MSAMHyper, status: Tensor, scale: Tensor, group: int
    ) -> None:
        run = plan.run
        if run.empty or run.programs() == 0:
            return
        adam = h.base == "adamw"
        scalars = None
        if adam:
            scalars = torch.tensor([h.beta1, h.beta2, h.lr], dtype=torch.float64).to(bucket.device)
        _launch(
            K.msam_apply_kernel,
            run,
            **apply_tables(run, h.base),
            steps=bucket.steps,
            status=status,
            scale=scale,
            device_scalars=scalars,
            group=group,
            lr=h.lr,
            beta2=h.beta2,
            one_minus_beta2=1.0 - h.beta2,
            eps=h.eps,
            decay=1.0 - h.lr * h.weight_decay,
            ADAM=adam,
            **_moment_args(h),
        )
        index = torch.tensor(plan.indices, device=bucket.device)
        bucket.steps.index_add_(0, index, (status[1] == 0).to(torch.float32).expand(len(plan.indices)))
        bucket.counts_moved()

    def restore(self, bucket: Bucket) -> None:
        run = bucket.all_run()
        if run.programs():
            _launch(
                K.msam_restore_kernel,
                run,
                param=run.addresses("param"),
                weight=run.addresses(WEIGHT),
                steps=bucket.steps,
            )

    def perturb(self, bucket: Bucket, run: TableRun, base: str, scale: Tensor, group: int) -> None:
        if run.programs():
            _launch(
                K.msam_perturb_kernel,
                run,
                param=run.addresses("param"),
                weight=run.addresses(WEIGHT),
                s0=run.addresses(state_roles(base)[0]),
                steps=bucket.steps,
                scale=scale,
                group=group,
            )
