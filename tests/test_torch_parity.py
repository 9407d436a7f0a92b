"""The fused base update against torch.optim itself, and the two backends against each other.

For every step, ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (``foreach=False``, the
single-tensor path) steps on a clone of the pre-perturbation weights with the very
second-pass gradients the SAM optimizer saw, its own state carried along from step to step.
The weights and state entries must agree to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import copy_run_state
from conftest import NEEDS_TRITON

from sam_fused import SAM

SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW

CONFIGS = {  # name: (class, options of group 0, overrides for group 1)
    "sgd": (SGD, dict(lr=0.1), dict(lr=0.03)),
    "sgd_momentum": (SGD, dict(lr=0.1, momentum=0.9), dict(lr=0.05, weight_decay=1e-2)),
    "sgd_dampening": (SGD, dict(lr=0.1, momentum=0.9, dampening=0.5), dict(momentum=0.5)),
    "sgd_nesterov_wd": (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2), dict(lr=0.2)),
    "sgd_wd_maximize": (SGD, dict(lr=0.05, weight_decay=1e-2, maximize=True), dict(weight_decay=0.1)),
    "sgd_all": (
        SGD,
        dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=5e-3, maximize=True),
        dict(lr=0.02, dampening=0.0),
    ),
    "adamw": (AdamW, dict(lr=1e-2), dict(lr=3e-2, weight_decay=0.3)),
    "adamw_amsgrad": (AdamW, dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1, amsgrad=True), dict(eps=1e-4)),
    "adamw_maximize": (AdamW, dict(lr=1e-2, maximize=True, eps=1e-6), dict(betas=(0.5, 0.6))),
    "adam": (Adam, dict(lr=1e-2, weight_decay=1e-2), dict(weight_decay=0.0)),
    "adam_amsgrad": (Adam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True, betas=(0.5, 0.95)), dict(lr=0.1)),
    "adam_maximize": (Adam, dict(lr=1e-2, maximize=True), dict(lr=2e-2, weight_decay=1e-3)),
}

STATE_KEYS = {SGD: ("momentum_buffer",), Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")}
STATE_KEYS[AdamW] = STATE_KEYS[Adam]


class Net(torch.nn.Module):
    """Awkward sizes, a 0-d and a 1-element parameter, and one transposed weight."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(13, 37)
        self.l2 = torch.nn.Linear(37, 5)
        self.w3 = torch.nn.Parameter(torch.randn(1, 5).t())  # column-major (5, 1) leaf
        self.scale = torch.nn.Parameter(torch.tensor(1.3))
        self.shift = torch.nn.Parameter(torch.randn(1))

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.scale * (torch.tanh(self.l2(h)) @ self.w3) + self.shift


def make_net(device, dtype=torch.float32, seed=0) -> Net:
    torch.manual_seed(seed)
    return Net().to(device=device, dtype=dtype)


def batch(device, step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(23, 13, generator=gen, dtype=torch.float64)
    y = torch.randn(23, 1, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def groups_of(params, overrides):
    """Group 0: the first layer; group 1: everything else, with its own options."""
    return [{"params": params[:2]}, {"params": params[2:], **overrides}]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    magnitude = x.double().abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - bits)


def assert_state_close(actual, expected, what):
    """State to float32 rounding, relative to the tensor's own scale.

    The state is carried separately on both sides, so rounding accumulates; and a running
    average like ``momentum * buf + g`` cancels, so one element's error is relative to the
    terms summed, not to the (possibly tiny) result. The scale is per tensor, never an
    absolute constant: exp_avg_sq is ~1e-6 here, and 1e-7 would hide it.
    """
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=2e-6, atol=1e-6 * scale + 1e-30, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_base_update_matches_torch_optim(device, backend, config):
    cls, options, overrides = CONFIGS[config]
    net = make_net(device)
    params = list(net.parameters())
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = SAM(groups_of(params, overrides), cls, rho=0.1, backend=backend, **options)
    ref = cls(groups_of(torch_params, overrides), foreach=False, **options)
    start = [p.detach().clone() for p in params]
    for step in range(4):
        x, y = batch(device, step)
        pre = [p.detach().clone() for p in params]
        F.mse_loss(net(x), y).backward()
        opt.first_step(zero_grad=True)
        assert any(not torch.equal(p.detach(), w) for p, w in zip(params, pre, strict=True))
        F.mse_loss(net(x), y).backward()
        second_grads = [p.grad.detach().clone() for p in params]
        opt.second_step(zero_grad=True)

        with torch.no_grad():
            for tp, w, g in zip(torch_params, pre, second_grads, strict=True):
                tp.copy_(w)  # the restored weights, exactly
                tp.grad = g
        ref.step()

        for i, (p, tp) in enumerate(zip(params, torch_params, strict=True)):
            torch.testing.assert_close(
                p.detach(),
                tp.detach(),
                rtol=1e-6,
                atol=1e-7,
                msg=lambda m, i=i, step=step: f"step {step}, param {i}: {m}",
            )
            mine, theirs = opt.state[p], ref.state[tp]
            for key in STATE_KEYS[cls]:
                assert (key in mine) == (key in theirs), f"step {step}, param {i}: state key {key!r}"
                if key not in theirs:
                    continue
                if key == "step":
                    assert float(mine[key]) == float(theirs[key]), f"step {step}, param {i}: step count"
                    continue
                assert_state_close(mine[key], theirs[key], f"step {step}, param {i}, state {key}")
    assert all(not torch.equal(p.detach(), s) for p, s in zip(params, start, strict=True))


# ---------------------------------------------------------------------------- triton vs reference

PAIR_CONFIGS = {
    "sam_sgd": (dict(rho=0.1), SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "asam_adamw": (dict(rho=0.5, adaptive=True, eta=0.01), AdamW, dict(lr=1e-2, amsgrad=True)),
    "asam0_sgd": (dict(rho=0.5, adaptive=True), SGD, dict(lr=0.05, momentum=0.5, dampening=0.2)),
    "usam_adam": (dict(rho=0.05, variant="usam"), Adam, dict(lr=1e-2, weight_decay=1e-3, maximize=True)),
}


def give_grads(params, grads):
    """Hand both optimizers the same gradients (accumulated like autograd would)."""
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)


@NEEDS_TRITON
@pytest.mark.parametrize("config", sorted(PAIR_CONFIGS))
def test_triton_matches_reference_on_a_model(device, config):
    """Same model, same gradients, several steps: the two backends agree to float32 rounding.

    The gradients come from autograd on the reference backend's model and are handed to
    both, so that a last-bit difference is not amplified through the network from step to
    step (each backend's autograd path is covered by test_textbook.py).
    """
    sam_kw, cls, options = PAIR_CONFIGS[config]
    nets = [make_net(device), make_net(device)]
    params = [list(net.parameters()) for net in nets]
    opts = [
        SAM(groups_of(ps, {"lr": 0.02}), cls, backend=backend, **sam_kw, **options)
        for ps, backend in zip(params, ("reference", "triton"), strict=True)
    ]
    assert opts[0].backends == ["reference", "reference"] and opts[1].backends == ["triton", "triton"]
    start = [p.detach().clone() for p in params[0]]
    for step in range(5):
        x, y = batch(device, step)
        grads = torch.autograd.grad(F.mse_loss(nets[0](x), y), params[0])
        for ps, opt in zip(params, opts, strict=True):
            give_grads(ps, grads)
            opt.first_step(zero_grad=True)
        for i, (a, b) in enumerate(zip(*params, strict=True)):
            torch.testing.assert_close(
                b, a, rtol=1e-6, atol=1e-7, msg=lambda m, i=i, step=step: f"step {step} eps {i}: {m}"
            )
        grads = torch.autograd.grad(F.mse_loss(nets[0](x), y), params[0])
        for ps, opt in zip(params, opts, strict=True):
            give_grads(ps, grads)
            opt.second_step(zero_grad=True)
        for i, (pr, pt) in enumerate(zip(*params, strict=True)):
            torch.testing.assert_close(
                pt.detach(),
                pr.detach(),
                rtol=1e-6,
                atol=1e-7,
                msg=lambda m, i=i, step=step: f"step {step} param {i}: {m}",
            )
            sr, st = opts[0].state[pr], opts[1].state[pt]
            assert set(sr) == set(st), f"step {step} param {i}: state keys {set(sr)} != {set(st)}"
            for key in sr:
                if key == "step":
                    assert float(sr[key]) == float(st[key])
                else:
                    assert_state_close(st[key], sr[key], f"step {step}, param {i}, state {key}")
    assert all(not torch.equal(p.detach(), s) for p, s in zip(params[0], start, strict=True))


CANCELLING = ("momentum_buffer", "exp_avg")


def assert_within_ulp(actual, expected, dtype, what, cancelling=False):
    """Within one ulp of ``dtype``; for running averages that can cancel (``cancelling``),
    plus float32 rounding of the tensor's scale (``m + (1 - beta1) * (g - m)`` may be exactly
    0 in one float32 evaluation and 5e-10 in another, fused, one)."""
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    tol = ulp(torch.maximum(a.abs(), b.abs()), dtype)
    if cancelling and b.numel():
        tol = tol + 1e-6 * b.abs().max()
    bad = (a - b).abs() > tol
    worst = f"{a[bad][:4].tolist()} vs {b[bad][:4].tolist()}"
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ by more than one ulp: {worst}"
    )


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", ["sam_sgd", "asam_adamw"])
def test_triton_matches_reference_low_precision(device, dtype, config):
    """The same gradients on both backends; bf16/fp16 weights and state within one ulp.

    One ulp, not zero: the Triton interpreter (CPU runs) truncates float32 -> bfloat16
    where the GPU rounds to nearest. A one-ulp difference in a stored momentum buffer then
    moves the next update by ``lr`` times that ulp, which can be many ulps of a small
    weight; so before each step the Triton side is set to the reference's weights and state
    (in place, through the parameters and ``optimizer.state``), and each step is compared
    from identical inputs while the step counts advance.
    """
    sam_kw, cls, options = PAIR_CONFIGS[config]
    shapes = [(4097,), (), (33, 65), (7,), (1,)]
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params = [[torch.nn.Parameter(w.to(device=device, dtype=dtype)) for w in init] for _ in range(2)]
    opts = [
        SAM(groups_of(ps, {"lr": 0.02, "rho": 0.3}), cls, backend=backend, **sam_kw, **options)
        for ps, backend in zip(params, ("reference", "triton"), strict=True)
    ]
    for step in range(3):
        if step:
            copy_run_state((params[0], opts[0]), (params[1], opts[1]))
        grads = [
            [
                torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
                for s in shapes
            ]
            for _ in range(2)
        ]
        perturbed = []
        for ps, opt in zip(params, opts, strict=True):
            give_grads(ps, grads[0])
            opt.first_step(zero_grad=True)
            perturbed.append([p.detach().clone() for p in ps])
            give_grads(ps, grads[1])
            opt.second_step(zero_grad=True)
        for i, (pr, pt) in enumerate(zip(*params, strict=True)):
            assert_within_ulp(perturbed[1][i], perturbed[0][i], dtype, f"step {step}, perturbed param {i}")
            assert_within_ulp(pt, pr, dtype, f"step {step}, param {i}")
            sr, st = opts[0].state[pr], opts[1].state[pt]
            assert set(sr) == set(st), f"step {step} param {i}: state keys {set(sr)} != {set(st)}"
            for key in sr:
                if key == "step":
                    assert float(sr[key]) == float(st[key]) == step + 1
                else:
                    what = f"step {step}, param {i}, state {key}"
                    assert_within_ulp(st[key], sr[key], dtype, what, cancelling=key in CANCELLING)
