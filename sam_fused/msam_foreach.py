"""MSAM on the foreach backend: the rules over the bucket's flat buffers.

A plan's parameters cover a few segments of every flat buffer (``backends/flat_runs.py``;
one for the usual plan), so the math is a handful of large tensor operations per bucket;
the parameters themselves are read (gathered into the ``msam_p`` scratch buffer, only where
the math needs them) and written with ``torch._foreach_*``. The new first moment the
statistics pass computes is kept for the apply pass of the same step, in the scratch buffer
``msam_v`` (a fresh tensor each step costs its page faults on the CPU). The skip flag, the
update counts and the scale are read on the host: free for CPU tensors, one synchronisation
per step elsewhere (``triton`` is ``auto``'s choice on CUDA). The padding between
parameters is zeros in every buffer and stays zero.
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
_MOMENT = "msam_v"  # the new first moment, from the statistics pass to the apply pass


def _moment(h: MSAMHyper, g: Tensor, p: Tensor | None, s0: Tensor, out: Tensor | None) -> Tensor:
    """``first_moment`` of ``msam_rules`` over flat tensors of the math dtype, into ``out``
    (a scratch buffer: a fresh tensor per step would cost its page faults) or a new tensor."""
    v = torch.mul(s0, h.momentum if h.base == "sgd" else h.beta1, out=out)
    if h.base == "adamw":
        return v.add_(g, alpha=1.0 - h.beta1)
    v.add_(g)
    return v.add_(p, alpha=h.weight_decay) if h.weight_decay != 0 else v


def _sum_of_squares(v: Tensor) -> Tensor:
    """``sum(v^2)`` in float64 from float32 norms of 16-element rows (a segment's length is a
    multiple of 16): no float64 copy of ``v``, and no float32 overflow of the whole sum."""
    if v.dtype == torch.float64:
        return torch.dot(v, v)
    return torch.linalg.vector_norm(v.view(-1, 16), dim=1).to(torch.float64).square().sum()


def _nonfinite(g: Tensor) -> Tensor:
    """1 when ``g`` holds a NaN or an infinity, else 0: its min and max propagate both (one
    pass, no temporary)."""
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=g.device)
    low, high = torch.aminmax(g)
    return (~(torch.isfinite(low) & torch.isfinite(high))).to(torch.float64)


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
            out = flat.buffer(_MOMENT, seg) if bucket.dtype == ct else None
            v = _moment(h, g.to(ct), p, flat.buffer(state_roles(h.base)[0], seg).to(ct), out)
            status[SUMSQ] += _sum_of_squares(v)
            status[BAD] += _nonfinite(g)
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
            w = stored if stored.dtype == ct else stored.to(ct)  # updated in place
            if any(count == 0 for _, _, count in runs):  # no stored w yet: the parameter is w
                p = self._gathered(plan, flat, seg, ct) if p is None else p
                for lo, hi, count in runs:
                    if count == 0:
                        w[lo:hi] = p[lo:hi]
            if h.base == "sgd":
                w.add_(v, alpha=-h.lr)
            else:
                g, s1 = flat.buffer("grad", seg).to(ct), flat.buffer(roles[1], seg)
                s = torch.mul(s1.to(ct), h.beta2).add_(torch.mul(g * g, 1.0 - h.beta2))
                for lo, hi, count in runs:
                    t = count + 1
                    denom = s[lo:hi].sqrt() / (1 - h.beta2**t) ** 0.5 + h.eps
                    w[lo:hi] -= h.lr / (1 - h.beta1**t) * (v[lo:hi] / denom)
                w.mul_(1 - h.lr * h.weight_decay)
                s1.copy_(s)
            if w is not stored:
                stored.copy_(w)
            s0.copy_(v)
            # w~ = w - c v from the stored (rounded) values, as perturb() computes it
            params = plan.run.weights[seg.slots]
            if stored.dtype == ct:  # in place: no temporary
                torch._foreach_copy_(params, flat.views(WEIGHT, seg))
                torch._foreach_add_(params, flat.views(roles[0], seg), alpha=-c)
            else:
                perturbed = torch.add(stored.to(ct), s0.to(ct), alpha=-c)
                torch._foreach_copy_(params, flat.views_of(perturbed, seg))
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
        v = [t.to(ct) for t in views(state_roles(base)[0], held)]
        torch._foreach_copy_([bucket.weight(i) for i in held], torch._foreach_add(w, v, alpha=-c))
