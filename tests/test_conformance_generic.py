"""Conformance with torch.optim, part two: torch's generic configurations (OptimizerInfo's
inputs for SGD and AdamW on non-contiguous parameters, tensor learning rates of 0, 1 and 2
dimensions), steps that must change nothing, copies, step hooks, complex parameters against
their real views, printing. The helpers are tests/test_conformance.py's, which holds the
checkpoint and state checks and the points of torch's own TestOptimRenewed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from conftest import ALL_BACKENDS
from test_conformance import BASES, CONFIGS, bits, loss_of, model_params, sam_step

from sam_fused import SAM


# ---------------------------------------------------------------------- configurations
@pytest.mark.parametrize("base,kwargs", CONFIGS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_configurations_go_the_right_direction_with_noncontiguous_params(base, kwargs, backend, device):
    """Every configuration of torch's suite, on parameters that are not contiguous: the loss
    goes down (up with maximize=True), and the fused backends follow the reference."""
    cls = BASES[base][0]
    kwargs = {**kwargs, "lr": kwargs.get("lr", 1e-2)}
    sign = -1.0 if kwargs.get("maximize") else 1.0
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)).to(device)
    runs = {}
    for name in dict.fromkeys(["reference", backend]):
        params = model_params(device, contiguous=False)
        opt = SAM(params, cls, rho=0.01, backend=name, **copy.deepcopy(kwargs))
        first = float(loss_of(params, x).detach())
        for _ in range(5):
            sam_step(opt, params, x)
        last = float(loss_of(params, x).detach())
        assert sign * last < sign * first, f"{name}: the loss went the wrong way"
        runs[name] = torch.cat([p.detach().flatten() for p in params])
    torch.testing.assert_close(runs[backend], runs["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "1-dim", "2-dim"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tensor_lr_of_any_shape_equals_a_float_lr(shape, backend, device):
    runs = []
    for lr in (0.05, torch.full(shape, 0.05, device=device)):
        params = model_params(device)
        opt = SAM(params, torch.optim.SGD, lr=lr, momentum=0.9, backend=backend)
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)).to(device)
        for _ in range(3):
            sam_step(opt, params, x)
        runs.append(torch.cat([p.detach().flatten() for p in params]))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_steps_without_gradients_change_nothing(backend, device):
    params = model_params(device)
    opt = SAM(params, torch.optim.AdamW, lr=0.1, backend=backend)
    before = [bits(p) for p in params]
    opt.first_step()
    opt.second_step()
    assert [bits(p) for p in params] == before and len(opt.state) == 0
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch.optim.AdamW(torch_params, lr=0.1).step()  # torch.optim: no gradient, no state either
    # zero gradients (no weight decay): the weights stay, as with torch.optim
    params = model_params(device)
    before = [bits(p) for p in params]
    opt = SAM(params, torch.optim.Adam, lr=0.1, backend=backend)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.first_step()
    opt.second_step()
    assert [bits(p) for p in params] == before


# ---------------------------------------------------------------------- copies
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_deepcopy_copies_every_public_attribute_and_works(backend, device):
    params = model_params(device)
    opt = SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    x = torch.randn(8, 3, device=device)
    for _ in range(2):
        sam_step(opt, params, x)
    copied = copy.deepcopy(opt)

    def public(o):
        return {k for k in o.__dict__ if not k.startswith("_")}

    assert public(copied) == public(opt) and public(opt) >= {
        "param_groups",
        "state",
        "defaults",
        "base_optimizer",
    }
    for name in ("variant", "variant_options", "norm_eps", "skip_nonfinite", "max_grad_norm", "backends"):
        assert getattr(copied, name) == getattr(opt, name)
    copied_params = copied.param_groups[0]["params"]
    sam_step(opt, params, x)
    sam_step(copied, copied_params, x)
    assert [bits(p) for p in params] == [bits(p) for p in copied_params]


# ---------------------------------------------------------------------- hooks
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.RMSprop], ids=["fused", "generic"])
@pytest.mark.parametrize("loop", ["closure", "manual"])
def test_step_hooks_fire_once_per_sam_step(base, loop, device):
    params = model_params(device)
    opt = SAM(params, base, lr=0.01)
    calls = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
        torch_optimizer.register_optimizer_step_pre_hook(
            lambda o, a, k: calls.append(("global-pre", o is opt))
        ),
        torch_optimizer.register_optimizer_step_post_hook(
            lambda o, a, k: calls.append(("global-post", o is opt))
        ),
    ]
    try:
        x = torch.randn(8, 3, device=device)
        for _ in range(2):
            if loop == "closure":
                sam_step(opt, params, x)
            else:
                loss_of(params, x).backward()
                opt.first_step(zero_grad=True)
                loss_of(params, x).backward()
                opt.second_step(zero_grad=True)
    finally:
        for handle in handles:
            handle.remove()
    one = [("global-pre", True), "pre", "post", ("global-post", True)]
    assert calls == one * 2


def test_a_pre_hook_may_replace_the_closure(device):
    params = model_params(device)
    opt = SAM(params, torch.optim.SGD, lr=0.01)
    x = torch.randn(8, 3, device=device)
    seen = []

    def replacement():
        seen.append(1)
        opt.zero_grad()
        loss = loss_of(params, x)
        loss.backward()
        return loss

    opt.register_step_pre_hook(lambda o, args, kwargs: ((replacement,), kwargs))
    opt.step(lambda: pytest.fail("the replaced closure ran"))
    assert seen == [1, 1]


# ---------------------------------------------------------------------- complex parameters
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
def test_complex_parameters_train_as_their_real_views(backend, base, device):
    """torch.optim optimizes a complex tensor as its real view; the norm counts |g|^2."""
    torch.manual_seed(0)
    values = torch.randn(4, 3, dtype=torch.complex64, device=device)
    bias = torch.randn(3, device=device)
    complex_params = [torch.nn.Parameter(values.clone()), torch.nn.Parameter(bias.clone())]
    real_params = [torch.nn.Parameter(torch.view_as_real(values).clone()), torch.nn.Parameter(bias.clone())]
    kw = dict(lr=0.05, momentum=0.9) if base is torch.optim.SGD else dict(lr=0.05)
    opts = [SAM(ps, base, rho=0.1, backend=backend, **kw) for ps in (complex_params, real_params)]
    x = torch.randn(6, 4, dtype=torch.complex64, device=device)

    def loss(ps, as_real):
        w = torch.view_as_complex(ps[0]) if as_real else ps[0]
        return ((x @ w).abs() + ps[1]).square().sum()

    for _ in range(3):
        for opt, ps, as_real in ((opts[0], complex_params, False), (opts[1], real_params, True)):
            loss(ps, as_real).backward()
            opt.first_step(zero_grad=True)
            loss(ps, as_real).backward()
            opt.second_step(zero_grad=True)
    torch.testing.assert_close(
        torch.view_as_real(complex_params[0].detach()), real_params[0].detach(), rtol=1e-6, atol=1e-6
    )
    state = opts[0].state[complex_params[0]]
    name = "momentum_buffer" if base is torch.optim.SGD else "exp_avg"
    assert (
        state[name].is_complex() and state[name].shape == complex_params[0].shape
    )  # as torch.optim keeps it


# ---------------------------------------------------------------------- printing
def test_printing_shows_the_groups():
    opt = SAM(model_params("cpu"), torch.optim.SGD, rho=0.07, lr=0.01)
    text = repr(opt)
    assert text.startswith("SAM (") and "Parameter Group 0" in text
    assert "rho: 0.07" in text and "lr: 0.01" in text and "params" not in text.split("\n", 1)[1].split(":")[0]
