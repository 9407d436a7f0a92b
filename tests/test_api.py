"""The user-facing contract: closures, checkpoints, schedulers, groups and bad input.

Numbers here are compared with an independent run of the same loop (the manual loop, an
uninterrupted run, torch.optim itself), never with stored values.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings

import pytest
import torch
from _helpers import mlp, mse_loss_of, regression_batch, sam_step
from conftest import BACKENDS, HAS_TRITON, NEEDS_TRITON

from sam_fused import SAM


def make_model(device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    return mlp([7, 33, 5, 1], seed=seed, device=device, dtype=dtype)


def batch(device: str, seed: int, dtype: torch.dtype = torch.float32):
    return regression_batch(seed, 16, 7, 1, device, dtype)


loss_of = mse_loss_of
manual_step = sam_step


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
        for p in model.parameters()
    }
    return params, state


def assert_unchanged(model, opt, snap):
    params, state = snap
    for p, before in zip(model.parameters(), params, strict=True):
        assert torch.equal(p.detach(), before), "a refused step changed a parameter"
    for p in model.parameters():
        now = opt.state[p]
        assert set(now) == set(state[id(p)]), "a refused step changed the state keys"
        for k, v in now.items():
            if torch.is_tensor(v):
                assert torch.equal(v, state[id(p)][k]), f"a refused step changed state {k}"


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", sorted(BASES))
def test_closure_matches_manual_loop(device, backend, base):
    cls, kw = BASES[base]
    results, losses = [], []
    for use_closure in (False, True):
        model = make_model(device)
        opt = SAM(model.parameters(), cls, rho=0.1, backend=backend, **kw)
        got = []
        closure_model = model
        for step in range(3):
            x, y = batch(device, step)
            if use_closure:

                def closure(x=x, y=y, model=closure_model):
                    loss = loss_of(model, x, y)
                    loss.backward()
                    return loss

                got.append(opt.step(closure).item())
                opt.zero_grad()
            else:
                got.append(manual_step(model, opt, x, y).item())
        results.append(flat_params(model))
        losses.append(got)
    assert torch.equal(results[0], results[1])
    assert losses[0] == losses[1]


def test_step_without_closure_is_refused(device):
    model = make_model(device)
    opt = SAM(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", sorted(BASES))
def test_resume_from_checkpoint_is_bit_exact(device, backend, base):
    cls, kw = BASES[base]
    model = make_model(device)
    opt = SAM(model.parameters(), cls, rho=0.05, backend=backend, **kw)
    for step in range(6):
        manual_step(model, opt, *batch(device, step))
    uninterrupted = flat_params(model)

    model = make_model(device)
    opt = SAM(model.parameters(), cls, rho=0.05, backend=backend, **kw)
    for step in range(3):
        manual_step(model, opt, *batch(device, step))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    checkpoint = opt.state_dict()
    for state in checkpoint["state"].values():
        assert "backup" not in state and "old_p" not in state
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model2 = make_model(device, seed=123)  # different init: everything must come from the checkpoint
    opt2 = SAM(model2.parameters(), cls, rho=0.05, backend=backend, **kw)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for step in range(3, 6):
        manual_step(model2, opt2, *batch(device, step))
    assert torch.equal(flat_params(model2), uninterrupted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_drives_the_update_without_warnings(device, backend):
    model = make_model(device)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)  # lr: 0.1, then 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manual_step(model, opt, *batch(device, 0))
        sched.step()
        assert opt.base_optimizer.param_groups[0]["lr"] == 0.0
        before = flat_params(model)
        manual_step(model, opt, *batch(device, 1))  # lr 0: the step must restore w exactly
        sched.step()
    assert torch.equal(flat_params(model), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_matches_torch_optim(device, backend):
    """With rho = 0 SAM is its base optimizer: a cosine schedule must give the same weights."""
    model = make_model(device)
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9, backend=backend)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, foreach=False)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4) for o in (opt, ref_opt)]
    for step in range(4):
        x, y = batch(device, step)
        manual_step(model, opt, x, y)
        ref_opt.zero_grad()
        loss_of(reference, x, y).backward()
        ref_opt.step()
        for s in scheds:
            s.step()
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_and_per_group_rho(device, backend):
    model = make_model(device)
    layers = [model[0], model[2], model[4]]
    opt = SAM(layers[0].parameters(), torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    opt.add_param_group({"params": layers[1].parameters(), "rho": 0.0, "lr": 0.0})
    opt.add_param_group({"params": layers[2].parameters()})
    assert [g["rho"] for g in opt.param_groups] == [0.05, 0.0, 0.05]
    assert opt.base_optimizer.param_groups is opt.param_groups
    frozen = [p.detach().clone() for p in layers[1].parameters()]
    moving = [p.detach().clone() for p in layers[2].parameters()]
    manual_step(model, opt, *batch(device, 0))
    for p, before in zip(layers[1].parameters(), frozen, strict=True):
        assert torch.equal(p.detach(), before)  # lr 0 in that group: restored exactly
    assert any(not torch.equal(p.detach(), b) for p, b in zip(layers[2].parameters(), moving, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_mid_step_is_refused_and_changes_nothing(device, backend):
    model = make_model(device)
    layers = [model[0], model[2], model[4]]
    opt = SAM([*layers[0].parameters(), *layers[1].parameters()], torch.optim.SGD, lr=0.1, backend=backend)
    x, y = batch(device, 0)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    perturbed = [p.detach().clone() for p in model.parameters()]
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(RuntimeError, match=r"add_param_group\(\) between first_step\(\) and second_step\(\)"):
        opt.add_param_group({"params": layers[2].parameters()})
    assert [dict(g) for g in opt.param_groups] == groups and len(opt.param_groups) == 1
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), perturbed, strict=True))
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)  # the step finishes as if nothing had been asked
    opt.add_param_group({"params": layers[2].parameters()})  # and then the group is welcome
    manual_step(model, opt, *batch(device, 1))
    assert len(opt.param_groups) == 2


def test_empty_param_group_is_accepted(device):
    model = make_model(device)
    opt = SAM([{"params": []}, {"params": model.parameters()}], lr=0.1)
    manual_step(model, opt, *batch(device, 0))
    opt.add_param_group({"params": []})
    manual_step(model, opt, *batch(device, 1))


# ---------------------------------------------------------------------------- bad input
def test_constructor_errors_name_the_problem(device):
    params = list(make_model(device).parameters())
    with pytest.raises(ValueError, match="rho"):
        SAM(params, rho=-0.1)
    with pytest.raises(ValueError, match="eta"):
        SAM(params, adaptive=True, eta=-1.0)
    with pytest.raises(TypeError, match="class"):
        SAM(params, torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="variant"):
        SAM(params, variant="nope")
    with pytest.raises(ValueError, match="backend"):
        SAM(params, backend="cuda-magic")
    with pytest.raises(TypeError, match="floating-point"):
        SAM([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="several devices"):
        SAM([torch.zeros(3, device=device), torch.zeros(3, device="meta")])
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": params, "rho": -1.0}])


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_steps_leave_everything_as_it_was(device, backend):
    model = make_model(device)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    manual_step(model, opt, *batch(device, 0))  # state exists now
    snap = snapshot(model, opt)

    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    assert_unchanged(model, opt, snap)

    opt.param_groups[0]["rho"] = -0.5  # e.g. a broken schedule
    loss_of(model, *batch(device, 1)).backward()
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()
    assert_unchanged(model, opt, snap)
    opt.param_groups[0]["rho"] = 0.05

    first = next(model.parameters())
    first.grad = torch.sparse_coo_tensor(
        torch.zeros(2, 1, dtype=torch.long), torch.ones(1), first.shape, device=device, check_invariants=True
    )
    with pytest.raises(ValueError, match="sparse"):
        opt.first_step()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_twice_is_refused(device, backend):
    model = make_model(device)
    opt = SAM(model.parameters(), lr=0.1, backend=backend)
    loss_of(model, *batch(device, 0)).backward()
    opt.first_step()
    perturbed = flat_params(model)
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    assert torch.equal(flat_params(model), perturbed)
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()


# ---------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("bad_pass", [1, 2])
def test_nonfinite_gradient_skips_the_whole_step(device, backend, base, bad_pass):
    cls, kw = BASES[base]
    model = make_model(device)
    opt = SAM(model.parameters(), cls, rho=0.05, backend=backend, **kw)
    manual_step(model, opt, *batch(device, 0))
    snap = snapshot(model, opt)
    x, y = batch(device, 1)
    loss_of(model, x, y).backward()
    first = next(model.parameters())
    if bad_pass == 1:
        first.grad[0, 0] = float("nan")
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    if bad_pass == 2:
        first.grad[1, 0] = float("inf")
    opt.second_step(zero_grad=True)
    assert_unchanged(model, opt, snap)
    assert int(opt.skipped_steps) == 1
    manual_step(model, opt, *batch(device, 2))  # training goes on afterwards
    assert int(opt.skipped_steps) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_nonfinite_false_lets_nan_through(device, backend):
    model = make_model(device)
    opt = SAM(model.parameters(), lr=0.1, backend=backend, skip_nonfinite=False)
    x, y = batch(device, 0)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.second_step()
    assert torch.isnan(next(model.parameters())).any()


# ---------------------------------------------------------------------------- layout
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_model_keeps_working(device, backend, tmp_path):
    model = make_model(device)
    expected = copy.deepcopy(model)
    params = list(model.parameters())
    before = [p.untyped_storage() for p in params]
    opt = SAM(model.parameters(), lr=0.1, backend=backend)
    # every parameter keeps its own storage (tests/test_storage.py checks this in depth)
    assert all(p.untyped_storage().data_ptr() == s.data_ptr() for p, s in zip(params, before))
    for p, q in zip(params, expected.parameters(), strict=True):
        assert torch.equal(p, q)
    # the module API still works on the views
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(model, tmp_path / "model.pt")
    manual_step(model, opt, *batch(device, 0))
    model.load_state_dict(sd)
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q)
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for p, q in zip(loaded.parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q)
    # gradients are views of the bucket's flat gradient buffer after the first step
    grads = {p.grad.untyped_storage().data_ptr() for p in params}
    assert len(grads) == 1
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)


@NEEDS_TRITON
def test_extra_memory_is_one_backup(device):
    """Besides SGD's momentum (which torch.optim.SGD keeps too) and the gathered gradients
    (which autograd would allocate anyway), SAM keeps one backup of the weights."""
    model = make_model(device)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="triton")
    manual_step(model, opt, *batch(device, 0))
    storage = opt._engine.buckets[0].storage
    assert set(storage.buffers) == {"momentum_buffer", "backup", "grad"}
    padded = storage.total
    assert all(buf.numel() == padded for buf in storage.buffers.values())
    real = sum(p.numel() for p in model.parameters())
    assert real <= padded < real + 16 * len(list(model.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_set_to_none_between_steps(device, backend):
    """model.zero_grad() drops the gradient views; the next step gathers them again."""
    models = [make_model(device), make_model(device)]
    opts = [SAM(m.parameters(), lr=0.1, momentum=0.9, backend=backend) for m in models]
    for step in range(3):
        x, y = batch(device, step)
        for m, o in zip(models, opts, strict=True):
            loss_of(m, x, y).backward()
            o.first_step()
            (m.zero_grad() if m is models[0] else o.zero_grad())
            loss_of(m, x, y).backward()
            o.second_step()
            (m.zero_grad() if m is models[0] else o.zero_grad())
    assert torch.equal(flat_params(models[0]), flat_params(models[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_without_gradient_is_left_alone(device, backend):
    model = make_model(device)
    head = model[4]
    opt = SAM(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, backend=backend)
    head.weight.requires_grad_(False)
    before = head.weight.detach().clone()
    for step in range(2):
        manual_step(model, opt, *batch(device, step))
    assert head.weight.grad is None
    assert torch.equal(head.weight.detach(), before)
    assert "momentum_buffer" not in opt.state[head.weight]
    head.weight.requires_grad_(True)  # unfrozen later: it must start training
    manual_step(model, opt, *batch(device, 5))
    assert not torch.equal(head.weight.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_equals_the_full_batch(device, backend):
    models = [make_model(device), make_model(device)]
    opts = [SAM(m.parameters(), lr=0.1, backend=backend) for m in models]
    x, y = batch(device, 0)
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]
    for m, o in zip(models, opts, strict=True):
        for pass_ in range(2):
            if m is models[0]:
                loss_of(m, x, y).backward()
            else:
                for hx, hy in halves:
                    (loss_of(m, hx, hy) / 2).backward()
            (o.first_step if pass_ == 0 else o.second_step)(zero_grad=True)
    torch.testing.assert_close(flat_params(models[0]), flat_params(models[1]), rtol=1e-5, atol=1e-6)


def test_generic_base_optimizer_matches_its_own_step(device):
    """RMSprop is not fused: SAM restores, then calls RMSprop.step() on the second gradient."""
    model = make_model(device)
    twin = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.RMSprop, rho=0.05, lr=1e-2)
    rms = torch.optim.RMSprop(twin.parameters(), lr=1e-2)
    for step in range(3):
        x, y = batch(device, step)
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        second_grads = [p.grad.clone() for p in model.parameters()]
        opt.second_step(zero_grad=True)
        for p, g in zip(twin.parameters(), second_grads, strict=True):
            p.grad = g
        rms.step()
    torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=0, atol=0)


def test_backend_environment_override(device, monkeypatch):
    monkeypatch.setenv("SAM_FUSED_BACKEND", "reference")
    opt = SAM(make_model(device).parameters(), lr=0.1)
    assert set(opt.backends) == {"reference"}
    monkeypatch.setenv("SAM_FUSED_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SAM_FUSED_BACKEND"):
        SAM(make_model(device).parameters(), lr=0.1)


def _cpu_auto_backend() -> str:
    """What backend="auto" gives float CPU tensors: the C++ backend when it is available."""
    from sam_fused import available_backends

    return "cpp" if available_backends()["cpp"] else "foreach"


def test_auto_backend_for_cpu_tensors_is_cpp_when_available():
    opt = SAM(make_model("cpu").parameters(), lr=0.1)
    assert opt.backends == [_cpu_auto_backend()]


def test_triton_backend_refuses_float64(device):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    model = make_model(device, torch.float64)
    with pytest.raises(ValueError, match="float64"):
        SAM(model.parameters(), backend="triton")
    # auto: the C++ backend on the CPU (it takes float64), foreach on CUDA
    expected = _cpu_auto_backend() if device == "cpu" else "foreach"
    assert SAM(model.parameters(), backend="auto").backends == [expected]


def test_package_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, sam_fused\n"
        "m = torch.nn.Linear(3, 1); o = sam_fused.SAM(m.parameters(), lr=0.1)\n"
        "m(torch.randn(4, 3)).sum().backward(); o.first_step(True)\n"
        "m(torch.randn(4, 3)).sum().backward(); o.second_step()\n"
        "print(o.backends)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"['{_cpu_auto_backend()}']"


@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_state_reuses_the_plan(device, backend, monkeypatch):
    """With SAM.zero_grad() the per-parameter walk runs only while the layout settles."""
    from sam_fused.layout import Bucket

    calls = []
    original = Bucket._rebuild_plan
    monkeypatch.setattr(Bucket, "_rebuild_plan", lambda self: calls.append(1) or original(self))
    model = make_model(device)
    opt = SAM(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
    for step in range(6):
        manual_step(model, opt, *batch(device, step))
    assert 1 <= len(calls) <= 2, f"the plan was rebuilt {len(calls)} times in 6 steps"
    settled = len(calls)
    model.zero_grad()  # drops the gradient views: the next step must notice and gather
    manual_step(model, opt, *batch(device, 6))
    assert len(calls) == settled + 1
    manual_step(model, opt, *batch(device, 7))
    assert len(calls) == settled + 1
