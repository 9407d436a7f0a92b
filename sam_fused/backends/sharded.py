"""DTensor parameters (FSDP2's ``fully_shard``): the reference math on each rank's local shard.

A DTensor parameter cannot be re-pointed into a flat buffer, and running the reference
backend on the DTensors themselves would turn every per-parameter sum into a collective.
So this backend hands the reference backend a view of the bucket in which every parameter
is its local shard (``p.to_local()``, same storage) with the local shard of its gradient.
Every rank then writes the partial sums of *its* elements into ``status``; the optimizer
all-reduces (SUM) the finalized entries over :func:`shard_group`'s process group, after
which every rank holds the global norm, the global non-finite counts and the global inner
products, and takes the same decisions.

Optimizer state stays in ``torch.optim``'s form for DTensor parameters: per-element
entries (``momentum_buffer``, ``exp_avg``, ...) are DTensors with the parameter's mesh and
placements, so distributed checkpointing sees what it would see with ``torch.optim``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..layout import Bucket, Plan
from .reference import ReferenceBackend, StepContext

__all__ = ["ShardedBackend", "is_dtensor", "shard_group"]


def _dtensor_class() -> type | None:
    """DTensor, if anything imported it; no DTensor can exist before that, so no import here."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def _sharded_mesh_dims(p: Tensor) -> tuple[int, ...]:
    """The mesh dimensions over which ``p`` is split (FSDP2: the one data-parallel dim)."""
    dims = []
    for dim, placement in enumerate(p.placements):
        if placement.is_partial():
            raise ValueError(
                "a DTensor parameter with a Partial placement has no well-defined value; "
                "SAM needs Shard or Replicate placements"
            )
        if placement.is_shard():
            dims.append(dim)
    return tuple(dims)


def shard_group(params: Iterable[Tensor]) -> Any:
    """The process group over which local statistics are summed, or None.

    None when no parameter is a DTensor (nothing to reduce), or when every DTensor is
    replicated (each rank holds everything). Mixing DTensors with plain tensors, several
    meshes, or parameters sharded over different mesh dimensions is refused: one sum over
    one group could not count every element exactly once.
    """
    params = list(params)
    dtensors = [p for p in params if is_dtensor(p)]
    if not dtensors:
        return None
    if len(dtensors) != len(params):
        raise ValueError(
            f"{len(dtensors)} of the {len(params)} parameters are DTensors (FSDP2 / fully_shard) and "
            "the others plain tensors; one SAM optimizer needs all or none of them sharded, "
            "since its global norm sums each rank's shards. Apply fully_shard to the root "
            "module too, or build one optimizer per kind."
        )
    mesh = dtensors[0].device_mesh
    dims = _sharded_mesh_dims(dtensors[0])
    for p in dtensors[1:]:
        if p.device_mesh != mesh or _sharded_mesh_dims(p) != dims:
            raise ValueError(
                "the DTensor parameters live on different device meshes or are sharded over "
                "different mesh dimensions; SAM sums the norm over one process group"
            )
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError(
            f"parameters sharded over {len(dims)} mesh dimensions; SAM supports one sharded "
            "dimension (FSDP2, or HSDP's replicate x shard mesh)"
        )
    return mesh.get_group(dims[0])


class _LocalEntry(MutableMapping):
    """One parameter's optimizer state, seen as local tensors; writes become DTensors again."""

    def __init__(self, entry: dict, param: Tensor, local: Tensor) -> None:
        self._entry = entry
        self._param = param
        self._local = local

    def __getitem__(self, name: str) -> Any:
        value = self._entry[name]
        return value.to_local() if is_dtensor(value) else value

    def __setitem__(self, name: str, value: Any) -> None:
        # per-element state (same shape as the shard) goes back as a DTensor like torch.optim's;
        # scalars such as Adam's ``step`` stay plain tensors, as torch.optim keeps them
        if isinstance(value, Tensor) and name != "step" and value.shape == self._local.shape:
            from torch.distributed.tensor import DTensor

            p = self._param
            value = DTensor.from_local(
                value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        self._entry[name] = value

    def __delitem__(self, name: str) -> None:
        del self._entry[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entry)

    def __len__(self) -> int:
        return len(self._entry)


class _LocalState:
    """The optimizer's ``state``, indexed by local shards instead of DTensor parameters."""

    def __init__(self, state: dict, owners: dict[int, tuple[Tensor, Tensor]]) -> None:
        self._state = state
        self._owners = owners  # id(local view) -> (DTensor parameter, local view)

    def __getitem__(self, local: Tensor) -> _LocalEntry:
        param, view = self._owners[id(local)]
        return _LocalEntry(self._state[param], param, view)


class _LocalBucket:
    """A bucket whose ``params`` are the local shards, each with its local gradient.

    Everything else (backups, scratch tensors, step counts) is the real bucket's: those
    already hold local tensors, since the reference backend creates them from ``params``.
    """

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket
        self.params: list[Tensor] = []
        self.owners: dict[int, tuple[Tensor, Tensor]] = {}
        for p in bucket.params:
            local = p.to_local().detach()  # shares the shard's storage: writes reach the model
            grad = p.grad
            local.grad = None if grad is None else grad.to_local()
            self.params.append(local)
            self.owners[id(local)] = (p, local)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bucket, name)


class ShardedBackend:
    """The reference backend run on each rank's local shards of DTensor parameters."""

    name = "reference"  # not fused: parameters stay where FSDP2 put them
    unscales_in_place = False

    def __init__(self) -> None:
        self._inner = ReferenceBackend()

    @staticmethod
    def _local(bucket: Bucket, ctx: StepContext | None = None) -> tuple[_LocalBucket, StepContext | None]:
        view = _LocalBucket(bucket)
        if ctx is None:
            return view, None
        return view, replace(ctx, state=_LocalState(ctx.state, view.owners))

    def partial_slots(self, bucket: Bucket, plan: Plan) -> int:
        return self._inner.partial_slots(bucket, plan)

    def centralize(self, bucket: Bucket, plan: Plan) -> None:
        # FSDP2 shards dim 0, so every row a gradient-centralization mean runs over is whole
        self._inner.centralize(self._local(bucket)[0], plan)

    def noise(self, bucket: Bucket, ctx: StepContext, std: float, generator: torch.Generator) -> None:
        view, local_ctx = self._local(bucket, ctx)
        self._inner.noise(view, local_ctx, std, generator)

    def ascent_stats(
        self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext, partials: Tensor
    ) -> None:
        view, local_ctx = self._local(bucket, ctx)
        self._inner.ascent_stats(view, plan, group, local_ctx, partials)

    def perturb(self, bucket: Bucket, plan: Plan, group: dict, ctx: StepContext) -> None:
        view, local_ctx = self._local(bucket, ctx)
        self._inner.perturb(view, plan, group, local_ctx)

    def revert_state(self, bucket: Bucket, plan: Plan, ctx: StepContext) -> None:
        view, local_ctx = self._local(bucket, ctx)
        self._inner.revert_state(view, plan, local_ctx)

    def descent_stats(self, bucket: Bucket, plan: Plan, ctx: StepContext, partials: Tensor) -> None:
        view, local_ctx = self._local(bucket, ctx)
        self._inner.descent_stats(view, plan, local_ctx, partials)

    def restore(self, bucket: Bucket, plan: Plan) -> None:
        self._inner.restore(self._local(bucket)[0], plan)

    def update(
        self, bucket: Bucket, perturbed: Plan | None, plan: Plan, spec, ctx: StepContext, descent: int
    ) -> None:
        view, local_ctx = self._local(bucket, ctx)
        self._inner.update(view, perturbed, plan, spec, local_ctx, descent)

    def state_sumsq(self, bucket: Bucket, plan: Plan, name: str, state: dict, partials: Tensor) -> None:
        view = _LocalBucket(bucket)
        self._inner.state_sumsq(view, plan, name, _LocalState(state, view.owners), partials)

    def advance_steps(self, bucket: Bucket, plan: Plan, ctx: StepContext, count_skip: bool) -> None:
        self._inner.advance_steps(bucket, plan, ctx, count_skip)
