"""The global norm of finite gradients never overflows, on every backend.

A float32 (or bfloat16) gradient entry above about 1.8e19 is finite, but its square is not
representable in float32: a norm summed in float32 comes out infinite, the perturbation
``rho g / ||g||`` becomes zero, and the step silently turns into a plain base step. The
sums of squares are taken in float64 (``status.py``); this checks the step against the
same step computed in float64 here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_BACKENDS, DEVICE, supports

from sam_fused import SAM

SIZES = [(7,), (4097,), (3, 5)]


CASES = [
    pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
    for backend in ALL_BACKENDS
    for dtype in (torch.float32, torch.bfloat16)
    if supports(backend, "sam", dtype)
]


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("backend,dtype", CASES)
def test_huge_finite_gradients_perturb_along_the_gradient(backend, dtype, adaptive):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) for s in SIZES]
    grads = [torch.randn(s, generator=gen) * 1e20 for s in SIZES]  # |g|^2 ~ 1e40 > float32's max
    params = [torch.nn.Parameter(w.to(DEVICE, dtype)) for w in weights]
    # rho / sqrt(numel) must exceed bfloat16's spacing near |w| ~ 1 (2^-7), or no weight moves
    rho, eta = (1.0 if dtype == torch.bfloat16 else 0.05), 0.01
    opt = SAM(params, torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, lr=0.0, backend=backend)
    for p, g in zip(params, grads):
        p.grad = g.to(DEVICE, dtype)
    stored = [p.grad.double().cpu() for p in params]  # the gradients as the optimizer sees them
    w64 = [p.detach().double().cpu() for p in params]
    assert all(torch.isfinite(g).all() for g in stored)
    opt.first_step()
    t = [w.abs() + eta if adaptive else torch.ones_like(w) for w in w64]
    norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, stored)))
    assert torch.isfinite(norm) and norm > 3.4e38**0.5  # its square is out of float32's range
    for p, w, ti, g in zip(params, w64, t, stored):
        expected = (w + rho * ti * ti * g / norm).to(dtype)
        torch.testing.assert_close(
            p.detach().cpu(), expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6
        )
        assert not torch.equal(p.detach().cpu(), w.to(dtype)), "the step was taken as a plain base step"
    opt.second_step()
    assert opt.skipped_steps.item() == 0
