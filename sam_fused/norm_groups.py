"""SAM-ON's param groups: the normalization layers perturbed, every other parameter not.

Mueller et al. (NeurIPS 2023, "Normalization Layers Are All That Sharpness-Aware
Minimization Needs"; code: github.com/mueller-mp/SAM-ON, ``sam_on.py``) perturb only the
affine weights and biases of the normalization layers; every parameter still takes the base
update with the second-pass gradient. :func:`norm_param_groups` returns the two param groups
that say so to any sam_fused optimizer, through the group key ``perturb``
(``perturb_groups.py``).

The official code picks the normalization parameters *by name* (``'norm'`` or ``'bn'`` in
the parameter's name, its README asks users to name their layers so). Here they are picked
*by module type*, so that a layer named ``ln_1``, ``downsample.1`` or ``gn`` (timm,
torchvision and Hugging Face models name theirs so) is not silently left out, and a linear
layer named ``norm_proj`` is not silently put in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["NORM_LAYERS", "norm_param_groups"]

# the normalization layers of torch.nn (and their subclasses: isinstance); RMSNorm came
# with torch 2.4
NORM_LAYERS: tuple[type[nn.Module], ...] = tuple(
    cls
    for cls in (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
    )
    if cls is not None
)


def norm_param_groups(model: nn.Module, **group_options: Any) -> list[dict[str, Any]]:
    """SAM-ON's two param groups of ``model``: normalization layers first, then the rest.

    The first group holds the affine weights and biases of every normalization layer
    (:data:`NORM_LAYERS`, by type, subclasses included); the second every other parameter,
    with ``perturb=False``: it is not perturbed and not part of the ascent norm, and takes
    the base update with the second-pass gradient. ``group_options`` (``rho``,
    ``adaptive``, ``lr``, ``weight_decay``, ...) go into both groups. Parameters are listed
    once each, in the model's order; a parameter shared by a normalization layer and another
    module counts as a normalization parameter (it is perturbed). Parameters with
    ``requires_grad=False`` are left out, as frozen ones are by most group helpers.

    Example (the official recipe: elementwise ASAM, eta = 0, rho = 10, biases normalized)::

        opt = SAM(norm_param_groups(model), torch.optim.SGD, rho=10.0, adaptive=True, eta=0.0,
                  lr=0.1, momentum=0.9, weight_decay=5e-4)

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: ``group_options`` sets ``params`` or ``perturb`` (this function sets
            them), or the model has no trainable normalization parameters (SAM-ON would
            perturb nothing: a model without normalization layers needs plain SAM).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"norm_param_groups() takes a torch.nn.Module, got {type(model).__name__}")
    taken = sorted({"params", "perturb"} & group_options.keys())
    if taken:
        raise ValueError(
            f"norm_param_groups() sets {' and '.join(map(repr, taken))} itself; pass only the "
            "other group options (rho, adaptive, lr, ...), or build the groups by hand"
        )
    norm: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    norm.setdefault(id(p), p)
    if not norm:
        found = sorted({type(m).__name__ for m in model.modules() if isinstance(m, NORM_LAYERS)})
        why = (
            f"its normalization layers ({', '.join(found)}) have no trainable affine parameters"
            if found
            else f"it has none of {', '.join(cls.__name__ for cls in NORM_LAYERS)}"
        )
        raise ValueError(
            f"norm_param_groups(): the model has no normalization parameters to perturb ({why}). "
            "SAM-ON perturbs only normalization layers' weights and biases, so it would be the base "
            "optimizer with two passes per step; use plain SAM (SAM(model.parameters(), ...)), or "
            "add normalization layers with affine parameters"
        )
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in norm]
    return [
        {**group_options, "params": list(norm.values())},
        {**group_options, "params": rest, "perturb": False},
    ]
