"""Device-resident hyperparameters and the whole-step CUDA graph helper.

On the CPU: lr / rho held as one-element tensors (what the graph helper installs) give the
same trajectory as Python floats, schedulers update them in place, the helper's eager mode
equals the manual loop, and every refusal names its reason. On a GPU
(``SAM_FUSED_TEST_DEVICE=cuda``, run by ``benchmarks/gpu_check.sh``): replayed steps equal
eager steps, schedules reach the replays, and building the helper does not train.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import classification_batch, mlp, sam_step
from conftest import DEVICE

from sam_fused import GSAM, RSAM, SAM, IntervalSAM, LookSAM, VaSSO
from sam_fused.graph import GraphedSAMStep
from sam_fused.schedules import PolynomialRho

needs_cuda = pytest.mark.skipif(
    DEVICE != "cuda", reason="CUDA graphs need a GPU: benchmarks/gpu_check.sh runs these there"
)


def make_model(seed: int, device: str, bn: bool = False) -> torch.nn.Module:
    return mlp([7, 33, 3], seed=seed, device=device, norm=torch.nn.BatchNorm1d if bn else None)


def batch(step: int, device: str, n: int = 16):
    return classification_batch(500 + step, n, 7, 3, device)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.float(), y)


def manual_step(model, opt, x, y) -> torch.Tensor:
    return sam_step(model, opt, x, y, lambda m, xs, ys: loss_fn(m(xs), ys))


def state_of(model, opt) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]
    for p in model.parameters():
        out += [v.detach().clone() for v in opt.state[p].values() if torch.is_tensor(v)]
    return out


CASES = [
    (SAM, torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-3)),
    (SAM, torch.optim.AdamW, dict(weight_decay=0.05)),
    (VaSSO, torch.optim.SGD, dict(theta=0.5)),
    (GSAM, torch.optim.SGD, dict(alpha=0.3)),
]
CASE_IDS = ["sam-sgd", "sam-adamw", "vasso", "gsam"]


# ---------------------------------------------------------------------- device hyperparameters
@pytest.mark.parametrize("cls,base,kw", CASES, ids=CASE_IDS)
def test_tensor_lr_and_rho_follow_their_schedules(backend, device, cls, base, kw):
    """lr and rho as one-element device tensors, driven by StepLR and PolynomialRho, give
    the trajectory of the same run with Python floats; the tensors are updated in place."""
    runs = []
    for on_device in (False, True):
        model = make_model(0, device)
        lr = 0.05 if base is torch.optim.SGD else 3e-3
        opt = cls(model.parameters(), base, rho=0.2, lr=lr, backend=backend, **kw)
        if on_device:
            for group in opt.param_groups:
                group["lr"] = torch.tensor(group["lr"], device=device)
                group["rho"] = torch.tensor(group["rho"], device=device)
            lr_tensor, rho_tensor = opt.param_groups[0]["lr"], opt.param_groups[0]["rho"]
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)
        rho_sched = PolynomialRho(opt, power=0.5)
        for step in range(5):
            manual_step(model, opt, *batch(step, device))
            sched.step()
            rho_sched.step()
        if on_device:  # the very same tensors, now holding the scheduled values
            assert opt.param_groups[0]["lr"] is lr_tensor and opt.param_groups[0]["rho"] is rho_tensor
            assert lr_tensor.item() == pytest.approx(lr * 0.3**2, rel=1e-6)
            assert rho_tensor.item() == pytest.approx(0.2 / 6**0.5, rel=1e-6)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_tensor_lr_matches_torch_optim(backend, device):
    """The fused update with a tensor lr against torch.optim.SGD with the same tensor lr
    (rho = 0: SAM without a perturbation is plain SGD)."""
    model, ref = make_model(1, device), make_model(1, device)
    opt = SAM(model.parameters(), rho=0.0, lr=torch.tensor(0.1, device=device), momentum=0.9, backend=backend)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=torch.tensor(0.1, device=device), momentum=0.9)
    for step in range(3):
        x, y = batch(step, device)
        manual_step(model, opt, x, y)
        loss_fn(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_multi_value_tensor_lr_is_refused(backend, device):
    model = make_model(2, device)
    opt = SAM(model.parameters(), lr=0.1, backend=backend)
    opt.param_groups[0]["rho"] = torch.tensor([0.1, 0.2], device=device)
    x, y = batch(0, device)
    loss_fn(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises((ValueError, RuntimeError)):
        opt.first_step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


# ---------------------------------------------------------------------- the helper, eagerly
@pytest.mark.parametrize("cls,base,kw", CASES, ids=CASE_IDS)
def test_eager_helper_equals_the_manual_loop(backend, device, cls, base, kw):
    runs = []
    for use_helper in (False, True):
        model = make_model(3, device, bn=True)
        opt = cls(model.parameters(), base, rho=0.1, lr=0.02, backend=backend, **kw)
        x0, y0 = batch(0, device)
        step = GraphedSAMStep(model, loss_fn, opt, x0, y0, graphs=False)
        losses = []
        for i in range(3):
            x, y = batch(i, device)
            losses.append(step(x, y) if use_helper else manual_step(model, opt, x, y))
        runs.append((state_of(model, opt), losses))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_helper_can_freeze_bn_statistics_in_the_second_pass(backend, device):
    """With freeze_bn_stats=True the running statistics equal those of one plain forward
    per step (computed independently on a copy), not two."""
    model = make_model(11, device, bn=True)
    shadow = make_model(11, device, bn=True)
    opt = SAM(model.parameters(), lr=0.0, backend=backend)  # lr = 0: weights stay those of shadow
    step = GraphedSAMStep(model, loss_fn, opt, *batch(0, device), freeze_bn_stats=True, graphs=False)
    for i in range(3):
        x, y = batch(i, device)
        step(x, y)
        with torch.no_grad():
            shadow(x)
    bn, bn_shadow = model[1], shadow[1]
    assert int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(bn.running_mean, bn_shadow.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bn.running_var, bn_shadow.running_var, rtol=1e-6, atol=1e-7)


def test_eager_helper_with_bf16_autocast(backend, device):
    model = make_model(4, device)
    opt = SAM(model.parameters(), lr=0.1, backend=backend)
    step = GraphedSAMStep(model, loss_fn, opt, *batch(0, device), autocast_dtype=torch.bfloat16, graphs=False)
    losses = [step(*batch(0, device)).item() for _ in range(6)]
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p, b: RSAM(p, lr=0.1, backend=b), "RSAM"),
        (lambda p, b: LookSAM(p, lr=0.1, backend=b), "looksam"),
        (lambda p, b: IntervalSAM(p, lr=0.1, backend=b), "interval"),
        (lambda p, b: SAM(p, torch.optim.RMSprop, lr=0.1, backend=b), "RMSprop"),
        (lambda p, b: SAM(p, lr=0.1, backend="reference"), "reference"),
    ],
    ids=["rsam", "looksam", "interval", "rmsprop", "reference"],
)
def test_what_cannot_be_captured_is_refused(device, make, match):
    model = make_model(5, device)
    opt = make(model.parameters(), "triton")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        GraphedSAMStep(model, loss_fn, opt, *batch(0, device))
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert all(not torch.is_tensor(g["lr"]) for g in opt.param_groups)  # nothing was converted


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU refusal; on a GPU the capture tests below run")
def test_cpu_parameters_are_refused_with_the_eager_alternative():
    model = make_model(6, "cpu")
    opt = SAM(model.parameters(), lr=0.1, backend="triton")
    with pytest.raises(ValueError, match="graphs=False"):
        GraphedSAMStep(model, loss_fn, opt, *batch(0, "cpu"))


def test_bad_arguments_are_refused(device):
    model = make_model(7, device)
    with pytest.raises(TypeError, match=r"sam_fused\.SAM"):
        GraphedSAMStep(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), *batch(0, device))
    opt = SAM(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        GraphedSAMStep(model, loss_fn, opt, *batch(0, device), warmup_steps=0)


# ---------------------------------------------------------------------- capture (GPU)
@needs_cuda
@pytest.mark.parametrize("cls,base,kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_replayed_steps_equal_eager_steps(cls, base, kw, autocast):
    runs = []
    for graphs in (False, True):
        model = make_model(8, "cuda", bn=True)
        opt = cls(model.parameters(), base, rho=0.1, lr=0.02, backend="triton", **kw)
        before = state_of(model, opt)
        step = GraphedSAMStep(model, loss_fn, opt, *batch(0, "cuda"), autocast_dtype=autocast, graphs=graphs)
        if graphs:  # the warm-up did not train: weights, BN statistics, state as before
            for a, b in zip(state_of(model, opt), before):
                assert torch.equal(a, b)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        rho_sched = PolynomialRho(opt, power=0.5)
        losses = []
        for i in range(5):
            losses.append(step(*batch(i, "cuda")).clone())
            sched.step()
            rho_sched.step()
        runs.append((state_of(model, opt), torch.stack(losses)))
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(runs[1][0], runs[0][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_replayed_overflow_is_skipped():
    model = make_model(9, "cuda")
    opt = SAM(model.parameters(), lr=0.05, momentum=0.9, backend="triton")
    step = GraphedSAMStep(model, loss_fn, opt, *batch(0, "cuda"))
    step(*batch(0, "cuda"))
    before = state_of(model, opt)
    x, y = batch(1, "cuda")
    x[0, 0] = float("inf")
    step(x, y)
    for a, b in zip(state_of(model, opt), before):
        assert torch.equal(a, b)
    assert int(opt.skipped_steps) == 1


@needs_cuda
def test_batch_shape_must_match_the_capture():
    model = make_model(10, "cuda")
    opt = SAM(model.parameters(), lr=0.05, backend="triton")
    step = GraphedSAMStep(model, loss_fn, opt, *batch(0, "cuda"))
    with pytest.raises(ValueError, match="shaped like its example"):
        step(*batch(0, "cuda", n=8))
