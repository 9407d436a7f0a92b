"""``sam_fused.Lion`` on its own, as a ``torch.optim.Optimizer``, against the authors' update
written here in float64 (Chen et al. 2023; their ``lion_pytorch.py``):

    w <- w (1 - lr wd);  c = beta1 m + (1 - beta1) g;  w <- w - lr sign(c);  m <- beta2 m + (1 - beta2) g

As SAM's base it runs on every backend in ``test_variants.py``'s table and, operation by
operation, in ``test_backend_ops.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE

from sam_fused import Lion

SIZES = [(1,), (7,), (4097,), (3, 5)]
GROUPS = [
    dict(lr=3e-3, weight_decay=0.0),
    dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=0.5),
]


def textbook(ws, ms, gs, hp, maximize=False):
    beta1, beta2 = hp.get("betas", (0.9, 0.99))
    out_w, out_m = [], []
    for w, m, g in zip(ws, ms, gs):
        g = -g if maximize else g
        w = w * (1 - hp["lr"] * hp["weight_decay"])
        w = w - hp["lr"] * torch.sign(beta1 * m + (1 - beta1) * g)
        out_w.append(w)
        out_m.append(beta2 * m + (1 - beta2) * g)
    return out_w, out_m


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lion_is_the_authors_update(dtype, maximize):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SIZES]
    params = [torch.nn.Parameter(w.to(DEVICE, dtype)) for w in init]
    groups = [{"params": params[:2], **GROUPS[0]}, {"params": params[2:], **GROUPS[1]}, {"params": []}]
    opt = Lion(groups, maximize=maximize)
    ws = [w.clone() for w in init]
    ms = [torch.zeros_like(w) for w in init]
    for _ in range(5):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SIZES]
        for p, g in zip(params, gs):
            p.grad = g.to(DEVICE, dtype)
        opt.step()
        ws[:2], ms[:2] = textbook(ws[:2], ms[:2], gs[:2], GROUPS[0], maximize)
        ws[2:], ms[2:] = textbook(ws[2:], ms[2:], gs[2:], GROUPS[1], maximize)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for p, w, m in zip(params, ws, ms):
        torch.testing.assert_close(p.detach().cpu().double(), w, **tol)
        torch.testing.assert_close(opt.state[p]["exp_avg"].cpu().double(), m, **tol)


def test_parameters_without_a_gradient_are_left_alone():
    params = [torch.nn.Parameter(torch.randn(7, device=DEVICE)) for _ in range(2)]
    opt = Lion(params, lr=0.1, weight_decay=0.5)
    params[0].grad = torch.randn(7, device=DEVICE)
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), before) and params[1] not in opt.state


def test_state_dict_resumes_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in SIZES]
    opt = Lion(params, lr=1e-2, weight_decay=0.1)
    grads = [[torch.randn(s, generator=gen).to(DEVICE) for s in SIZES] for _ in range(4)]

    def step(o, ps, gs):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        o.step()

    for gs in grads[:2]:
        step(opt, params, gs)
    saved, twin = copy.deepcopy(opt.state_dict()), [torch.nn.Parameter(p.detach().clone()) for p in params]
    for gs in grads[2:]:
        step(opt, params, gs)
    resumed = Lion(twin, lr=1.0)  # built differently: the checkpoint's groups win
    resumed.load_state_dict(saved)
    for gs in grads[2:]:
        step(resumed, twin, gs)
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=-1.0), "Invalid learning rate"),
        (dict(betas=(0.9, 1.5)), "Invalid beta parameter at index 1"),
        (dict(weight_decay=-0.1), "Invalid weight_decay"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Lion([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_an_lr_scheduler_drives_it():
    p = torch.nn.Parameter(torch.zeros(4, device=DEVICE))
    opt = Lion([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for lr in (0.1, 0.05):
        p.grad = torch.ones(4, device=DEVICE)
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(lr / 2)
    # sign(c) = 1 each step: w = -(0.1 + 0.05)
    torch.testing.assert_close(p.detach().cpu(), torch.full((4,), -0.15))
