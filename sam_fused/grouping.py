"""Param groups into buckets, and the checks that a group still is what was laid out.

Parameters are split into buckets: one per param group, (real) dtype, alias layer
(``placement.alias_layers``: parameters that share memory go to different layers) and kind
(dense, or strided with gaps, which only foreach and the reference run). Each bucket gets its
backend from :func:`~sam_fused.backends.choose_backend`. Everything here validates and
returns; the step engine then builds the buckets (``StepEngine.adopt``). No parameter moves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import options
from .backends import Backend, choose_backend
from .base_updates import REGISTRY, BaseSpec, check_group_values, spec_for
from .layout import Bucket
from .placement import alias_layers, kernel_refusal, local_tensor, memory_span
from .sharding import check_whole_rows, shard_group
from .variants import Descent, Variant

__all__ = ["check_groups", "fused_bases", "fused_specs", "lay_out", "layers_of"]


def fused_bases() -> str:
    """The base optimizers whose update sam_fused fuses, as refusals name them: the registry's
    classes, e.g. "torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW and sam_fused.Lion"."""
    names = [f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__qualname__}" for cls in REGISTRY]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def layers_of(params: list[Tensor]) -> list[int]:
    """Each parameter's alias layer: 0 unless it shares memory with an earlier one."""
    return alias_layers([memory_span(local_tensor(p)) for p in params])


def lay_out(
    groups: list[dict[str, Any]], start: int, known: list[Tensor], base: type, variant: Variant, request: str
) -> list[tuple[list[Tensor], int, Backend, int]]:
    """``(params, group index, backend, layer)`` of each bucket the groups (numbered from
    ``start``) would make, beside the parameters ``known`` already; a refusal raises here."""
    new = [p for g in groups for p in g["params"]]
    devices = {p.device for p in known + new}
    if len(devices) > 1:
        raise ValueError(options.several_devices(devices))
    shard_group(known + new)  # refuses a mix of DTensors and plain tensors
    if variant.centralize:
        check_whole_rows(new, variant.name.upper())
    layer_of = dict(zip(map(id, known + new), layers_of(known + new)))
    laid_out = []
    for index, group in enumerate(groups, start):
        options.check_params(group["params"], index)
        kinds: dict[tuple, list[tuple[Tensor, str | None]]] = {}
        for p in group["params"]:
            refusal = kernel_refusal(p)
            dtype = p.real.dtype if p.is_complex() else p.dtype  # a complex one as its real view
            kinds.setdefault((layer_of[id(p)], dtype, refusal is None), []).append((p, refusal))
        for (layer, dtype, _), members in kinds.items():
            refusal = next((r for _, r in members if r is not None), None)
            backend = choose_backend(request, members[0][0].device, dtype, variant, refusal)
            if variant.descent != Descent.PLAIN:  # refused now, not halfway through a step
                spec, why = spec_for(base, group)
                if spec is None or not backend.capabilities.fuses(spec):
                    raise ValueError(
                        f"{variant.name} changes the descent gradient, which sam_fused fuses into "
                        f"{fused_bases()} only; param group {index} cannot take it "
                        f"({why or f'the {backend.name} backend does not fuse it'})"
                    )
            laid_out.append(([p for p, _ in members], index, backend, layer))
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
