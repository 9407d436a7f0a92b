"""Trustworthy under misuse: no silent wrong numbers, no stuck optimizer, every refusal atomic.

The rule under test: an operation either completes, or raises a clear error with the
parameters, gradients and all optimizer state bitwise as they were; no exception leaves
the weights perturbed behind it (``step(closure)`` abandons its step; the manual loop has
``abort_step()``). Each case runs on every backend that accepts it (reference, Triton
through the interpreter, cpp, and the CUDA backend's source under emulation on the CPU),
and every refusal is checked for bitwise-unchanged parameters, gradients and state.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import mlp, mse_loss_of, regression_batch, sam_step
from conftest import ALL_BACKENDS, COMPILED, backends_for, runs_strided

from sam_fused import FSAM, GSAM, RSAM, SAM, VaSSO

GRADIENT_VARIANTS = ["sam", "vasso", "fsam", "rsam", "gsam", "looksam"]


# ---------------------------------------------------------------------- helpers
def make_model(device: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return mlp([5, 9, 3], final_activation=True, seed=seed, device=device, dtype=dtype)


def batch(device: str, seed: int, dtype: torch.dtype = torch.float32):
    return regression_batch(seed, 8, 5, 3, device, dtype, draw=torch.float32)


loss_of = mse_loss_of
manual_step = sam_step


def bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def snapshot(model, opt) -> dict:
    """Everything a refusal must leave alone, bit for bit."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else list(model)
    state = {}
    for i, p in enumerate(params):
        state[i] = (
            {k: bits(v) if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            if p in opt.state
            else {}
        )
    return {
        "params": [bits(p) for p in params],
        "grads": [
            None if p.grad is None else bits(p.grad.to_dense() if p.grad.is_sparse else p.grad)
            for p in params
        ],
        "state": state,
        "step_index": opt._engine.step.step_index,
        "status": bits(opt._engine.status),
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "perturbed": opt.perturbed,
    }


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])


def build(model, backend, variant="sam", base=torch.optim.SGD, **kw):
    kw.setdefault("lr", 0.05)
    if base is torch.optim.SGD:
        kw.setdefault("momentum", 0.9)
    return SAM(model.parameters(), base, rho=0.1, variant=variant, backend=backend, **kw)


def cases(variants=GRADIENT_VARIANTS):
    return [pytest.param(b, v, id=f"{b}-{v}") for v in variants for b in backends_for(v)]


# ---------------------------------------------------------------------- silent wrong numbers: state
@pytest.mark.parametrize("backend,variant", cases(["sam", "fsam"]))
def test_load_state_dict_gives_fresh_state_where_the_checkpoint_has_none(backend, variant, device):
    """As torch.optim: a parameter without state in the checkpoint starts fresh (Adam's step
    count included), so the live optimizer then steps exactly as a new one loaded alike."""
    model = make_model(device)
    opt = build(model, backend, variant, torch.optim.AdamW)
    for step in range(3):
        manual_step(model, opt, *batch(device, step))
    saved = opt.state_dict()
    first = next(model.parameters())
    first_index = 0
    del saved["state"][first_index]  # the checkpoint knows nothing of the first parameter
    twin_model = copy.deepcopy(model)
    twin = build(twin_model, backend, variant, torch.optim.AdamW)
    twin.load_state_dict(copy.deepcopy(saved))
    opt.load_state_dict(saved)
    assert first not in opt.state and dict(opt.state[first]) == {}
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    reference.load_state_dict({"state": {}, "param_groups": reference.state_dict()["param_groups"]})
    assert len(reference.state) == 0  # what torch.optim does with such a checkpoint
    manual_step(model, opt, *batch(device, 9))
    manual_step(twin_model, twin, *batch(device, 9))
    assert torch.equal(weights(model), weights(twin_model))
    assert float(opt.state[first]["step"]) == 1.0


@pytest.mark.parametrize("backend,variant", cases(["sam", "vasso"]))
def test_state_clear_starts_every_parameter_fresh(backend, variant, device):
    model = make_model(device)
    opt = build(model, backend, variant)
    for step in range(2):
        manual_step(model, opt, *batch(device, step))
    opt.state.clear()
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    fresh_model = copy.deepcopy(model)
    fresh = build(fresh_model, backend, variant)
    manual_step(model, opt, *batch(device, 5))
    manual_step(fresh_model, fresh, *batch(device, 5))
    assert torch.equal(weights(model), weights(fresh_model))
    # deleting one parameter's entry makes that one fresh (torch.optim: del opt.state[p])
    p = next(model.parameters())
    del opt.state[p]
    assert p not in opt.state and len(opt.state) == len(list(model.parameters())) - 1


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_checkpoint_of_other_shapes_is_refused_and_changes_nothing(backend, device):
    model = make_model(device)
    opt = build(model, backend)
    manual_step(model, opt, *batch(device, 0))
    other = torch.nn.Sequential(torch.nn.Linear(9, 5), torch.nn.Tanh(), torch.nn.Linear(3, 9)).to(device)
    other_opt = SAM(other.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="reference")
    for p in other.parameters():
        p.grad = torch.ones_like(p)
    other_opt.first_step()
    other_opt.second_step()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other_opt.state_dict())
    assert snapshot(model, opt) == before
    incomplete = opt.state_dict()
    incomplete["param_groups"][0]["params"] = incomplete["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="size"):
        opt.load_state_dict(incomplete)
    assert snapshot(model, opt) == before


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opt_state_edits_reach_the_kernels(backend, device):
    """Writing into opt.state[p] changes what the next step reads (one truth)."""
    model = make_model(device)
    opt = build(model, backend)
    manual_step(model, opt, *batch(device, 0))
    twin_model = copy.deepcopy(model)
    twin = build(twin_model, "reference")
    twin.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), twin_model.parameters()):
        opt.state[p]["momentum_buffer"] = torch.full_like(p, 0.25)
        twin.state[q]["momentum_buffer"] = torch.full_like(q, 0.25)
    manual_step(model, opt, *batch(device, 1))
    manual_step(twin_model, twin, *batch(device, 1))
    torch.testing.assert_close(weights(model), weights(twin_model), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- parameters the flat layout cannot own
def _slice_model(device):
    torch.manual_seed(0)
    big = torch.randn(6, 10, device=device)
    weight = torch.nn.Parameter(big[:, :5])  # a slice: not dense, part of a larger storage
    transposed = torch.nn.Parameter(torch.randn(3, 6, device=device).t())  # dense, not contiguous
    return big, [weight, transposed]


@pytest.mark.parametrize("backend", ["auto", "reference", "foreach"])
def test_parameters_the_flat_layout_cannot_own_train_in_place(backend, device):
    big, params = _slice_model(device)
    opt = SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = SAM(ref_params, torch.optim.SGD, lr=0.1, momentum=0.9, backend="reference")
    x = torch.randn(4, 5, device=device)
    for _ in range(3):
        for ps, o in ((params, opt), (ref_params, ref)):
            (x @ ps[0].t() @ ps[1]).square().mean().backward()
            o.first_step(zero_grad=True)
            (x @ ps[0].t() @ ps[1]).square().mean().backward()
            o.second_step(zero_grad=True)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(big[:, :5], params[0].detach())  # still a view of its tensor: it trained in place


@pytest.mark.parametrize("backend", [b for b in backends_for("sam", fused_only=True) if not runs_strided(b)])
def test_a_fused_backend_refuses_a_slice_with_the_reason(backend, device):
    _, params = _slice_model(device)
    with pytest.raises(ValueError, match="slice"):
        SAM(params[:1], lr=0.1, backend=backend)


# backend="cuda" here: the CUDA library's table launches, emulated on the CPU (conftest)
@pytest.mark.parametrize("backend", ["auto"] + (["cuda"] if "cuda" in COMPILED else []))
def test_shared_memory_parameters_stay_shared(device, backend):
    if device != "cpu":
        pytest.skip("share_memory() concerns CPU tensors")
    model = make_model(device)
    model.share_memory()
    opt = SAM(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
    manual_step(model, opt, *batch(device, 0))
    assert all(p.is_shared() for p in model.parameters())
    # left in place: table buckets, which the C++ backend runs where it builds
    auto = "cpp" if "cpp" in COMPILED else "foreach"
    assert set(opt.backends) == {auto if backend == "auto" else backend}


# ---------------------------------------------------------------------- edits to param groups
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("edit", ["remove", "append", "replace", "new-group"])
def test_edited_param_lists_are_refused_at_the_next_step(backend, edit, device):
    model = make_model(device)
    extra = torch.nn.Parameter(torch.randn(4, device=device))
    opt = build(model, backend)
    manual_step(model, opt, *batch(device, 0))
    params = opt.param_groups[0]["params"]
    if edit == "remove":
        params.pop()
    elif edit == "append":
        params.append(extra)
    elif edit == "replace":
        params[1] = extra
    else:
        opt.param_groups.append(
            {"params": [extra], **{k: v for k, v in opt.param_groups[0].items() if k != "params"}}
        )
    loss_of(model, *batch(device, 1)).backward()
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.first_step()
    assert snapshot(model, opt) == before


# ---------------------------------------------------------------------- GSAM with a missing first gradient
@pytest.mark.parametrize("backend", backends_for("gsam"))
def test_gsam_missing_first_gradient_counts_as_zero(backend, device):
    """A parameter with no first-pass gradient but a second-pass one: its g is 0 (not last
    step's), exactly as a zero first gradient gives."""
    results = []
    for missing in (None, "zeros"):
        model = make_model(device)
        opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=0.4, lr=0.05, backend=backend)
        manual_step(model, opt, *batch(device, 0))
        last = list(model.parameters())[-1]
        loss_of(model, *batch(device, 1)).backward()
        last.grad = None if missing is None else torch.zeros_like(last)
        opt.first_step(zero_grad=True)
        loss_of(model, *batch(device, 1)).backward()
        opt.second_step(zero_grad=True)
        results.append(weights(model))
    assert torch.equal(results[0], results[1])


# ---------------------------------------------------------------------- values that switch SAM off
BAD_NUMBERS = [float("nan"), float("inf"), -1.0, "0.05", True]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=lambda v: repr(v))
@pytest.mark.parametrize("name", ["rho", "eta", "norm_eps"])
def test_bad_numbers_are_refused_at_construction(name, value, device):
    if name == "norm_eps" and value == -1.0:
        value = 0.0
    with pytest.raises((ValueError, TypeError), match=name):
        SAM(make_model(device).parameters(), lr=0.1, **{name: value})


@pytest.mark.parametrize(
    "cls,option,value",
    [
        (GSAM, "alpha", float("nan")),
        (FSAM, "sigma", float("nan")),
        (FSAM, "lam", float("nan")),
        (RSAM, "lam", float("inf")),
        (RSAM, "noise_std", float("nan")),
        (RSAM, "seed", 2**70),
        (VaSSO, "theta", "0.9"),
    ],
)
def test_bad_variant_options_are_refused_where_they_are_set(cls, option, value, device):
    model = make_model(device)
    with pytest.raises(ValueError, match=option):
        cls(model.parameters(), lr=0.1, **{option: value})
    opt = cls(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="fixed"):
        opt.variant_options[option] = value
    with pytest.raises(AttributeError, match="fixed"):
        opt.norm_eps = float("nan")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "key,value",
    [
        ("rho", float("nan")),
        ("rho", float("inf")),
        ("rho", -0.1),
        ("rho", torch.tensor(float("nan"))),
        ("rho", torch.tensor(-1.0)),
        ("rho", torch.tensor([0.1, 0.2])),
        ("eta", float("inf")),
        ("adaptive", "no"),
    ],
    ids=["nan", "inf", "negative", "nan-tensor", "negative-tensor", "two-values", "eta-inf", "adaptive-no"],
)
def test_bad_group_values_are_refused_at_the_next_step(backend, key, value, device):
    model = make_model(device)
    opt = build(model, backend)
    manual_step(model, opt, *batch(device, 0))
    opt.param_groups[0][key] = value
    loss_of(model, *batch(device, 1)).backward()
    before = snapshot(model, opt)
    with pytest.raises((ValueError, TypeError), match=key):
        opt.first_step()
    assert snapshot(model, opt) == before


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_numpy_numbers_are_numbers(backend, device):
    runs = []
    for rho, adaptive, eta in (
        (float(np.float32(0.05)), True, 0.01),
        (np.float32(0.05), np.bool_(True), np.float64(0.01)),
    ):
        model = make_model(device)
        opt = SAM(model.parameters(), rho=rho, adaptive=adaptive, lr=0.1, backend=backend)
        opt.param_groups[0]["eta"] = eta
        manual_step(model, opt, *batch(device, 0))
        runs.append(weights(model))
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------------- stuck optimizer: every base
BASES = {
    "SGD": dict(lr=0.05, momentum=0.9),
    "Adam": dict(lr=1e-2),
    "AdamW": dict(lr=1e-2),
    "Adadelta": dict(lr=1.0),
    "Adafactor": dict(lr=1e-2),
    "Adagrad": dict(lr=1e-2),
    "Adamax": dict(lr=1e-2),
    "ASGD": dict(lr=1e-2),
    "NAdam": dict(lr=1e-2),
    "RAdam": dict(lr=1e-2),
    "RMSprop": dict(lr=1e-2),
    "Rprop": dict(lr=1e-2),
    "Muon": dict(lr=1e-2),
}
# not a base for SAM: LBFGS evaluates its closure many times per step (one SAM pass each);
# SparseAdam takes sparse gradients only, which SAM refuses
UNSUITED = {"LBFGS", "SparseAdam"}


def test_the_base_table_covers_torch_optim():
    import inspect

    classes = {
        n for n, c in vars(torch.optim).items() if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer)
    }
    assert classes - {"Optimizer"} == set(BASES) | UNSUITED


@pytest.mark.parametrize("variant", ["vasso", "fsam", "sam"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_every_torch_base_trains_under_every_stateful_variant(base, variant, device):
    """The variant's running state never blocks the base optimizer's lazy init: the descent is
    exactly the base optimizer's own step on the second-pass gradient (twin check)."""
    cls = getattr(torch.optim, base)
    model = torch.nn.Linear(6, 4).to(device)  # 2-D weights (Muon) and a 1-D bias
    params = [model.weight] if base == "Muon" else list(model.parameters())
    opt = SAM(params, cls, rho=0.1, variant=variant, **BASES[base])
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = cls(twin, **BASES[base])
    fused = base in ("SGD", "Adam", "AdamW")  # run by sam_fused's kernels: float rounding, not bits
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=gen).to(device), torch.randn(8, 4, generator=gen).to(device)
        F.mse_loss(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.mse_loss(model(x), y).backward()
        second = [p.grad.clone() for p in params]
        opt.second_step(zero_grad=True)
        for q, g in zip(twin, second):
            q.grad = g
        twin_opt.step()
        for p, q in zip(params, twin):
            if fused:
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(p.detach(), q.detach()), f"{base}/{variant} step {step}"
    if variant != "sam":
        name = opt.variant.running_state
        assert all(name in opt.state[p] for p in params)
        assert all(set(twin_opt.state[q]) == set(opt.state[p]) - {name} for p, q in zip(params, twin))


# ---------------------------------------------------------------------- exceptions between the passes
class Boom(Exception):
    pass


@pytest.mark.parametrize("backend,variant", cases())
@pytest.mark.parametrize("raise_in", ["pass1", "pass2", "interrupt"])
def test_an_exception_in_a_closure_restores_the_weights(backend, variant, raise_in, device):
    model = make_model(device)
    opt = build(model, backend, variant)
    manual_step(model, opt, *batch(device, 0))
    while not opt.perturbs_this_step:  # LookSAM: up to its next two-pass step
        manual_step(model, opt, *batch(device, 0))
    x, y = batch(device, 1)
    calls = []

    def closure():
        calls.append(1)
        loss = loss_of(model, x, y)
        loss.backward()
        if (raise_in == "pass1" and len(calls) == 1) or (raise_in != "pass1" and len(calls) == 2):
            raise KeyboardInterrupt if raise_in == "interrupt" else Boom
        return loss

    opt.zero_grad()
    before = snapshot(model, opt)
    with pytest.raises(KeyboardInterrupt if raise_in == "interrupt" else Boom):
        opt.step(closure)
    after = snapshot(model, opt)
    assert after["params"] == before["params"] and after["state"] == before["state"]
    assert after["step_index"] == before["step_index"] and not opt.perturbed
    # and the optimizer is usable: the next step equals an untroubled optimizer's
    twin_model = copy.deepcopy(model)
    twin = build(twin_model, backend, variant)
    twin.load_state_dict(opt.state_dict())
    if variant == "rsam":  # the same noise: the generator went back too
        assert torch.equal(twin._engine.step.generator.get_state(), opt._engine.step.generator.get_state())
    opt.zero_grad()
    for m, o in ((model, opt), (twin_model, twin)):
        o.step(lambda m=m: loss_of(m, x, y).backward() or loss_of(m, x, y).detach())
        o.zero_grad()
    assert torch.equal(weights(model), weights(twin_model))


@pytest.mark.parametrize("backend,variant", cases())
def test_abort_step_puts_everything_back(backend, variant, device):
    model = make_model(device)
    opt = build(model, backend, variant)
    manual_step(model, opt, *batch(device, 0))
    x, y = batch(device, 1)
    loss_of(model, x, y).backward()
    before = snapshot(model, opt)
    if variant == "rsam":
        generator_before = opt._engine.step.generator.get_state()
        opt.noise_step()
    loss_of(model, x, y).backward()
    if opt.first_step():
        assert opt.perturbed
        assert opt.abort_step() is True
        after = snapshot(model, opt)
        assert after["params"] == before["params"] and after["state"] == before["state"]
        assert after["step_index"] == before["step_index"] and not opt.perturbed
    if variant == "rsam":
        assert torch.equal(opt._engine.step.generator.get_state(), generator_before)
    assert opt.abort_step() is False  # nothing in flight


# ---------------------------------------------------------------------- half-applied operations
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_bad_later_group_refuses_the_whole_first_step(backend, device):
    model = make_model(device)
    layers = [model[0], model[2]]
    opt = SAM(
        [{"params": layers[0].parameters()}, {"params": layers[1].parameters()}], lr=0.1, backend=backend
    )
    manual_step(model, opt, *batch(device, 0))
    opt.param_groups[1]["rho"] = float("nan")
    loss_of(model, *batch(device, 1)).backward()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        opt.first_step()
    assert snapshot(model, opt) == before


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_refused_add_param_group_adds_nothing(backend, device):
    model = make_model(device)
    opt = SAM(model[0].parameters(), lr=0.1, backend=backend)
    manual_step(model, opt, *batch(device, 0))
    given = {"params": list(model[2].parameters()), "rho": float("nan")}
    storages = [p.untyped_storage().data_ptr() for p in model[2].parameters()]
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group(given)
    assert snapshot(model, opt) == before
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1
    assert given == {
        "params": list(model[2].parameters()),
        "rho": given["rho"],
    }  # the caller's dict untouched
    assert [p.untyped_storage().data_ptr() for p in model[2].parameters()] == storages  # not moved


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_refused_second_step_changes_nothing_and_can_be_retried(backend, device):
    model = make_model(device)
    twin_model = copy.deepcopy(model)
    opt, twin = build(model, backend), build(twin_model, backend)
    x, y = batch(device, 0)
    for m, o in ((model, opt), (twin_model, twin)):
        loss_of(m, x, y).backward()
        o.first_step(zero_grad=True)
        loss_of(m, x, y).backward()
    last = list(model.parameters())[-1]
    good = last.grad
    last.grad = torch.zeros_like(last).to_sparse()  # refused: SAM needs dense gradients
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="sparse gradient"):
        opt.second_step()
    assert snapshot(model, opt) == before and opt.perturbed
    last.grad = good
    opt.second_step()
    twin.second_step()
    assert torch.equal(weights(model), weights(twin_model))


# ---------------------------------------------------------------------- checkpoints from elsewhere
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("base", ["SGD", "Adam"])
def test_a_plain_torch_optim_checkpoint_loads(backend, base, device):
    cls = getattr(torch.optim, base)
    kw = dict(lr=0.05, momentum=0.9) if base == "SGD" else dict(lr=1e-2)
    plain_model = make_model(device)
    plain = cls(plain_model.parameters(), **kw)
    for step in range(2):
        loss_of(plain_model, *batch(device, step)).backward()
        plain.step()
        plain.zero_grad()
    model = copy.deepcopy(plain_model)
    opt = SAM(model.parameters(), cls, rho=0.07, backend=backend, **kw)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["rho"] == 0.07  # SAM's own keys take the optimizer's defaults
    for p, q in zip(model.parameters(), plain_model.parameters()):
        for key, value in plain.state[q].items():
            assert torch.equal(torch.as_tensor(opt.state[p][key]).cpu(), torch.as_tensor(value).cpu()), key
    manual_step(model, opt, *batch(device, 5))
    assert torch.isfinite(weights(model)).all()


# ---------------------------------------------------------------------- name clashes with the base
def test_adadelta_keeps_its_own_rho(device):
    model = make_model(device)
    opt = SAM(model.parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
    group = opt.param_groups[0]
    assert group["rho"] == 0.9 and group["sam_rho"] == 0.05  # Adadelta's decay, SAM's radius
    twin = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    twin_opt = torch.optim.Adadelta(twin, lr=1.0, rho=0.9)
    x, y = batch(device, 0)
    loss_of(model, x, y).backward()
    w = weights(model)
    opt.first_step(zero_grad=True)
    assert float((weights(model) - w).norm()) == pytest.approx(0.05, rel=1e-5)  # SAM's radius
    loss_of(model, x, y).backward()
    for q, p in zip(twin, model.parameters()):
        q.grad = p.grad.clone()
    opt.second_step()
    twin_opt.step()
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(model.parameters(), twin))


# ---------------------------------------------------------------------- refusals that run user code
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_step_with_a_closure_mid_step_runs_nothing(backend, device):
    model = make_model(device)
    opt = build(model, backend)
    loss_of(model, *batch(device, 0)).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, *batch(device, 0)).backward()
    calls = []
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="between first_step"):
        opt.step(lambda: calls.append(1))
    assert calls == [] and snapshot(model, opt) == before


@pytest.mark.parametrize("backend,variant", cases(["sam", "rsam"]))
def test_the_migrated_closure_loop_is_refused(backend, variant, device):
    """The popular file's loop (one pass outside, then step(closure) with a closure that does
    not zero) would add the outside pass's gradients to the first pass: refused when the
    closure's backward reaches the first parameter, before any gradient is accumulated.
    torch.optim's own patterns, which leave gradients too, run (tests/test_conformance.py)."""
    model = make_model(device)
    opt = build(model, backend, variant)
    x, y = batch(device, 0)
    loss_of(model, x, y).backward()
    calls = []
    before = snapshot(model, opt)
    for _ in range(2):  # a refusal changes nothing: the check is not used up by it
        with pytest.raises(RuntimeError, match="migrated"):
            opt.step(lambda: calls.append(1) or loss_of(model, x, y).backward())
    assert calls == [1, 1] and snapshot(model, opt) == before

    def zeroing():  # the fix the message names: the closure zeroes first
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    twin = make_model(device)
    twin_opt = build(twin, backend, variant)
    opt.step(zeroing)
    manual_step(twin, twin_opt, x, y)  # the same step, without the leftover gradients
    assert torch.equal(weights(model), weights(twin))


# ---------------------------------------------------------------------- copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("backend,variant", cases(["sam", "vasso", "rsam", "looksam"]))
def test_a_copy_steps_like_the_original_and_shares_nothing(backend, variant, how, device):
    model = make_model(device)
    opt = build(model, backend, variant)
    for step in range(2):
        manual_step(model, opt, *batch(device, step))
    if how == "deepcopy":
        copied = copy.deepcopy(opt)
    else:
        buffer = io.BytesIO()
        pickle.dump(opt, buffer)
        copied = pickle.loads(buffer.getvalue())
    params = copied.param_groups[0]["params"]
    assert all(p is not q and p.data_ptr() != q.data_ptr() for p, q in zip(params, model.parameters()))
    original = weights(model)
    for step in (2, 3):
        x, y = batch(device, step)
        for o, ps in ((opt, list(model.parameters())), (copied, params)):
            if o.variant.perturbs_before_pass:
                o.noise_step()

            def loss(ps=ps, x=x, y=y):
                h = torch.tanh(F.linear(x, ps[0], ps[1]))
                return F.mse_loss(torch.tanh(F.linear(h, ps[2], ps[3])), y)

            loss().backward()
            if o.first_step(zero_grad=True):
                loss().backward()
                o.second_step(zero_grad=True)
        assert torch.equal(torch.cat([p.detach().flatten() for p in params]).double().cpu(), weights(model))
    assert not torch.equal(weights(model), original)


# ---------------------------------------------------------------------- schedules that move the betas
@pytest.mark.skipif("triton" not in backends_for("sam"), reason="the Triton backend's device betas")
def test_one_cycle_betas_reach_the_kernels_without_piling_up(device):
    """OneCycleLR cycles Adam's beta1 every step: the Triton backend keeps one device copy of
    the betas per bucket, rewritten when they change, and the run equals the reference's."""
    runs = {}
    for backend in ("triton", "reference"):
        model = make_model(device)
        opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, backend=backend)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20, cycle_momentum=True)
        betas = []
        for step in range(6):
            manual_step(model, opt, *batch(device, step))
            if backend == "triton":  # the values this step used, in the one tensor there is
                cache = opt._engine.buckets[0].cache
                assert list(cache) == ["device_scalars"]
                assert cache["device_scalars"][0] == tuple(opt.param_groups[0]["betas"][:2])
            betas.append(opt.param_groups[0]["betas"][0])
            sched.step()
        assert len(set(betas)) == len(betas)  # they did move every step
        runs[backend] = weights(model)
    torch.testing.assert_close(runs["triton"], runs["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_max_grad_norm_is_settable_and_checked(backend, device):
    """Frameworks hand their clipping value over: a valid value takes effect at the next step
    (as if given to the constructor), a bad one is refused and changes nothing."""
    runs = []
    for late in (False, True):
        model = make_model(device)
        opt = build(model, backend, **({} if late else {"max_grad_norm": 0.05}))
        if late:
            for bad in (float("nan"), -1.0, "1"):
                with pytest.raises(ValueError, match="max_grad_norm"):
                    opt.max_grad_norm = bad
                assert opt.max_grad_norm is None
            opt.max_grad_norm = 0.05
        manual_step(model, opt, *batch(device, 0))
        runs.append(weights(model))
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="LookSAM"):
        build(make_model(device), "reference", "looksam").max_grad_norm = 1.0
