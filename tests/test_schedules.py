"""Step-size and radius schedules: the seed paper's step sizes and the rho schedules.

Every expected value is the closed form, computed here from the formulas of
docs/variants.md (from the seed paper), never a stored number:

* SeedPaperLR, epoch e = step // steps_per_epoch: constant t0; diminish1 t0 / (e + 1);
  diminish2 t0 / (e + 1)^0.5001; diminish3 t0 / (k ln k) with k = 3 + floor(e / 5);
* PolynomialRho: rho_k = rho0 / (k + 1)^p, per group;
* LrProportionalRho: rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min).
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from sam_fused import SAM, IntervalSAM
from sam_fused.schedules import (
    SEED_PAPER_SCHEDULES,
    ConstantRho,
    LrProportionalRho,
    PolynomialRho,
    SeedPaperLR,
    seed_paper_factor,
)

BASE_LRS = (0.1, 0.03)  # two groups with different initial step sizes
BASE_RHOS = (0.05, 0.2)
EPOCHS = 30


def closed_form(schedule: str, t0: float, epoch: int) -> float:
    if schedule == "constant":
        return t0
    if schedule == "diminish1":
        return t0 / (epoch + 1)
    if schedule == "diminish2":
        return t0 / (epoch + 1) ** 0.5001
    if schedule == "diminish3":
        k = 3 + math.floor(epoch / 5)
        return t0 / (k * math.log(k))
    raise AssertionError(schedule)


def make_params(seed: int = 0, device: str = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    first = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in ((7,), (3, 5))]
    second = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in ((1,), (4, 2, 3))]
    return first, second


def make_optimizer(kind: str, backend: str = "reference", device: str = "cpu", **kwargs):
    first, second = make_params(device=device)
    groups = [
        {"params": first, "lr": BASE_LRS[0], "rho": BASE_RHOS[0]},
        {"params": second, "lr": BASE_LRS[1], "rho": BASE_RHOS[1]},
    ]
    if kind == "sgd":
        for g in groups:
            del g["rho"]
        return torch.optim.SGD(groups, lr=BASE_LRS[0], **kwargs), first + second
    if kind == "interval":
        return IntervalSAM(groups, torch.optim.SGD, k=2, backend=backend, **kwargs), first + second
    return SAM(groups, torch.optim.SGD, backend=backend, **kwargs), first + second


def set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen).to(p.device) + torch.sin(p.detach())
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def train_step(opt, params, step: int) -> None:
    """One optimizer step: the manual SAM loop, or torch.optim's step()."""
    set_grads(params, step)
    if isinstance(opt, SAM):
        if opt.first_step(zero_grad=True):
            set_grads(params, step)
            opt.second_step(zero_grad=True)
    else:
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------------- SeedPaperLR
@pytest.mark.parametrize("steps_per_epoch", [1, 4])
@pytest.mark.parametrize("kind", ["sam", "interval", "sgd"])
@pytest.mark.parametrize("schedule", SEED_PAPER_SCHEDULES)
def test_seed_paper_lr_follows_the_closed_form(schedule, kind, steps_per_epoch):
    """lr at iteration i is t0 * factor(i // steps_per_epoch), per group, with no warnings
    (the manual first_step / second_step loop counts as the optimizer's step)."""
    opt, params = make_optimizer(kind, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = SeedPaperLR(opt, schedule, steps_per_epoch=steps_per_epoch)
        for step in range(EPOCHS * steps_per_epoch):
            epoch = step // steps_per_epoch
            for group, t0 in zip(opt.param_groups, BASE_LRS, strict=True):
                want = closed_form(schedule, t0, epoch)
                assert group["lr"] == pytest.approx(want, rel=1e-12), f"step {step} (epoch {epoch})"
            assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
            train_step(opt, params, step)
            sched.step()
    if isinstance(opt, SAM):  # the base optimizer shares the groups, so it sees the same lr
        assert opt.base_optimizer.param_groups is opt.param_groups


@pytest.mark.parametrize("schedule", SEED_PAPER_SCHEDULES)
def test_seed_paper_factor_is_the_closed_form(schedule):
    for epoch in range(200):
        assert seed_paper_factor(schedule, epoch) == pytest.approx(
            closed_form(schedule, 1.0, epoch), rel=1e-14
        )


def test_seed_paper_diminish3_changes_every_five_epochs():
    values = [seed_paper_factor("diminish3", e) for e in range(20)]
    for start in range(0, 20, 5):
        assert len(set(values[start : start + 5])) == 1
    assert all(a > b for a, b in zip(values[::5], values[5::5]))


def test_seed_paper_lr_drives_the_update(backend, device):
    """SAM with rho = 0 and plain SGD is w <- w - lr g: the update uses the scheduled lr
    (a kernel argument on the Triton backend: a new value each step must take effect)."""
    first, second = make_params(seed=3, device=device)
    opt = SAM(
        [{"params": first}, {"params": second, "lr": BASE_LRS[1]}],
        torch.optim.SGD,
        rho=0.0,
        lr=BASE_LRS[0],
        backend=backend,
    )
    params = first + second
    sched = SeedPaperLR(opt, "diminish1", steps_per_epoch=2)
    for step in range(6):
        before = [p.detach().double().clone() for p in params]
        set_grads(params, step)
        grads = [p.grad.double().clone() for p in params]
        opt.first_step(zero_grad=True)
        set_grads(params, step)
        opt.second_step(zero_grad=True)
        for i, (p, w, g) in enumerate(zip(params, before, grads)):
            lr = closed_form("diminish1", BASE_LRS[0 if i < len(first) else 1], step // 2)
            torch.testing.assert_close(p.detach().double().cpu(), (w - lr * g).cpu(), rtol=1e-6, atol=1e-7)
        sched.step()


@pytest.mark.parametrize("kind", ["sam", "sgd"])
def test_seed_paper_lr_state_dict_round_trip(kind):
    opt, params = make_optimizer(kind)
    sched = SeedPaperLR(opt, "diminish3", steps_per_epoch=3)
    for step in range(11):
        train_step(opt, params, step)
        sched.step()
    saved_sched, saved_opt = sched.state_dict(), opt.state_dict()
    uninterrupted = []
    for step in range(11, 40):
        train_step(opt, params, step)
        sched.step()
        uninterrupted.append(sched.get_last_lr())

    opt2, params2 = make_optimizer(kind)
    sched2 = SeedPaperLR(opt2, "constant")  # everything must come from the state dict
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sched2.schedule == "diminish3" and sched2.steps_per_epoch == 3
    resumed = []
    for step in range(11, 40):
        train_step(opt2, params2, step)
        sched2.step()
        resumed.append(sched2.get_last_lr())
    assert resumed == uninterrupted
    assert [g["lr"] for g in opt2.param_groups] == uninterrupted[-1]


def test_seed_paper_lr_invalid_arguments():
    opt, _ = make_optimizer("sgd")
    with pytest.raises(ValueError, match="schedule"):
        SeedPaperLR(opt, "diminish4")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        SeedPaperLR(opt, "diminish1", steps_per_epoch=0)
    with pytest.raises(ValueError, match="epoch"):
        seed_paper_factor("diminish1", -1)


# ---------------------------------------------------------------------------- radius schedules
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 2.0])
def test_polynomial_rho_per_group(power):
    opt, params = make_optimizer("sam")
    sched = PolynomialRho(opt, power=power)
    for k in range(25):
        for group, rho0 in zip(opt.param_groups, BASE_RHOS, strict=True):
            assert group["rho"] == pytest.approx(rho0 / (k + 1) ** power, rel=1e-12), f"k = {k}"
        assert sched.get_last_rho() == [g["rho"] for g in opt.param_groups]
        train_step(opt, params, k)
        sched.step()


def test_constant_rho_and_excluded_groups():
    opt, params = make_optimizer("sam")
    ConstantRho(opt)
    assert [g["rho"] for g in opt.param_groups] == list(BASE_RHOS)
    sched = PolynomialRho(opt, power=1.0, exclude=(1,))
    for k in range(5):
        train_step(opt, params, k)
        sched.step()
        assert opt.param_groups[0]["rho"] == pytest.approx(BASE_RHOS[0] / (k + 2), rel=1e-12)
        assert opt.param_groups[1]["rho"] == BASE_RHOS[1]


def test_scheduled_rho_drives_the_perturbation(backend, device):
    """SAM's eps has norm rho for a single group: a new rho each step must take effect (on
    the Triton backend rho is a kernel argument, not a compile-time constant)."""
    first, second = make_params(seed=4, device=device)
    params = first + second
    opt = SAM(params, torch.optim.SGD, rho=0.4, lr=0.01, backend=backend)
    sched = PolynomialRho(opt, power=1.0)
    for k in range(4):
        set_grads(params, k)
        before = [p.detach().double().clone() for p in params]
        opt.first_step(zero_grad=True)
        eps = torch.sqrt(sum(((p.detach().double() - w) ** 2).sum() for p, w in zip(params, before)))
        assert float(eps) == pytest.approx(0.4 / (k + 1), rel=1e-5), f"k = {k}"
        set_grads(params, k)
        opt.second_step(zero_grad=True)
        sched.step()


@pytest.mark.parametrize("explicit_max", [False, True])
def test_lr_proportional_rho_tracks_cosine_annealing(explicit_max):
    opt, params = make_optimizer("sam")
    rho_min, lr_min, t_max = 0.01, 0.001, 12
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=lr_min)
    if explicit_max:
        rho_max, lr_max = 0.3, 0.2
        rho_sched = LrProportionalRho(opt, rho_min=rho_min, lr_min=lr_min, rho_max=rho_max, lr_max=lr_max)
        tops = [(rho_max, lr_max), (rho_max, lr_max)]
    else:  # defaults: each group's initial rho and lr
        rho_sched = LrProportionalRho(opt, rho_min=rho_min, lr_min=lr_min)
        tops = list(zip(BASE_RHOS, BASE_LRS, strict=True))
    seen_rhos = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(t_max + 1):
            for group, t0, (top_rho, top_lr) in zip(opt.param_groups, BASE_LRS, tops, strict=True):
                lr_t = lr_min + (t0 - lr_min) * (1 + math.cos(math.pi * t / t_max)) / 2
                assert group["lr"] == pytest.approx(lr_t, rel=1e-9, abs=1e-15)
                want = rho_min + (top_rho - rho_min) * (lr_t - lr_min) / (top_lr - lr_min)
                assert group["rho"] == pytest.approx(want, rel=1e-9, abs=1e-15), f"t = {t}"
            seen_rhos.append(opt.param_groups[0]["rho"])
            train_step(opt, params, t)
            lr_sched.step()  # the LR first, then the radius that follows it
            rho_sched.step()
    if not explicit_max:  # the end points: rho_max at lr_max, rho_min at lr_min
        assert seen_rhos[0] == pytest.approx(BASE_RHOS[0], rel=1e-12)
        assert seen_rhos[-1] == pytest.approx(rho_min, rel=1e-9)
    assert all(a >= b for a, b in itertools.pairwise(seen_rhos))


@pytest.mark.parametrize("which", ["polynomial", "lr_proportional"])
def test_rho_schedule_state_dict_round_trip(which):
    def build():
        opt, params = make_optimizer("sam")
        lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        if which == "polynomial":
            rho_sched = PolynomialRho(opt, power=0.7)
        else:
            rho_sched = LrProportionalRho(opt, rho_min=0.005)
        return opt, params, lr_sched, rho_sched

    opt, params, lr_sched, rho_sched = build()
    for step in range(6):
        train_step(opt, params, step)
        lr_sched.step()
        rho_sched.step()
    saved = (opt.state_dict(), lr_sched.state_dict(), rho_sched.state_dict())
    assert "optimizer" not in saved[2]
    uninterrupted = []
    for step in range(6, 15):
        train_step(opt, params, step)
        lr_sched.step()
        rho_sched.step()
        uninterrupted.append(rho_sched.get_last_rho())

    opt2, params2, lr_sched2, rho_sched2 = build()
    opt2.load_state_dict(saved[0])
    lr_sched2.load_state_dict(saved[1])
    rho_sched2.load_state_dict(saved[2])
    want = [g["rho"] for g in saved[0]["param_groups"]]
    assert rho_sched2.get_last_rho() == pytest.approx(want, rel=1e-12)
    resumed = []
    for step in range(6, 15):
        train_step(opt2, params2, step)
        lr_sched2.step()
        rho_sched2.step()
        resumed.append(rho_sched2.get_last_rho())
    assert resumed == uninterrupted


def test_rho_schedule_state_dict_restores_the_current_rho():
    opt, params = make_optimizer("sam")
    sched = PolynomialRho(opt, power=1.0)
    for step in range(4):
        train_step(opt, params, step)
        sched.step()
    saved = sched.state_dict()
    opt2, _ = make_optimizer("sam")
    sched2 = PolynomialRho(opt2, power=1.0)
    sched2.load_state_dict(saved)
    assert sched2.get_last_rho() == pytest.approx([r / 5 for r in BASE_RHOS], rel=1e-12)


def test_rho_schedules_invalid_arguments():
    opt, _ = make_optimizer("sam")
    with pytest.raises(ValueError, match="power"):
        PolynomialRho(opt, power=-0.5)
    with pytest.raises(ValueError, match="lr_max"):
        LrProportionalRho(opt, lr_min=0.5)  # above both groups' initial lr
    with pytest.raises(ValueError, match="lr_max"):
        LrProportionalRho(opt, lr_min=0.01, lr_max=0.01)
    sgd, _ = make_optimizer("sgd")
    with pytest.raises(ValueError, match="rho"):
        PolynomialRho(sgd)
    with pytest.raises(ValueError, match="rho"):
        LrProportionalRho(sgd)
    # a radius that would go negative (lr below lr_min) is refused, not applied
    sched = LrProportionalRho(opt, rho_min=0.0, lr_min=0.02)
    for group in opt.param_groups:
        group["lr"] = 0.0
    with pytest.raises(ValueError, match="rho"):
        sched.step()
