"""Small helpers shared by several test files."""

from __future__ import annotations

import torch


@torch.no_grad()
def copy_run_state(
    source: tuple[list[torch.Tensor], object], target: tuple[list[torch.Tensor], object]
) -> None:
    """Make ``target``'s weights and optimizer state equal ``source``'s, in place.

    Two backends compared over several steps would otherwise drift apart by rounding (one
    bf16 ulp in the state grows into many ulps of small weights); resetting the second
    run to the first one before each step makes every step start from identical inputs.
    """
    (src_params, src_opt), (dst_params, dst_opt) = source, target
    for ps, pt in zip(src_params, dst_params, strict=True):
        pt.copy_(ps)
        for key, value in src_opt.state[ps].items():
            if key != "step":
                dst_opt.state[pt][key].copy_(value)
