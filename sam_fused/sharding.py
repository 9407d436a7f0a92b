"""FSDP2 (``fully_shard``): the process group over which a step's local sums are added up.

A DTensor parameter cannot be re-pointed into a flat buffer, so its bucket keeps
parameters in place and runs the math on each rank's local shard (``Bucket.weight`` and
``Bucket.grad`` return ``p.to_local()`` views; ``opt.state`` shows DTensors again, see
``state.py``). Every rank then writes the partial sums of *its* elements into ``status``;
the step engine all-reduces (SUM) the finalized entries over :func:`shard_group`'s process
group, after which every rank holds the global norm, the global non-finite counts and the
global inner products, and takes the same decisions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .placement import is_dtensor

__all__ = ["check_whole_rows", "shard_group"]


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


def check_whole_rows(params: Iterable[Tensor], variant_name: str) -> None:
    """GCSAM centralizes each row (``g[i]`` minus its mean over the other dimensions) on the
    local shard alone: only right when a shard holds whole rows, i.e. a parameter of two or
    more dimensions is split along dimension 0 (FSDP2's ``fully_shard`` default). Refused
    otherwise, before anything is built (the local row means would be silently wrong)."""
    for p in params:
        if not is_dtensor(p) or p.dim() < 2:
            continue
        split = [pl.dim for pl in p.placements if pl.is_shard() and pl.dim != 0]
        if split:
            raise ValueError(
                f"{variant_name} centralizes each row of a gradient over its other dimensions, but a "
                f"DTensor parameter of shape {tuple(p.shape)} is sharded along dimension {split[0]}, "
                "so each rank holds parts of rows and their means would be wrong; shard along "
                "dimension 0 (fully_shard's default, shard_placement_fn=None) or use another variant"
            )
