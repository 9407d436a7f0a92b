"""MSAM (momentum-SAM) against a float64 re-implementation of the official rules.

The oracle below is written from the rules (MarlonBecker/MSAM, ``optimizer/msam.py`` and
``optimizer/adamW_msam.py``), not from the package: the gradient is taken at
``w~ = w - rho v / (||v|| + 1e-12)``; SGD: ``v <- mu v + g + wd w~``, ``w <- w - lr v``;
AdamW: Adam's moments on ``g``, ``w <- (w - lr m^ / (sqrt(s^) + eps)) (1 - lr wd)``, the
perturbation along the raw ``m``. One global norm over every parameter's first moment;
a parameter without a gradient keeps its moment and ``w``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import COMPILED, HAS_TRITON

from sam_fused import MSAM

BACKENDS = [
    "reference",
    "foreach",
    *(["triton"] if HAS_TRITON else []),
    *[name for name in ("cpp", "cuda") if name in COMPILED],
]
SIZES = [(1,), (7,), (4097,), (3, 5), (0,)]
SGD = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4})
SGD_NO_WD = (torch.optim.SGD, {"lr": 0.05, "momentum": 0.8})
ADAMW = (torch.optim.AdamW, {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1})
BASES = {"sgd": SGD, "sgd-no-wd": SGD_NO_WD, "adamw": ADAMW}


def gradient(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The gradient of ``sum(a p^2 / 2 + b p + 0.1 sin(3 p))``: curved, coupled to ``p``."""
    return a * p + b + 0.3 * torch.cos(3 * p)


class Oracle:
    """The official rules in float64, one parameter list, groups given as index lists."""

    def __init__(self, weights, groups, base, hyper, rhos):
        self.w = [w.double().clone() for w in weights]
        self.v = [torch.zeros_like(w) for w in self.w]
        self.s = [torch.zeros_like(w) for w in self.w]
        self.t = [0] * len(self.w)
        self.group_of = {i: g for g, members in enumerate(groups) for i in members}
        self.base, self.h, self.rhos = base, hyper, rhos
        self.c = [0.0] * len(groups)

    def perturbed(self):
        return [w - self.c[self.group_of[i]] * v for i, (w, v) in enumerate(zip(self.w, self.v))]

    def step(self, grads):
        at = self.perturbed()
        h = self.h
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.base is torch.optim.SGD:
                self.v[i] = h["momentum"] * self.v[i] + g + h.get("weight_decay", 0.0) * at[i]
                self.w[i] = self.w[i] - h["lr"] * self.v[i]
            else:
                b1, b2 = h["betas"]
                self.t[i] += 1
                self.v[i] = b1 * self.v[i] + (1 - b1) * g
                self.s[i] = b2 * self.s[i] + (1 - b2) * g * g
                m_hat = self.v[i] / (1 - b1 ** self.t[i])
                s_hat = self.s[i] / (1 - b2 ** self.t[i])
                self.w[i] = (self.w[i] - h["lr"] * m_hat / (s_hat.sqrt() + h["eps"])) * (
                    1 - h["lr"] * h["weight_decay"]
                )
        norm = math.sqrt(sum(float((v * v).sum()) for v in self.v))
        self.c = [rho / (norm + 1e-12) for rho in self.rhos]


def build(device, dtype, backend, base_name, seed=0, rhos=(0.7, 2.0)):
    """Two groups (rho 0.7 and 2.0) and an empty one, parameters of awkward sizes."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in SIZES]
    coeffs = [(torch.rand(s, generator=gen) + 0.5, torch.randn(s, generator=gen)) for s in SIZES]
    base, hyper = BASES[base_name]
    groups = [{"params": params[:3], "rho": rhos[0]}, {"params": params[3:], "rho": rhos[1]}, {"params": []}]
    opt = MSAM(groups, base, rho=1.0, backend=backend, **hyper)
    return params, coeffs, opt


def trained(device, backend, base_name, steps):
    """``build``'s optimizer after ``steps`` steps."""
    params, coeffs, opt = build(device, torch.float32, backend, base_name)
    for step in range(steps):
        set_grads(params, coeffs, step, device)
        opt.step()
    return params, coeffs, opt


def assert_same_run(params, opt, other_params, other_opt):
    """Both runs hold the same weights and optimizer state, bit for bit."""
    for p, q in zip(params, other_params, strict=True):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(other_opt.state[q][key], value), key


def set_grads(params, coeffs, step, device):
    """Gradients at the parameters' current values; parameter 1 has none at step 2, and
    parameter 0 none before step 2 (its first update comes while the others have state)."""
    grads = []
    for i, (p, (a, b)) in enumerate(zip(params, coeffs)):
        if (i == 1 and step == 2) or (i == 0 and step < 2):
            p.grad = None
            grads.append(None)
            continue
        g = gradient(p.detach().double().cpu(), a.double(), b.double())
        p.grad = g.to(device, p.dtype)
        grads.append(g)
    return grads


@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_float64_rules_step_by_step(device, backend, base_name):
    params, coeffs, opt = build(device, torch.float32, backend, base_name)
    base, hyper = BASES[base_name]
    oracle = Oracle([p.detach().cpu() for p in params], [[0, 1, 2], [3, 4]], base, hyper, [0.7, 2.0])
    for step in range(5):
        # the oracle takes its gradients at its own w~, the optimizer at the parameters
        expected_at = oracle.perturbed()
        for p, want in zip(params, expected_at):
            torch.testing.assert_close(p.detach().cpu().double(), want, rtol=1e-5, atol=1e-5)
        set_grads(params, coeffs, step, device)
        grads = [
            None if p.grad is None else gradient(w, a.double(), b.double())
            for p, w, (a, b) in zip(params, expected_at, coeffs)
        ]
        opt.step()
        oracle.step(grads)
        with opt.unperturbed():
            for p, want in zip(params, oracle.w):
                torch.testing.assert_close(p.detach().cpu().double(), want, rtol=1e-5, atol=1e-5)
        for p, v in zip(params, oracle.v):
            key = "momentum_buffer" if base is torch.optim.SGD else "exp_avg"
            torch.testing.assert_close(opt.state[p][key].cpu().double(), v, rtol=1e-5, atol=1e-6)
    assert oracle.c[0] > 0  # the run did perturb


@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backends_match_the_reference(device, backend, dtype, base_name):
    """Parity table: every backend that runs the dtype against the reference, each step
    started from the reference's state (rounding must not accumulate into the comparison)."""
    if backend in ("triton", "cuda") and dtype == torch.float64:
        with pytest.raises(ValueError, match=rf"{backend} backend.*float64"):
            build(device, dtype, backend, base_name)
        return
    ref_params, coeffs, ref_opt = build(device, dtype, "reference", base_name)
    params, _, opt = build(device, dtype, backend, base_name)
    tol = {torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for step in range(4):
        with torch.no_grad():
            for p, q in zip(ref_params, params):
                q.copy_(p)
                for key, value in ref_opt.state[p].items():
                    opt.state[q][key].copy_(value)
            opt._scales.copy_(ref_opt._scales)
        set_grads(ref_params, coeffs, step, device)
        for p, q in zip(ref_params, params):
            q.grad = None if p.grad is None else p.grad.clone()
        ref_opt.step()
        opt.step()
        for p, q in zip(ref_params, params):
            torch.testing.assert_close(q.float(), p.float(), rtol=tol, atol=tol)
            for key, value in ref_opt.state[p].items():
                torch.testing.assert_close(opt.state[q][key].float(), value.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_unperturbed_round_trip_is_bitwise(device, backend, dtype):
    params, coeffs, opt = build(device, dtype, backend, "sgd")
    for step in range(3):
        set_grads(params, coeffs, step, device)
        opt.step()
    perturbed = [p.detach().clone() for p in params]
    with opt.unperturbed():
        inside = [p.detach().clone() for p in params]
        for p in params:
            assert torch.equal(p, opt.state[p]["unperturbed_weight"])
    assert any(not torch.equal(a, b) for a, b in zip(inside, perturbed))  # it did move them
    for p, before in zip(params, perturbed):
        assert torch.equal(p, before)


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaNs included, which torch.equal calls unequal)."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    same_kind = a.dtype == b.dtype and a.shape == b.shape
    return same_kind and torch.equal(a.reshape(-1).view(as_int), b.reshape(-1).view(as_int))


def snapshot(params, opt):
    return (
        [p.detach().clone() for p in params],
        [None if p.grad is None else p.grad.clone() for p in params],
        {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params},
        opt._scales.clone(),
    )


def assert_unchanged(params, opt, snap):
    weights, grads, state, scales = snap
    for p, w, g in zip(params, weights, grads):
        assert bitwise(p.detach(), w)
        assert (p.grad is None and g is None) or bitwise(p.grad, g)
        for key, value in opt.state[p].items():
            assert bitwise(value, state[id(p)][key]), key
    assert bitwise(opt._scales, scales)


@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nonfinite_gradient_skips_the_step(device, backend, base_name):
    params, coeffs, opt = trained(device, backend, base_name, 2)
    set_grads(params, coeffs, 3, device)
    params[2].grad[4000] = float("nan")
    params[0].grad[0] = float("inf")
    snap = snapshot(params, opt)
    opt.step()
    assert_unchanged(params, opt, snap)
    set_grads(params, coeffs, 3, device)  # a finite step afterwards moves everything
    opt.step()
    assert not torch.equal(params[2], snap[0][2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_forward_and_backward_per_step(device, backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(device)
    passes = {"forward": 0, "backward": 0}
    model.register_forward_hook(lambda *_: passes.__setitem__("forward", passes["forward"] + 1))
    model[0].weight.register_hook(lambda g: passes.__setitem__("backward", passes["backward"] + 1))
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 7, device=device), torch.randn(32, 1, device=device)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert passes == {"forward": 6, "backward": 6}
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("save_unperturbed", [False, True])
@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_into_a_freshly_built_model_is_bitwise(device, backend, base_name, save_unperturbed):
    def make(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device)

    base, hyper = BASES[base_name]
    data = [(torch.randn(8, 7, device=device), torch.randn(8, 3, device=device)) for _ in range(6)]

    def train(model, opt, batches):
        for x, y in batches:
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    model = make(0)
    opt = MSAM(model.parameters(), base, rho=1.5, backend=backend, **hyper)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    if save_unperturbed:  # the README's advice: save w; loading puts w~ back
        with opt.unperturbed():
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    else:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[3:])

    fresh = make(1)
    fresh_opt = MSAM(fresh.parameters(), base, rho=1.5, backend=backend, **hyper)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt.load_state_dict(checkpoint["opt"])
    train(fresh, fresh_opt, data[3:])
    assert_same_run(list(model.parameters()), opt, list(fresh.parameters()), fresh_opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusals_change_nothing(device, backend):
    params, coeffs, opt = trained(device, backend, "sgd", 2)
    set_grads(params, coeffs, 2, device)
    snap = snapshot(params, opt)
    for key, value, message in [
        ("nesterov", True, "nesterov or dampening"),
        ("dampening", 0.1, "nesterov or dampening"),
        ("maximize", True, "maximize"),
        ("lr", float("nan"), "finite"),
        ("momentum", 1.0, "momentum must be < 1"),
    ]:
        old = opt.param_groups[1][key]
        opt.param_groups[1][key] = value
        with pytest.raises(ValueError, match=message):
            opt.step()
        opt.param_groups[1][key] = old
        assert_unchanged(params, opt, snap)
    params[3].grad = torch.zeros(3, 5, device=device).to_sparse()
    with pytest.raises(ValueError, match="parameter 0 of param group 1 has a sparse gradient"):
        opt.step()
    params[3].grad = snap[1][3].clone()
    with opt.unperturbed(), pytest.raises(RuntimeError, match=r"inside opt\.unperturbed"):
        opt.step()
    state = opt.state_dict()
    bad = {**state, "state": {**state["state"], 2: {"momentum_buffer": state["state"][2]["momentum_buffer"]}}}
    with pytest.raises(ValueError, match="lacks"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="not an MSAM checkpoint"):
        opt.load_state_dict(torch.optim.SGD(params, lr=0.1, momentum=0.9).state_dict())
    assert_unchanged(params, opt, snap)


def test_construction_refusals(device):
    p = torch.nn.Parameter(torch.randn(3, device=device))
    with pytest.raises(TypeError, match="not Adam"):
        MSAM([p], torch.optim.Adam, lr=0.1)
    with pytest.raises(ValueError, match="nesterov"):
        MSAM([p], torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="nesterov or dampening"):
        MSAM([p], torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.5)
    with pytest.raises(ValueError, match="amsgrad"):
        MSAM([p], torch.optim.AdamW, lr=0.1, amsgrad=True)
    if device != "cuda":  # (the emulated CUDA library is installed only for tests named "cuda")
        with pytest.raises(ValueError, match="MSAM cannot run these parameters on the cuda backend"):
            MSAM([p], torch.optim.SGD, lr=0.1, momentum=0.9, backend="cuda")
    auto = MSAM([p], torch.optim.SGD, lr=0.1, momentum=0.9).backends
    if device == "cuda":
        assert auto == ["triton"]
    else:
        assert auto == ["cpp" if "cpp" in COMPILED else "foreach"]
        with pytest.raises(
            ValueError, match="MSAM cannot run these parameters on the cpp backend: its multi"
        ):
            MSAM([torch.nn.Parameter(torch.randn(4, 6)[:, ::2])], torch.optim.SGD, lr=0.1, backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_and_lr_scheduler(device, backend):
    """Under a GradScaler (a power-of-two scale, so unscaling is exact) MSAM gives the unscaled
    run's bits, and a step whose gradients overflowed is skipped with nothing moved; an LR
    scheduler's value is the one the next step uses."""

    def run(steps: int, scaled: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(device)
        opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.5, backend=backend, lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=1000, enabled=scaled)
        gen = torch.Generator().manual_seed(1)
        for step in range(steps):
            x, y = torch.randn(8, 7, generator=gen).to(device), torch.randn(8, 1, generator=gen).to(device)
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            overflow = scaled and step == steps - 1
            if overflow:
                model[0].bias.grad[0] = float("inf")
                before = snapshot(list(model.parameters()), opt)
            scaler.step(opt)
            scaler.update()
            if overflow:
                for p in model.parameters():
                    p.grad = None  # the snapshot's gradients were the overflowed ones
                assert_unchanged(list(model.parameters()), opt, (before[0], [None] * 4, *before[2:]))
                assert scaler.get_scale() == 2.0**9
            else:
                sched.step()
            opt.zero_grad()
        return model, opt

    plain, plain_opt = run(4, scaled=False)
    scaled, scaled_opt = run(5, scaled=True)  # its fifth step overflows
    assert plain_opt.param_groups[0]["lr"] == scaled_opt.param_groups[0]["lr"] == 0.025
    assert_same_run(list(plain.parameters()), plain_opt, list(scaled.parameters()), scaled_opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deep_copy_steps_as_the_original(device, backend):
    import copy

    params, coeffs, opt = trained(device, backend, "adamw", 2)
    twin = copy.deepcopy(opt)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    assert all(a is not b for a, b in zip(params, twin_params))
    assert twin.backends == opt.backends
    for step in range(2, 4):
        for ps in (params, twin_params):
            set_grads(ps, coeffs, step, device)
        opt.step()
        twin.step()
    assert_same_run(params, opt, twin_params, twin)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_one_norm_over_buckets_of_several_dtypes(device, backend):
    """float32 and bfloat16 parameters in one group are two buckets sharing one global norm."""

    def make(name):
        gen = torch.Generator().manual_seed(5)
        params = [
            torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype))
            for s, dtype in [((33,), torch.float32), ((17,), torch.bfloat16), ((5, 3), torch.float32)]
        ]
        return params, MSAM(params, torch.optim.SGD, rho=1.0, backend=name, lr=0.1, momentum=0.9)

    ref_params, ref_opt = make("reference")
    params, opt = make(backend)
    assert len(opt.backends) == 2
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        for p, q in zip(ref_params, params):
            g = torch.randn(p.shape, generator=gen).to(device, p.dtype)
            p.grad, q.grad = g, g.clone()
        ref_opt.step()
        opt.step()
        torch.testing.assert_close(opt._scales, ref_opt._scales, rtol=1e-5, atol=0)
        for p, q in zip(ref_params, params):
            tol = 1e-5 if p.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(q.float(), p.float(), rtol=tol, atol=tol)
