"""Param groups into buckets, and the checks that a group still is what was laid out.

Parameters are split into buckets: one per param group, (real) dtype and layout. A
parameter that can move into a flat buffer goes with the others of its group and dtype; one
that cannot (a slice, shared memory, an aliased storage, a DTensor) goes to a table bucket
beside them (parameters left in place), and one whose memory has gaps to another table
bucket, which only the reference backend runs. Each bucket gets its backend from
:func:`~sam_fused.backends.choose_backend`.
Everything here validates and returns; the step engine then builds the buckets
(``StepEngine.add``), which is when parameters move.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import options
from .backends import Backend, choose_backend
from .base_updates import BaseSpec, check_group_values, spec_for
from .layout import Bucket, flat_layout_refusal
from .placement import table_layout_refusal
from .sharding import check_whole_rows, shard_group
from .variants import Descent, Variant

__all__ = ["check_groups", "fused_specs", "lay_out"]


def lay_out(
    groups: list[dict[str, Any]], start: int, known: list[Tensor], base: type, variant: Variant, request: str
) -> list[tuple[list[Tensor], int, Backend, str]]:
    """``(params, group index, backend, layout)`` of each bucket the groups (numbered from ``start``)
    would make, beside the parameters ``known`` already; a refusal raises here."""
    new = [p for g in groups for p in g["params"]]
    devices = {p.device for p in known + new}
    if len(devices) > 1:
        raise ValueError(options.several_devices(devices))
    shard_group(known + new)  # refuses a mix of DTensors and plain tensors
    if variant.centralize:
        check_whole_rows(new, variant.name.upper())
    laid_out = []
    for index, group in enumerate(groups, start):
        options.check_params(group["params"], index)
        kinds: dict[tuple, list[tuple[Tensor, str | None, str | None]]] = {}
        for p in group["params"]:
            flat_refusal = flat_layout_refusal(p)
            table_refusal = None if flat_refusal is None else table_layout_refusal(p)
            dtype = p.real.dtype if p.is_complex() else p.dtype  # a complex one as its real view
            kind = (dtype, flat_refusal is None, table_refusal is None)
            kinds.setdefault(kind, []).append((p, flat_refusal, table_refusal))
        for (dtype, _, _), members in kinds.items():
            flat_refusal = next((r for _, r, _ in members if r is not None), None)
            table_refusal = next((r for _, _, r in members if r is not None), None)
            backend, layout = choose_backend(
                request, members[0][0].device, dtype, variant, flat_refusal, table_refusal
            )
            if variant.descent != Descent.PLAIN:  # refused now, not halfway through a step
                spec, why = spec_for(base, group)
                if spec is None or not backend.capabilities.fuses(spec):
                    raise ValueError(
                        f"{variant.name} changes the descent gradient, which sam_fused fuses into "
                        f"torch.optim.SGD, Adam and AdamW only; param group {index} cannot take it "
                        f"({why or f'the {backend.name} backend does not fuse it'})"
                    )
            laid_out.append(([p for p, _, _ in members], index, backend, layout))
    return laid_out


def check_groups(
    groups: list[dict[str, Any]],
    laid_out: list[dict[str, Any]],
    keys: dict[str, str] | None,
    device: torch.device,
) -> None:
    """The groups are the ones laid out, their parameter lists unedited, and SAM's keys valid
    (not checked when ``keys`` is None).

    Run at every step, so it is cheap: identity checks, and the edit flag the group's
    :class:`~sam_fused.options.ParamList` keeps."""
    if len(groups) != len(laid_out):
        raise RuntimeError(options.groups_changed("param_groups gained or lost a group"))
    for index, (group, laid) in enumerate(zip(groups, laid_out)):
        params = group["params"]
        if group is not laid or not isinstance(params, options.ParamList) or params.edited:
            raise RuntimeError(options.groups_changed(f"param_groups[{index}]['params'] changed"))
        if keys is not None:
            options.check_group(group, keys, index, device)
        check_group_values(group, index, device)  # lr, betas, ...: one value each


def fused_specs(
    buckets: list[Bucket], groups: list[dict[str, Any]], base: type, device: torch.device
) -> tuple[list[BaseSpec] | None, str | None]:
    """Every bucket's fused base update, or ``(None, why)`` when the base optimizer's own
    ``step()`` must run (for all of them: it updates every group at once)."""
    specs = []
    for bucket in buckets:
        spec, reason = spec_for(base, groups[bucket.group_index])
        if spec is None or not bucket.backend.capabilities.fuses(spec):
            return None, reason or f"the {bucket.backend.name} backend does not fuse it"
        if isinstance(spec.lr, Tensor):
            options.check_tensor_scalar(spec.lr, "lr", bucket.group_index, device)
        specs.append(spec)
    return specs, None
