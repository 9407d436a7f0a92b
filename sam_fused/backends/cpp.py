"""The compiled backends: hand-written C++ (CPU) and CUDA kernels.

The same operations as the Triton backend: ``cpp`` runs the C++/OpenMP loops of
``csrc/sam_fused_cpu*.cpp`` on CPU tensors, ``cuda`` the kernels of ``csrc/sam_fused_cuda.cu``
on CUDA tensors. Both libraries are compiled once (by setup.py or on first use, see
``sam_fused/_extension.py``) and register their operations as ``torch.ops.sam_fused_cpu`` /
``torch.ops.sam_fused_cuda``, called here with named arguments; a role a launch lacks is None.

One call covers a whole bucket: every role (``param``, ``grad``, ``backup``, a state) is the
plan's table of tensor addresses (``tables.py``), the run table says where each tensor's
elements are, and ``like``, a tensor of the element type, is what the library dispatches
on. The CPU library takes one row ``(0, numel, count index)`` per tensor
(``TableRun.tensor_rows``) and cuts tensors into its own thread-pool blocks; the CUDA
library takes the device chunk table the Triton kernels use (``TableRun.table``), one
thread block per chunk. GradScaler's ``1 / scale`` and the clipping coefficient stay on the
device: the operations take the status index to unscale by (``-1``: none) and a clip flag,
and the kernels read the factors from ``status`` as they load each gradient.

What they run: every variant (the libraries' element math is ``csrc/sam_fused_math.h``'s
functors, one per ``variants.Ascent`` and ``variants.Descent`` rule), and the base updates
the loaded library reports (``functors``: each ``BaseSpec.kernel`` it has a functor for).
``cpp`` also takes float64 (math in double). GCSAM's centralization is one library call
over the bucket's row table; RSAM's noise draw is PyTorch's (``torch.randn``, the reference's
draw), as on the Triton backend.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .. import status as S
from .._extension import BackendInfo, _Extension, cpu_extension, cuda_extension
from ..base_updates import REGISTRY, BaseSpec
from ..context import StepContext
from ..layout import Bucket, Plan
from ..tables import TableRun
from ..variants import Ascent, Descent
from .protocol import Capabilities
from .reference import centralize_each

__all__ = ["CppBackend", "CudaBackend", "fused_bases"]

_NARROW = frozenset({torch.float32, torch.bfloat16, torch.float16})
# the descent rule's roles of an update: what it reads (aux) and the g_v it stores
_DESCENT_ROLES: dict[Descent, tuple[str | None, str | None]] = {
    Descent.PLAIN: (None, None),
    Descent.GSAM: ("first_grad", None),
    Descent.LOOKSAM_FULL: ("first_grad", "looksam_gv"),
    Descent.LOOKSAM_REUSE: ("looksam_gv", None),
}
_FUNCTOR = re.compile(r"^(\w+):(\w+)=(\d+)$")


def _capabilities(device_type: str, dtypes: frozenset[torch.dtype]) -> Capabilities:
    # the fused bases are the loaded library's (an instance's capabilities, see fused_bases);
    # what is checked before a library is loaded needs only devices, dtypes and variant rules
    return Capabilities(
        device_types={device_type},
        dtypes=dtypes,
        ascents=frozenset(Ascent),
        descents=frozenset(Descent),
        updates=frozenset(),
    )


def fused_bases(report: list[str]) -> frozenset[str]:
    """The base updates (``BaseSpec.name``) a library fuses, from its ``functors()`` report
    (``"base:ADAM=1"``...): every registered spec whose kernel number the library has under
    the spec's own name."""
    bases = {}
    for entry in report:
        found = _FUNCTOR.match(entry)
        if found is not None and found[1] == "base":
            bases[int(found[3])] = found[2].lower()
    return frozenset(spec.name for spec in set(REGISTRY.values()) if bases.get(spec.kernel) == spec.name)


class CppBackend:
    """Fused operations from the C++ CPU extension (CPU tensors)."""

    name = "cpp"
    device_type = "cpu"
    dtypes = _NARROW | {torch.float64}
    capabilities = _capabilities("cpu", dtypes)
    # the kernels multiply by 1 / scale as they read a gradient; the buffers keep scale * g
    unscales_in_place = False

    def __init__(self) -> None:
        ops = self.extension().ops()
        if ops is None:
            raise RuntimeError(f"the {self.name} backend is unavailable: {self.extension().info().detail}")
        self.ops = ops
        _, chunk, max_slots = (int(c) for c in ops.constants())
        self._chunk = chunk
        self._max_slots = max_slots
        self.capabilities = replace(type(self).capabilities, updates=fused_bases(list(ops.functors())))

    @classmethod
    def extension(cls) -> _Extension:
        return cpu_extension()

    @classmethod
    def info(cls) -> BackendInfo:
        """Whether the library is here (loading or building it on first call)."""
        return cls.extension().info()

    # ------------------------------------------------------------------ runs
    def _slots(self, n: int) -> int:
        # the same pure function of a tensor's length as stats_slots() in sam_fused_common.h
        return max(1, min(-(-n // self._chunk), self._max_slots))

    def _rows(self, run: TableRun) -> Tensor:
        """What the library's ``runs`` argument gets for this run."""
        return run.tensor_rows()

    def _partials(self, run: TableRun) -> int:
        """Partial sums a statistics call writes for this run."""
        return sum(self._slots(n) for n in map(Tensor.numel, run.weights))

    def _launch(self, run: TableRun) -> dict[str, Any]:
        """What every operation over ``run`` takes besides its roles and switches."""
        return {"runs": self._rows(run), "like": run.like}

    @staticmethod
    def _unscale(ctx: StepContext, index: int) -> int:
        """The status entry whose ``1 / scale`` the kernels multiply gradients by, or -1."""
        return index if ctx.unscale else -1

    def _copy(self, run: TableRun, dst: str, src: str, if_skipped: Tensor | None = None) -> None:
        """``dst <- src`` over ``run`` (only when ``if_skipped``'s step is skipped, if given)."""
        dst_table, src_table = run.addresses(dst), run.addresses(src)
        self.ops.copy(dst=dst_table, src=src_table, if_skipped=if_skipped, **self._launch(run))

    # ------------------------------------------------------------------ ascent
    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        slots = plan.cache.get(self.name)
        if slots is None:
            slots = plan.cache[self.name] = self._partials(plan.run)
        return slots

    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        """GCSAM: the rows of every contiguous gradient in one call (TableRun.centralize_rows); a
        gradient of another memory layout one by one in PyTorch."""
        rows, lengths, loose = plan.run.centralize_rows()
        if rows.numel():
            self.ops.centralize(rows=rows, lengths=lengths, like=plan.run.like)
        centralize_each(bucket, loose)

    def noise(self, bucket: Bucket, ctx: StepContext, std: float, generator: torch.Generator) -> None:
        """RSAM: ``delta`` from one draw for the whole bucket, split in parameter order (the
        reference's, so every backend sees the same noise); backup, then ``w <- w + delta``."""
        run = bucket.all_run()
        draw = torch.randn(sum(bucket.numels), generator=generator, device=bucket.device, dtype=torch.float32)
        pieces = torch.split(draw.mul_(std), bucket.numels)
        deltas = run.tensors("rsam_delta")
        torch._foreach_copy_(deltas, [piece.view(d.shape) for piece, d in zip(pieces, deltas)])
        self._copy(run, "backup", "param")
        torch._foreach_add_(run.weights, deltas)

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext, partials: Tensor
    ) -> None:
        run, variant = plan.run, ctx.variant
        adaptive = bool(group["adaptive"])
        c1, c2 = ctx.scalars
        self.ops.stats(
            grad=run.addresses("grad"),
            param=run.addresses("param") if adaptive else None,
            aux=run.addresses(variant.aux_role) if variant.aux_role else None,
            vsteps=bucket.vsteps,
            partials=partials,
            status=ctx.status,
            rule=int(variant.ascent),
            unscale=self._unscale(ctx, S.INV_SCALE1),
            eta=float(group["eta"]) if adaptive else 0.0,
            c1=c1,
            c2=c2,
            **self._launch(run),
        )

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        run, variant = plan.run, ctx.variant
        adaptive = bool(group["adaptive"])
        c1, c2 = ctx.scalars
        self.ops.perturb(
            param=run.addresses("param"),
            # RSAM: from w before the noise
            src=run.addresses("backup" if variant.perturbs_before_pass else "param"),
            grad=run.addresses("grad"),
            backup=None if variant.perturbs_before_pass else run.addresses("backup"),
            aux=run.addresses(variant.aux_role) if variant.aux_role else None,
            keep=run.addresses("first_grad") if variant.keeps_first_grad else None,
            prev=run.addresses("state_prev") if variant.ascent_updates_state else None,
            vsteps=bucket.vsteps,
            status=ctx.status,
            rule=int(variant.ascent),
            rho=float(group["rho"]),
            eta=float(group["eta"]) if adaptive else 0.0,
            norm_eps=float(ctx.norm_eps),
            c1=c1,
            c2=c2,
            unscale=self._unscale(ctx, S.INV_SCALE1),
            adaptive=adaptive,
            normalized=bool(variant.normalized),
            check=bool(ctx.check),
            **self._launch(run),
        )
        left_out = bucket.complement_run(plan)
        if left_out is not None:
            if variant.perturbs_before_pass:  # parameters that took no part lose their noise
                self._copy(left_out, "param", "backup")
            if variant.keeps_first_grad:  # and have g = 0, not last step's
                torch._foreach_zero_(left_out.tensors("first_grad"))

    # ------------------------------------------------------------------ descent
    def revert_state(self, bucket: Bucket, plan: Plan, ctx: StepContext, force: bool = False) -> None:
        self._copy(plan.run, ctx.variant.running_state, "state_prev", None if force else ctx.status)

    def descent_stats(self, bucket: Bucket, plan: Plan, ctx: StepContext, partials: Tensor) -> None:
        run = plan.run
        self.ops.descent_stats(
            grad=run.addresses("grad"),
            first_grad=run.addresses("first_grad") if ctx.variant.keeps_first_grad else None,
            partials=partials,
            status=ctx.status,
            unscale=self._unscale(ctx, S.INV_SCALE2),
            want_gp2=bool(ctx.clip),
            **self._launch(run),
        )

    def restore(self, bucket: Bucket, plan: Plan | None) -> None:
        run = bucket.all_run() if plan is None else plan.run  # None: every parameter (RSAM)
        if not run.empty:
            self._copy(run, "param", "backup")

    def update(
        self,
        bucket: Bucket,
        perturbed: Plan | None,
        plan: Plan,
        spec: BaseSpec,
        ctx: StepContext,
        descent: Descent,
    ) -> None:
        if perturbed is plan:
            source = "backup"  # the restore fused into the update
        else:
            if perturbed is not None:
                self.restore(bucket, perturbed)
            source = "param"
        if plan.empty:
            return
        run = plan.run
        # the base's state in state_names() order, as state0, state1...; None beyond
        states: dict[str, Tensor | None] = dict.fromkeys(("state0", "state1", "state2"))
        states.update((f"state{k}", run.addresses(name)) for k, name in enumerate(spec.state_names()))
        aux, gv = _DESCENT_ROLES[descent]
        self.ops.update(
            src=run.addresses(source),
            param=run.addresses("param"),
            grad=run.addresses("grad"),
            **states,
            aux=run.addresses(aux) if aux else None,
            gv=run.addresses(gv) if gv else None,
            steps=bucket.steps,
            status=ctx.status,
            base=spec.kernel,
            scalars=[float(h) for h in spec.kernel_scalars()],
            options=int(spec.kernel_options()),
            device_scalars=[float(d) for d in spec.device_scalars()],
            lr=float(spec.lr),  # a CUDA tensor lr costs a sync here (Triton reads it on the device)
            descent=int(descent),
            alpha=float(ctx.alpha),
            # the descent gradient: the second pass's (a one-pass step writes both entries),
            # clipped by status[CLIP] when max_grad_norm is set
            unscale=self._unscale(ctx, S.INV_SCALE2),
            clip=bool(ctx.clip),
            check=bool(ctx.check),
            **self._launch(run),
        )

    def state_sumsq(self, bucket: Bucket, plan: Plan, name: str, partials: Tensor) -> None:
        """The sum of squares of state ``name`` over the plan into ``partials[0]`` (LookSAM's
        ``||g_v||^2``): the first pass's statistics over the state, with the gradient's rule."""
        run = plan.run
        self.ops.stats(
            grad=run.addresses(name),
            param=None,
            aux=None,
            vsteps=bucket.vsteps,
            partials=partials,
            status=None,
            rule=int(Ascent.GRAD),
            unscale=-1,
            eta=0.0,
            c1=0.0,
            c2=0.0,
            **self._launch(run),
        )

    def advance_steps(
        self, bucket: Bucket, plan: Plan, ctx: StepContext, count_skip: bool, base: bool, variant: bool
    ) -> None:
        self.ops.advance_steps(
            steps=bucket.steps,
            vsteps=bucket.vsteps,
            mask=bucket.mask_of(plan),
            status=ctx.status,
            base=bool(base),
            variant=bool(variant),
            check=bool(ctx.check),
            count_skip=bool(count_skip),
        )


class CudaBackend(CppBackend):
    """The same operations from the CUDA extension (CUDA tensors, no host sync).

    The run table is the device chunk table the Triton kernels use (``TableRun.table``):
    one thread block per chunk, one partial sum per chunk, update counts per tensor.
    """

    name = "cuda"
    device_type = "cuda"
    dtypes = _NARROW
    capabilities = _capabilities("cuda", dtypes)

    @classmethod
    def extension(cls) -> _Extension:
        return cuda_extension()

    def _rows(self, run: TableRun) -> Tensor:
        return run.table

    def _partials(self, run: TableRun) -> int:
        return run.programs()
