"""SAM-ON: the param-group key ``perturb`` and ``norm_param_groups``.

Rules checked here (``docs/variants.md``, SAM-ON):

* a group with ``perturb=False`` is not perturbed, not part of the ascent norm, keeps no
  backup, and takes the base update with the second-pass gradient, on every backend;
* the step equals a float64 re-implementation of the official code's rule
  (mueller-mp/SAM-ON, ``sam_on.py``: ``ASAM_ON.ascent_step`` with ``elementwise``,
  ``normalize_bias``, ``only_norm``), written below, over several steps, with SGD and AdamW;
* every fused backend agrees with the reference under each variant that takes the key;
* GSAM's descent still uses every parameter's first gradient (float64 re-implementation);
* a non-bool ``perturb`` is refused naming the group, with parameters, gradients and state
  bitwise as they were;
* ``norm_param_groups`` picks normalization layers by type; checkpoints round-trip.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ALL_BACKENDS, FUSED_BACKENDS, backends_for
from torch import nn

from sam_fused import SAM, norm_param_groups
from sam_fused.storage import ALIGN

# awkward sizes: one element, 7, one more than a power of two, a 3-d tensor, an empty group
NORM_SHAPES = [(7,), (7,), (1,), (4097,)]
OTHER_SHAPES = [(7, 3), (1,), (4097,), (5, 2, 3)]
BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
}


class Problem:
    """A coupled synthetic loss: every parameter's gradient depends on every weight, so the
    perturbation of the norm group changes the other group's second-pass gradient."""

    def __init__(self, seed: int) -> None:
        self.shapes = NORM_SHAPES + OTHER_SHAPES
        gen = torch.Generator().manual_seed(seed)
        total = sum(math.prod(s) for s in self.shapes)
        self.b = [torch.randn(s, generator=gen, dtype=torch.float64) / math.sqrt(total) for s in self.shapes]
        self.s = [torch.rand(s, generator=gen, dtype=torch.float64) + 0.5 for s in self.shapes]

    def grads(self, ws: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        ws = [w.detach().double().cpu() for w in ws]
        coupling = sum((b * w).sum() for b, w in zip(self.b, ws))
        phase = 0.3 * step
        return [s * (1.5 + torch.sin(3 * w + phase)) + coupling * b for s, b, w in zip(self.s, self.b, ws)]

    def feed(self, params: list[torch.Tensor], step: int, at: list[torch.Tensor] | None = None) -> None:
        for p, g in zip(params, self.grads(params if at is None else at, step)):
            p.grad = g.to(p.dtype).to(p.device)


def init(seed: int, dtype=torch.float32, device="cpu") -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    make = lambda s: nn.Parameter((torch.randn(s, generator=gen, dtype=torch.float64) * 0.5 + 0.2).to(dtype))
    norm = [make(s).to(device) for s in NORM_SHAPES]
    other = [make(s).to(device) for s in OTHER_SHAPES]
    return [nn.Parameter(p.detach()) for p in norm], [nn.Parameter(p.detach()) for p in other]


def build(backend, base, norm, other, variant="sam", empty_group=False, **kw):
    cls, opts = BASES[base]
    groups = [{"params": norm}, {"params": other, "perturb": False}]
    if empty_group:
        groups.append({"params": [], "perturb": False})
    return SAM(groups, cls, backend=backend, variant=variant, **{**opts, **kw})


# ---------------------------------------------------------------------------- the official rule
def official_steps(problem, norm, other, base, steps, rho, eta, adaptive, perturb_all=False, gsam=None):
    """The official ``ASAM_ON``/``SAM_ON`` step in float64 (sam_on.py, p='2', elementwise,
    normalize_bias, only_norm): t = |w| + eta on the norm parameters, grad *= t, norm over
    them only (+1e-16), grad *= t again, eps = rho grad / norm, w += eps; descent: every
    parameter back to its old value, then the base optimizer's step with the second-pass
    gradient. ``perturb_all``: the mutant that perturbs (and normalizes over) everything.
    ``gsam``: GSAM's alpha; the descent is ``g_p - alpha (g - (<g, g_p> / ||g_p||^2) g_p)``
    with the inner products over every parameter."""
    cls, opts = BASES[base]
    ws = [p.detach().double().clone().requires_grad_(True) for p in norm + other]
    base_opt = cls(ws, **opts)
    chosen = len(ws) if perturb_all else len(norm)
    history = []
    for step in range(steps):
        with torch.no_grad():
            grads = problem.grads(ws, step)
            old = [w.clone() for w in ws]
            t = [w.abs() + eta if adaptive else torch.ones_like(w) for w in ws[:chosen]]
            u = [g * ti for g, ti in zip(grads, t)]
            norm_u = torch.sqrt(sum((x * x).sum() for x in u)) + 1e-16
            for w, x, ti in zip(ws, u, t):
                w.add_(x * ti * (rho / norm_u))
            grads_p = problem.grads(ws, step)
            if gsam is not None:
                dot = sum((g * gp).sum() for g, gp in zip(grads, grads_p))
                gp2 = sum((gp * gp).sum() for gp in grads_p)
                grads_p = [gp - gsam * (g - dot / gp2 * gp) for g, gp in zip(grads, grads_p)]
            for w, o, g in zip(ws, old, grads_p):
                w.copy_(o)
                w.grad = g.clone()
        base_opt.step()
        history.append([w.detach().clone() for w in ws])
    return history


def rel_error(got, want) -> float:
    return max(
        float(((g.detach().double().cpu() - w).abs() / w.abs().clamp_min(1.0)).max())
        for g, w in zip(got, want)
    )


def steps_against(opt, params, problem, want, tol) -> None:
    """Manual SAM steps on the problem's gradients; after each, the weights are within
    ``tol`` (relative to max(1, |w|)) of the float64 history ``want``."""
    for step, expected in enumerate(want):
        problem.feed(params, step)
        opt.first_step(zero_grad=True)
        problem.feed(params, step)
        opt.second_step(zero_grad=True)
        err = rel_error(params, expected)
        assert err <= tol, f"step {step}: off the float64 rule by {err:.3g}"


OFFICIAL = [
    pytest.param(backend, base, adaptive, dtype, id=f"{backend}-{base}-{'asam' if adaptive else 'sam'}{tag}")
    for base in BASES
    for adaptive in (True, False)
    for dtype, tag in ((torch.float32, ""), (torch.float64, "-f64"))
    for backend in backends_for("sam", dtype)
]


@pytest.mark.parametrize("backend,base,adaptive,dtype", OFFICIAL)
def test_matches_float64_official_sam_on(backend, base, adaptive, dtype, device):
    """The official recipe (elementwise ASAM, eta = 0, rho = 10, biases normalized; and
    plain SAM-ON) over 4 steps equals the float64 re-implementation of sam_on.py."""
    problem, steps, rho = Problem(11), 4, (10.0 if adaptive else 0.5)
    norm, other = init(5, dtype, device)
    want = official_steps(problem, norm, other, base, steps, rho, 0.0, adaptive)
    opt = build(
        backend, base, norm, other, rho=rho, adaptive=adaptive, eta=0.0, norm_eps=1e-16, empty_group=True
    )
    params = norm + other
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    steps_against(opt, params, problem, want, tol)
    # the comparison can fail: perturbing every parameter (plain (A)SAM) is far off
    wrong = official_steps(problem, norm, other, base, steps, rho, 0.0, adaptive, perturb_all=True)
    assert rel_error(params, wrong[-1]) > 30 * tol


@pytest.mark.parametrize("backend", backends_for("gsam"))
@pytest.mark.parametrize("base", list(BASES))
def test_gsam_on_matches_float64(backend, base, device):
    """GSAM with SAM-ON's groups: eps over the norm group only, the descent correction over
    every parameter's first gradient (the groups left out of the ascent keep theirs)."""
    problem, steps, rho, alpha = Problem(12), 3, 0.5, 0.3
    norm, other = init(9, device=device)
    want = official_steps(problem, norm, other, base, steps, rho, 0.0, False, gsam=alpha)
    opt = build(backend, base, norm, other, "gsam", rho=rho, norm_eps=1e-16, variant_options={"alpha": alpha})
    params = norm + other
    steps_against(opt, params, problem, want, 2e-5)
    wrong = official_steps(problem, norm, other, base, steps, rho, 0.0, False, gsam=0.0)  # plain SAM-ON
    assert rel_error(params, wrong[-1]) > 1e-3


@pytest.mark.parametrize("backend", backends_for("gsam"))
def test_gsam_skips_on_a_nonfinite_first_gradient_outside_the_ascent(backend, device):
    """GSAM reads the other group's first gradient: a NaN there skips the step (weights and
    state as before), as one in the perturbed group does."""
    norm, other = init(10, device=device)
    params = norm + other
    problem = Problem(10)
    opt = build(backend, "sgd", norm, other, "gsam")
    problem.feed(params, 0)
    opt.first_step()
    problem.feed(params, 0)
    opt.second_step()
    snap = snapshot(opt, params)
    problem.feed(params, 1)
    other[2].grad[5] = float("nan")
    opt.first_step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, snap[0])), "a skipped step perturbed"
    problem.feed(params, 1)
    opt.second_step()
    assert_bitwise(opt, params, snap, "skipped step", grads_too=False)
    assert float(opt.skipped_steps) == 1


# ---------------------------------------------------------------------------- fused vs reference
VARIANTS = {  # variant -> constructor options (every variant that takes perturb=False)
    "sam": {"adaptive": True, "eta": 0.0, "rho": 2.0},
    "usam": {"rho": 0.01},
    "vasso": {"variant_options": {"theta": 0.4}},
    "fsam": {"variant_options": {"sigma": 0.8, "lam": 0.6}},
    "gcsam": {},
    "rsam": {"variant_options": {"lam": 0.02, "seed": 3}},
    "interval": {"variant_options": {"k": 2}},
    "gsam": {"variant_options": {"alpha": 0.3}},
    "looksam": {"variant_options": {"k": 2, "alpha": 0.7}},
}
PARITY = [
    pytest.param(fused, variant, base, id=f"{fused}-{variant}-{base}")
    for variant in VARIANTS
    for base in BASES
    for fused in backends_for(variant, fused_only=True)
]


def snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        [None if p.grad is None else p.grad.clone() for p in params],
        [{k: v.clone() for k, v in opt.state[p].items()} for p in params],
    )


def assert_bitwise(opt, params, snap, what, grads_too=True):
    weights, grads, states = snap
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), weights[i]), f"{what}: parameter {i} changed"
        if grads_too:
            same = (
                p.grad is None if grads[i] is None else p.grad is not None and torch.equal(p.grad, grads[i])
            )
            assert same, f"{what}: the gradient of parameter {i} changed"
        now = opt.state[p]
        assert now.keys() == states[i].keys(), f"{what}: state keys of parameter {i} changed"
        for k, v in states[i].items():
            assert torch.equal(now[k], v), f"{what}: state {k} of parameter {i} changed"


@pytest.mark.parametrize("fused,variant,base", PARITY)
def test_fused_backends_match_reference(fused, variant, base, device):
    """Lockstep on the same gradients: after each pass the fused backend's weights and state
    equal the reference's to float32 rounding; during the first step the parameters of the
    perturb=False group are bitwise untouched and no backup is allocated for them."""
    problem = Problem(21)
    runs = []
    for backend in ("reference", fused):
        norm, other = init(7, device=device)
        runs.append((norm + other, other, build(backend, base, norm, other, variant, **VARIANTS[variant])))
    (ref, _, opt_r), (got, other, opt_f) = runs
    for step in range(3):
        if variant == "rsam":
            for opt, params in ((opt_r, ref), (opt_f, got)):
                before = [p.detach().clone() for p in params[len(NORM_SHAPES) :]]
                opt.noise_step()
                assert all(torch.equal(a, b) for a, b in zip(before, params[len(NORM_SHAPES) :]))
        problem.feed(ref, step)
        problem.feed(got, step, at=ref)
        untouched = [p.detach().clone() for p in other]
        perturbed = opt_r.first_step()
        assert opt_f.first_step() is perturbed
        if perturbed:
            assert all(torch.equal(a, b) for a, b in zip(untouched, other)), "a perturb=False weight moved"
            torch.testing.assert_close(
                [p.detach() for p in got], [p.detach() for p in ref], rtol=1e-5, atol=1e-6
            )
            problem.feed(ref, step)
            problem.feed(got, step, at=ref)
            opt_r.second_step()
            opt_f.second_step()
        torch.testing.assert_close([p.detach() for p in got], [p.detach() for p in ref], rtol=1e-5, atol=1e-6)
        for a, b in zip(ref, got):
            assert opt_r.state[a].keys() == opt_f.state[b].keys()
            for key in opt_r.state[a]:
                torch.testing.assert_close(opt_f.state[b][key], opt_r.state[a][key], rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # re-synced: differences cannot compound
            for a, b in zip(ref, got):
                b.copy_(a)
        opt_f.load_state_dict(opt_r.state_dict())
    for opt, params in ((opt_r, ref), (opt_f, got)):
        for p in params[len(NORM_SHAPES) :]:
            assert not ({"vasso_d", "fsam_m"} & opt.state[p].keys()), "running state for perturb=False"
        for bucket in opt.engine.buckets:
            assert ("backup" in bucket.storage.buffers) == (bucket.group_index == 0)


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("value", ["no", 0, 1.0, None, torch.tensor(False)])
def test_non_bool_perturb_is_refused_with_nothing_changed(backend, value, device):
    norm, other = init(3, device=device)
    params = norm + other
    problem = Problem(3)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['perturb'\]"):
        SAM([{"params": norm}, {"params": other, "perturb": value}], backend=backend, lr=0.1)
    opt = build(backend, "sgd", norm, other)
    for step in range(2):  # a state to keep
        problem.feed(params, step)
        opt.first_step()
        problem.feed(params, step)
        opt.second_step()
    problem.feed(params, 2)
    opt.param_groups[1]["perturb"] = value
    snap = snapshot(opt, params)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['perturb'\] .*must be True or False"):
        opt.first_step()
    assert_bitwise(opt, params, snap, "refused first_step")
    assert not opt.perturbed
    opt.param_groups[1]["perturb"] = False
    assert opt.first_step()
    opt.second_step()


# ---------------------------------------------------------------------------- mid-step
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_edit_between_passes_takes_effect_next_step(backend, device):
    """perturb edited between the passes: second_step restores what first_step perturbed
    (the step equals one without the edit); the next step follows the new value."""
    problem = Problem(8)
    runs = []
    for _ in range(2):  # the second run has its keys edited
        norm, other = init(4, device=device)
        runs.append((norm + other, build(backend, "sgd", norm, other)))
    for step in range(2):
        for edit, (params, opt) in enumerate(runs):
            problem.feed(params, step)
            opt.first_step()
            if edit:
                opt.param_groups[0]["perturb"] = step == 1
                opt.param_groups[1]["perturb"] = True
            problem.feed(params, step)
            opt.second_step()
        if step == 0:
            assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert "backup" in runs[1][1].engine.buckets[1].storage.buffers  # perturbed at step 1
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("variant", ["sam", "vasso", "rsam", "gsam"])
def test_abort_and_failures_leave_everything_as_before(backend, variant, device):
    norm, other = init(6, device=device)
    params = norm + other
    problem = Problem(6)
    opts = VARIANTS[variant]
    opt = build(backend, "adamw", norm, other, variant, **opts)
    for step in range(2):
        if variant == "rsam":
            opt.noise_step()
        problem.feed(params, step)
        opt.first_step()
        problem.feed(params, step)
        opt.second_step()
    problem.feed(params, 2)
    snap = snapshot(opt, params)
    if variant == "rsam":
        opt.noise_step()
    assert opt.first_step()
    assert opt.abort_step()
    assert_bitwise(opt, params, snap, "abort_step")

    def closure():  # the second pass fails
        if opt.perturbed:
            raise KeyboardInterrupt
        problem.feed(params, 2)
        return torch.zeros(())

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert_bitwise(opt, params, snap, "failed step(closure)", grads_too=False)  # zero_grad ran


# ---------------------------------------------------------------------------- memory
def test_backup_holds_the_perturbed_parameters_only(device):
    """A ResNet-ish model under SAM-ON: the backup buffers hold the normalization
    parameters (padded to 16 elements each), nothing for the others."""
    from benchmarks.models import resnet18_cifar

    model = resnet18_cifar(num_classes=10, tiny=True).to(device)
    groups = norm_param_groups(model, lr=0.1)
    opt = SAM(groups, torch.optim.SGD, rho=10.0, adaptive=True, momentum=0.9, backend="foreach")
    x = torch.randn(2, 3, 32, 32, device=device)
    nn.functional.cross_entropy(model(x), torch.tensor([1, 2], device=device)).backward()
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), torch.tensor([1, 2], device=device)).backward()
    opt.second_step(zero_grad=True)
    buffers = [b.storage.buffers for b in opt.engine.buckets]
    backup = sum(held["backup"].nbytes for held in buffers if "backup" in held)
    padded = sum(-(-p.numel() // ALIGN) * ALIGN * p.element_size() for p in groups[0]["params"])
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    assert backup == padded
    assert backup < 0.02 * everything  # BatchNorm is about 0.1-1 % of a ResNet's weights


# ---------------------------------------------------------------------------- norm_param_groups
class TinyRMS(nn.LayerNorm):  # a subclass of a norm layer counts as one
    pass


class Mixed(nn.Module):
    """Conv + BN, a transformer block with LayerNorm, GroupNorm, RMSNorm, InstanceNorm, a
    misleading name, a shared parameter, a frozen one, awkward sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 3)
        self.bn = nn.BatchNorm2d(7)
        self.gn = nn.GroupNorm(1, 7)
        self.inorm = nn.InstanceNorm2d(7, affine=True)
        self.inorm_plain = nn.InstanceNorm2d(7)  # no affine parameters
        self.block = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=9, batch_first=True)
        self.rms = nn.RMSNorm(8) if hasattr(nn, "RMSNorm") else nn.LayerNorm(8)
        self.sub = TinyRMS(1)
        self.norm_proj = nn.Linear(8, 1)  # named like a norm, it is not one
        self.frozen = nn.LayerNorm(4097)
        self.frozen.weight.requires_grad_(False)
        self.tied = nn.Linear(7, 7, bias=False)
        self.tied.weight = nn.Parameter(torch.randn(7))  # shared with a norm below
        self.ln_tied = nn.LayerNorm(7)
        self.ln_tied.weight = self.tied.weight


def test_norm_param_groups_picks_normalization_layers_by_type():
    model = Mixed()
    groups = norm_param_groups(model, rho=10.0, adaptive=True, lr=0.1)
    norm_ids = {id(p) for p in groups[0]["params"]}
    want = {
        id(p)
        for m in (model.bn, model.gn, model.inorm, model.rms, model.sub, model.ln_tied)
        for p in m.parameters()
    }
    want |= {id(model.block.norm1.weight), id(model.block.norm1.bias), id(model.block.norm2.weight)}
    want |= {id(model.block.norm2.bias), id(model.frozen.bias)}
    assert norm_ids == want
    assert len(groups[0]["params"]) == len(norm_ids)  # listed once each
    other = groups[1]["params"]
    assert {id(p) for p in other} == {id(p) for p in model.parameters() if p.requires_grad} - norm_ids
    assert id(model.norm_proj.weight) in {id(p) for p in other}
    assert groups[1]["perturb"] is False and "perturb" not in groups[0]
    for group in groups:
        assert group["rho"] == 10.0 and group["adaptive"] is True and group["lr"] == 0.1
    opt = SAM(groups, torch.optim.SGD, backend="reference")
    assert [g["perturb"] for g in opt.param_groups] == [True, False]


def test_norm_param_groups_refuses_what_cannot_be_sam_on():
    with pytest.raises(ValueError, match=r"no normalization parameters.*none of BatchNorm1d"):
        norm_param_groups(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)))
    with pytest.raises(ValueError, match=r"InstanceNorm2d.*no trainable affine parameters"):
        norm_param_groups(nn.Sequential(nn.Conv2d(1, 2, 1), nn.InstanceNorm2d(2)))
    with pytest.raises(ValueError, match="'perturb'"):
        norm_param_groups(nn.BatchNorm1d(3), perturb=True)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        norm_param_groups([nn.Parameter(torch.ones(1))])
    only_norm = norm_param_groups(nn.LayerNorm(1))  # nothing else: an empty second group
    assert only_norm[1]["params"] == [] and len(only_norm[0]["params"]) == 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 7, 3), nn.BatchNorm2d(7), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(7 * 4 * 4, 5)
        self.ln = nn.LayerNorm(5)

    def forward(self, x):
        return self.ln(self.head(self.body(x)))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_checkpoint_round_trip_into_a_fresh_model(backend, tmp_path, device):
    """Two steps, save model and optimizer, reload both into freshly built ones: the next
    step is bitwise the same, and the groups keep perturb."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 6, 6, device=device), torch.tensor([0, 1, 2, 3], device=device)

    def step(model, opt):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    def make():
        model = Net().to(device)
        groups = norm_param_groups(model, lr=0.05)
        return model, SAM(groups, torch.optim.SGD, rho=10.0, adaptive=True, momentum=0.9, backend=backend)

    model, opt = make()
    for _ in range(2):
        step(model, opt)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    fresh, fresh_opt = make()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    assert [g["perturb"] for g in saved["opt"]["param_groups"]] == [True, False]
    assert [g["perturb"] for g in fresh_opt.param_groups] == [True, False]
    step(model, opt)
    step(fresh, fresh_opt)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_every_backend_is_covered():
    assert set(FUSED_BACKENDS) <= {p.values[0] for p in PARITY}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("variant", ["sam", "vasso", "gsam", "looksam"])
def test_grad_scaler_run_equals_unscaled_run(backend, variant, device):
    """Under a GradScaler (a power-of-two scale: exact), SAM-ON's steps equal the unscaled
    ones bit for bit: the groups left out of the ascent are unscaled where they are read
    (the descent; GSAM's and LookSAM's kept first gradient)."""
    x, y = torch.randn(4, 3, 6, 6, device=device), torch.tensor([0, 1, 2, 3], device=device)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Net().to(device)
        opts = {**VARIANTS[variant], "rho": 0.5, "adaptive": False}
        runs.append(
            (
                model,
                SAM(
                    norm_param_groups(model),
                    torch.optim.SGD,
                    lr=0.05,
                    backend=backend,
                    variant=variant,
                    **opts,
                ),
            )
        )
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    for _ in range(3):
        for scaled, (model, opt) in enumerate(runs):
            scale = scaler.scale if scaled else (lambda loss: loss)
            kw = {"grad_scaler": scaler} if scaled else {}
            scale(nn.functional.cross_entropy(model(x), y)).backward()
            if opt.first_step(zero_grad=True, **kw):
                scale(nn.functional.cross_entropy(model(x), y)).backward()
                opt.second_step(zero_grad=True, **kw)
        scaler.update()
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(a, b)


def test_a_plain_torch_optim_checkpoint_keeps_the_groups_perturb(device):
    """A checkpoint without SAM's keys (torch.optim.SGD's) takes the optimizer's defaults for
    rho and the others, but each group keeps its own perturb: SAM-ON stays SAM-ON."""
    model = Net().to(device)
    sgd = torch.optim.SGD([{"params": g["params"]} for g in norm_param_groups(model)], lr=0.2, momentum=0.9)
    x, y = torch.randn(4, 3, 6, 6, device=device), torch.tensor([0, 1, 2, 3], device=device)
    nn.functional.cross_entropy(model(x), y).backward()
    sgd.step()
    opt = SAM(norm_param_groups(model, lr=0.05), torch.optim.SGD, momentum=0.9, backend="reference")
    opt.param_groups[0]["rho"] = 0.3
    saved = sgd.state_dict()
    assert not any("perturb" in g for g in saved["param_groups"])
    opt.load_state_dict(saved)
    assert [g["perturb"] for g in opt.param_groups] == [True, False]
    assert [g["rho"] for g in opt.param_groups] == [0.05, 0.05] and opt.param_groups[0]["lr"] == 0.2
