"""MSAM on the foreach backend: the rules over the bucket's flat buffers.

A plan's parameters cover a few segments of every flat buffer (``backends/flat_runs.py``;
one for the usual plan), so the math is a handful of large tensor operations per bucket;
the parameters themselves are read (gathered into the ``msam_p`` scratch buffer, only where
the math needs them) and written with ``torch._foreach_copy_``. The new first moment the
statistics pass computes is kept for the apply pass of the same step (one temporary of the
bucket's size). The skip flag, the update counts and the scale are read on the host: free
for CPU tensors, one synchronisation per step elsewhere (``triton`` is ``auto``'s choice on
CUDA). The padding between parameters is zeros in every buffer and stays zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends.flat_runs import FlatRun, Segment
from .layout import Bucket, Plan
from .msam_rules import BAD, SUMSQ, WEIGHT, MSAMHyper, compute_dtype, state_roles
from .tables import TableRun

__all__ = ["ForeachMSAM"]

_GATHERED = "msam_p"  # the parameters' values, gathered flat (scratch of one step)


def _moment(h: MSAMHyper, g: Tensor, p: Tensor | None, s0: Tensor) -> Tensor:
    """``first_moment`` of ``msam_rules`` over flat tensors of the math dtype."""
    if h.base == "sgd":
        d = g + h.weight_decay * p if h.weight_decay != 0 else g
        return torch.mul(s0, h.momentum).add_(d)
    return torch.mul(s0, h.beta1).add_(torch.mul(g, 1.0 - h.beta1))


class ForeachMSAM:
    name = "foreach"

    @staticmethod
    def _flat(plan: Plan) -> FlatRun:
        flat = plan.cache.get("msam_flat")
        if flat is None:
            flat = plan.cache["msam_flat"] = FlatRun(plan.run.storage, plan.indices)
        return flat

    @staticmethod
    def _gathered(plan: Plan, flat: FlatRun, seg: Segment, ct: torch.dtype) -> Tensor:
        torch._foreach_copy_(flat.views(_GATHERED, seg), plan.run.weights[seg.slots])
        return flat.buffer(_GATHERED, seg).to(ct)

    def stats(self, bucket: Bucket, plan: Plan, h: MSAMHyper, status: Tensor) -> None:
        if plan.empty:
            return
        ct, flat = compute_dtype(bucket.dtype), self._flat(plan)
        moments = []
        for seg in flat.segments:
            g = flat.buffer("grad", seg)
            p = self._gathered(plan, flat, seg, ct) if h.base == "sgd" and h.weight_decay != 0 else None
            v = _moment(h, g.to(ct), p, flat.buffer(state_roles(h.base)[0], seg).to(ct))
            status[SUMSQ] += torch.linalg.vector_norm(v, dtype=torch.float64).square()
            status[BAD] += torch.isfinite(g).logical_not().sum()
            moments.append((v, p))
        plan.cache["msam_moments"] = moments

    def apply(
        self, bucket: Bucket, plan: Plan, h: MSAMHyper, status: Tensor, scales: Tensor, group: int
    ) -> None:
        moments = plan.cache.pop("msam_moments", None)
        if plan.empty or bool(status[BAD] > 0):  # a host read (a sync off the CPU)
            return
        ct, flat, roles = compute_dtype(bucket.dtype), self._flat(plan), state_roles(h.base)
        c = float(scales[group])
        for seg, (v, p) in zip(flat.segments, moments):
            stored, s0 = flat.buffer(WEIGHT, seg), flat.buffer(roles[0], seg)
            runs = flat.counts(bucket.steps, seg, True)  # (lo, hi, count): usually one run
            w = stored.to(ct, copy=True)
            if any(count == 0 for _, _, count in runs):  # no stored w yet: the parameter is w
                p = self._gathered(plan, flat, seg, ct) if p is None else p
                for lo, hi, count in runs:
                    if count == 0:
                        w[lo:hi] = p[lo:hi]
            if h.base == "sgd":
                w.sub_(h.lr * v)
            else:
                g, s1 = flat.buffer("grad", seg).to(ct), flat.buffer(roles[1], seg)
                s = torch.mul(s1.to(ct), h.beta2).add_(torch.mul(g * g, 1.0 - h.beta2))
                for lo, hi, count in runs:
                    t = count + 1
                    denom = s[lo:hi].sqrt() / (1 - h.beta2**t) ** 0.5 + h.eps
                    w[lo:hi] -= h.lr / (1 - h.beta1**t) * (v[lo:hi] / denom)
                w.mul_(1 - h.lr * h.weight_decay)
                s1.copy_(s)
            stored.copy_(w)
            s0.copy_(v)
            perturbed = stored.to(ct) - s0.to(ct) * c  # from the stored (rounded) values
            torch._foreach_copy_(plan.run.weights[seg.slots], flat.views_of(perturbed, seg))
            bucket.steps[seg.first : seg.stop] += 1
        bucket.counts_moved()

    def restore(self, bucket: Bucket) -> None:
        counts = bucket.host_counts()[0]
        held = [i for i in range(len(bucket.params)) if counts[i] > 0]
        if held:
            torch._foreach_copy_([bucket.weight(i) for i in held], bucket.storage.views(WEIGHT, held))

    def perturb(self, bucket: Bucket, run: TableRun, base: str, scales: Tensor, group: int) -> None:
        """``p <- w - c v`` parameter by parameter, the same operations as ``apply``'s."""
        counts = bucket.host_counts()[0]
        held = [i for i in run.indices if counts[i] > 0]
        if not held:
            return
        ct, c, views = compute_dtype(bucket.dtype), float(scales[group]), bucket.storage.views
        w = [t.to(ct) for t in views(WEIGHT, held)]
        shift = torch._foreach_mul([t.to(ct) for t in views(state_roles(base)[0], held)], c)
        torch._foreach_copy_([bucket.weight(i) for i in held], torch._foreach_sub(w, shift))
