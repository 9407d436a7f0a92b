"""Conformance with torch.optim: the points of PyTorch's own ``TestOptimRenewed``, as SAM runs them.

The configurations and the bad inputs come from torch's ``OptimizerInfo`` machinery
(``torch.testing._internal.common_optimizers``, shipped with torch) for SGD and AdamW; SAM
wraps each. Every check compares with what ``torch.optim`` does with the same calls, or
with the textbook step in float64. Here, the conformance points one by one:
``step(closure)`` after torch's patterns that leave gradients behind (an earlier
``closure()``, gradients set by hand, closures that zero, replace or run no backward) and
the refusal of the migrated loop; ``opt.state`` entries under any key (a state_dict
pre-hook's, a user's) through save and load; load pre-hook changes kept; checkpoints
deterministic across named and unnamed parameters; torch's
``test_param_group_with_lrscheduler_goes_right_direction``, ``test_load_nontensor_step`` and
``test_non_empty_state``; and the checkpoint round trips and hooks around them.
tests/test_conformance_generic.py holds the rest (configurations, copies, step hooks,
complex parameters, printing).

What cannot conform by design (docs/torch-optim.md): duplicate parameters in a group are
refused where torch warns (the flat buffers hold each parameter once), ``step()`` without a
closure runs no pass of its own (SAM needs two), and ``step(closure)`` writes the gradients
(zeroed between its passes; the second pass's afterwards), which torch.optim never does.
"""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import pytest
import torch
from conftest import ALL_BACKENDS
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.testing._internal import common_optimizers
from torch.testing._internal.common_optimizers import OptimizerErrorEnum as When
from torch.testing._internal.common_optimizers import (
    optim_error_inputs_func_adamw,
    optim_error_inputs_func_sgd,
    optim_inputs_func_adamw,
    optim_inputs_func_sgd,
)

from sam_fused import SAM

BASES = {"SGD": (torch.optim.SGD, optim_inputs_func_sgd, optim_error_inputs_func_sgd)}
BASES["AdamW"] = (torch.optim.AdamW, optim_inputs_func_adamw, optim_error_inputs_func_adamw)
UNSUPPORTED_KWARGS = ("fused", "foreach", "capturable", "differentiable")  # torch's implementation flags


def configs(base: str, device: str = "cpu") -> list:
    """torch's configurations of ``base`` (minus its implementation flags, which SAM's kernels
    replace: they change how torch computes, not what)."""
    _, inputs, _ = BASES[base]
    out = []
    for given in inputs(device, torch.float32):
        kwargs = {k: v for k, v in given.kwargs.items() if k not in UNSUPPORTED_KWARGS}
        if any(isinstance(v, torch.Tensor) and v.numel() > 1 for v in kwargs.values()):
            continue
        out.append(pytest.param(base, kwargs, id=f"{base}-{given.desc.replace(' ', '_')}"))
    return out


CONFIGS = [c for base in BASES for c in configs(base)]


def model_params(device: str, seed: int = 0, contiguous: bool = True) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    weight = torch.randn(5, 3, device=device) if contiguous else torch.randn(3, 5, device=device).t()
    bias = torch.randn(5, device=device)
    return [torch.nn.Parameter(weight), torch.nn.Parameter(bias)]


def loss_of(params, x):
    weight, bias = params
    return torch.tanh(x @ weight.t() + bias).square().sum()


def sam_step(opt, params, x) -> torch.Tensor:
    def closure():
        opt.zero_grad()
        loss = loss_of(params, x)
        loss.backward()
        return loss

    return opt.step(closure)


def bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------------- bad inputs, in torch's order
@pytest.mark.parametrize("base", sorted(BASES))
def test_bad_inputs_get_the_base_optimizers_errors(base, device):
    """With torch's own bad-input cases, SAM raises what the base optimizer raises, naming the
    value (the base optimizer checks its options before SAM checks its own)."""
    cls, _, errors = BASES[base]
    for case in errors(device, torch.float32):
        given = case.optimizer_error_input
        params = given.params if given.params is not None else model_params(device)
        if case.error_on != When.CONSTRUCTION_ERROR:
            continue
        if case.error_type is UserWarning:  # duplicate parameters in a group: refused, not warned
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(ValueError, match="appears twice"):
                    SAM(params, cls, **given.kwargs)
            continue
        with pytest.raises(case.error_type, match=case.error_regex):
            SAM(params, cls, **given.kwargs)


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("base,kwargs", CONFIGS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_state_dict_is_deterministic_and_round_trips(base, kwargs, backend, device):
    cls = BASES[base][0]
    params = model_params(device)
    opt = SAM(params, cls, backend=backend, **copy.deepcopy(kwargs))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)).to(device)
    sam_step(opt, params, x)
    first, second = opt.state_dict(), opt.state_dict()
    assert _flat(first) == _flat(second)
    buffer = io.BytesIO()
    torch.save(first, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # nothing but tensors and plain types
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = SAM(twin_params, cls, backend=backend, **copy.deepcopy(kwargs))
    twin.load_state_dict(loaded)
    assert _flat(twin.state_dict()) == _flat(first)
    sam_step(opt, params, x)
    sam_step(twin, twin_params, x)
    assert [bits(p) for p in params] == [bits(p) for p in twin_params]


def _flat(state: dict) -> list:
    """A state dict as comparable values (tensors by their bytes)."""
    out = []

    def walk(value, path):
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(value[k], (*path, k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, (*path, i))
        elif isinstance(value, torch.Tensor):
            out.append((path, str(value.dtype), tuple(value.shape), bits(value)))
        else:
            out.append((path, value))

    walk(state, ())
    return out


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_named_parameters_and_cross_loading(backend, device):
    """SAM(model.named_parameters()) keeps param_names in the groups and the checkpoint;
    named and unnamed checkpoints load into each other as torch.optim's do."""
    model = torch.nn.Linear(3, 5).to(device)
    named = SAM(model.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    assert named.param_groups[0]["param_names"] == ["weight", "bias"]
    x = torch.randn(8, 3, device=device)
    sam_step(named, list(model.parameters()), x)
    saved = named.state_dict()
    assert saved["param_groups"][0]["param_names"] == ["weight", "bias"]
    reference = torch.optim.SGD(torch.nn.Linear(3, 5).named_parameters(), lr=0.1)
    assert reference.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]

    plain_model = copy.deepcopy(model)
    plain = SAM(plain_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    plain.load_state_dict(saved)  # named into unnamed: the names come along (torch's rule)
    assert plain.param_groups[0]["param_names"] == ["weight", "bias"]
    unnamed = SAM(copy.deepcopy(model).parameters(), torch.optim.SGD, lr=0.1, momentum=0.9).state_dict()
    named.load_state_dict(unnamed)  # unnamed into named: the names stay
    assert named.param_groups[0]["param_names"] == ["weight", "bias"]
    with pytest.raises(ValueError, match="with/without names"):
        SAM([("weight", model.weight), model.bias], lr=0.1)


# ---------------------------------------------------------------------- state_dict and load hooks
def test_state_dict_and_load_hooks_fire(device):
    params = model_params(device)
    opt = SAM(params, torch.optim.SGD, lr=0.01, momentum=0.9)
    sam_step(opt, params, torch.randn(8, 3, device=device))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post") or {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: calls.append("load-pre") or {k: v for k, v in sd.items() if k != "extra"}
    )
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    saved = opt.state_dict()
    assert saved["extra"] == 1
    opt.load_state_dict(saved)
    assert calls == ["sd-pre", "sd-post", "load-pre", "load-post"]


# ---------------------------------------------------------------------- step(closure) with leftover gradients
def textbook_gradients(params, x, rho):
    """Float64, by autograd: g at w, and g_p at w + rho g / ||g|| (the textbook perturbation)."""
    w = [p.detach().double().clone().requires_grad_() for p in params]
    g = torch.autograd.grad(loss_of(w, x.double()), w)
    norm = torch.sqrt(sum(gi.square().sum() for gi in g))
    perturbed = [(wi + rho * gi / (norm + 1e-12)).detach().requires_grad_() for wi, gi in zip(w, g)]
    return g, torch.autograd.grad(loss_of(perturbed, x.double()), perturbed), [t.detach() for t in perturbed]


LEFTOVER_PATTERNS = ["closure_before", "model_zero_grad", "set_to_none", "replaces_grads", "no_backward"]


@pytest.mark.parametrize("pattern", [*LEFTOVER_PATTERNS, "migrated"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_step_closure_with_leftover_gradients(pattern, backend, device):
    """torch.optim's tests leave gradients before step(closure) (``initial = closure()``, or
    gradients set by hand); where the closure clears them (opt.zero_grad(), as Module.zero_grad()
    does, set to None, replaced) or runs no backward, the step is SAM's textbook step: the
    second pass at w + rho g/||g|| (g the leftover gradient when the closure runs no backward),
    then SGD from w with that pass's gradient, which p.grad holds afterwards (a documented
    difference: torch.optim leaves the gradient at w). The popular file's loop, whose closure
    adds onto the leftovers, is refused with parameters and gradients unchanged."""
    params = model_params(device)
    rho, lr = 0.05, 0.1
    opt = SAM(params, torch.optim.SGD, rho=rho, lr=lr, backend=backend)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(3)).to(device)
    w = [p.detach().double().cpu().clone() for p in params]
    g, g_p, w_p = textbook_gradients(params, x.cpu(), rho)
    given, seen = iter([g, g_p]), []

    def closure():
        seen.append([p.detach().double().cpu().clone() for p in params])
        if pattern == "replaces_grads":  # torch's test_complex: the closure sets the gradients
            for p, gi in zip(params, next(given)):
                p.grad = gi.float().to(device)
            return loss_of(params, x).detach()
        if pattern == "no_backward":  # torch's test_non_empty_state, test_load_nontensor_step
            return loss_of(params, x).detach()
        if pattern == "model_zero_grad":
            for p in params:
                p.grad = None
        elif pattern == "set_to_none":
            opt.zero_grad(set_to_none=True)
        elif pattern == "closure_before":
            opt.zero_grad()
        loss = loss_of(params, x)
        loss.backward()
        return loss

    if pattern == "closure_before":
        closure()  # initial_value = closure().item(): leaves this batch's gradients
        seen.clear()
    elif pattern == "no_backward":
        for p, gi in zip(params, g):  # the leftover gradient is the first pass's
            p.grad = gi.float().to(device)
    else:
        loss_of(params, 3 * x).backward()  # another batch's gradients
    if pattern == "migrated":  # the closure does not zero: its backward would add to them
        before = [bits(p) for p in params] + [bits(p.grad) for p in params]
        with pytest.raises(RuntimeError, match="migrated"):
            opt.step(closure)
        assert [bits(p) for p in params] + [bits(p.grad) for p in params] == before
        assert len(opt.state) == 0 and not opt.perturbed
        return
    opt.step(closure)
    second = [torch.zeros_like(wi) for wi in w] if pattern == "no_backward" else g_p
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen[0], w, **tol)
    torch.testing.assert_close(seen[1], w_p, **tol)  # the second pass ran at w + eps
    torch.testing.assert_close(
        [p.detach().double().cpu() for p in params], [wi - lr * gi for wi, gi in zip(w, second)], **tol
    )
    torch.testing.assert_close([p.grad.double().cpu() for p in params], list(second), **tol)


# ---------------------------------------------------------------------- opt.state entries of any key
def _torch_and_sam(backend):
    """The same optimizer as torch.optim.SGD and as SAM around it (the operations under test
    run on both; torch.optim's result is the expected one)."""
    return {
        "torch": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "sam": lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend),
    }


def _foreign(state: dict) -> dict:
    return {k: v for k, v in state.items() if not isinstance(k, (int, torch.Tensor))}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_state_entries_under_any_key_are_kept_as_torch_optim_keeps_them(backend, device):
    """What a state_dict pre-hook or a user keeps in opt.state under its own key, and extra
    keys of a parameter's entry, are saved, survive torch.save/torch.load(weights_only=True)
    into a freshly built optimizer, and replace that optimizer's own; a missing key reads as
    a new {} (torch.optim's defaultdict)."""
    got = {}
    for name, make in _torch_and_sam(backend).items():
        params = model_params(device)
        opt = make(params)
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)).to(device)
        sam_step(opt, params, x) if name == "sam" else (loss_of(params, x).backward(), opt.step())
        opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("ran_pre_hook", 1))
        opt.state["config"] = {"note": "kept", "scale": torch.tensor([2.0, 3.0])}
        opt.state[params[0]]["ema"] = torch.full_like(params[0], 0.5)
        assert opt.state.get("absent") is None and "absent" not in opt.state  # dict.get makes none
        assert opt.state["absent"] == {} and "absent" in opt.state  # the defaultdict's [] does
        del opt.state["absent"]
        saved = opt.state_dict()
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        fresh_params = model_params(device, seed=1)
        fresh = make(fresh_params)
        fresh.state["dropped"] = True  # a load replaces the whole state, this entry included
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        got[name] = (_flat(_foreign(saved["state"])), _flat(_foreign(dict(fresh.state))))
        got[name + " entry"] = _flat({k: v for k, v in fresh.state[fresh_params[0]].items() if k == "ema"})
    assert got["sam"] == got["torch"] and got["sam entry"] == got["torch entry"]
    assert got["sam"][1] == _flat(
        {"ran_pre_hook": 1, "config": {"note": "kept", "scale": torch.tensor([2.0, 3.0])}}
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_checkpoint_keyed_by_names_loads_as_torch_optim_loads_it(backend, device):
    """torch.distributed.checkpoint hands load_state_dict groups that list parameter names, and
    state under those names: each entry goes to the parameter its group lists (torch.optim's
    rule), the others stay entries of their own."""
    torch_params = model_params(device)
    source = torch.optim.SGD(torch_params, lr=0.1, momentum=0.9)
    loss_of(torch_params, torch.randn(8, 3, device=device)).backward()
    source.step()
    saved = source.state_dict()
    names = {0: "0.weight", 1: "0.bias"}
    saved["state"] = {names[k]: v for k, v in saved["state"].items()} | {"note": 1}
    for group in saved["param_groups"]:
        group["params"] = [names[i] for i in group["params"]]
    loaded = {}
    for name, make in _torch_and_sam(backend).items():
        params = model_params(device, seed=1)
        opt = make(params)
        opt.load_state_dict(copy.deepcopy(saved))
        loaded[name] = ([bits(opt.state[p]["momentum_buffer"]) for p in params], _foreign(dict(opt.state)))
    assert loaded["sam"] == loaded["torch"] and loaded["sam"][1] == {"note": 1}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_load_state_dict_hooks_changes_are_kept(backend, device):
    """A load pre-hook that edits the checkpoint in place (an lr, a state tensor), one that
    returns a new checkpoint (prepended, so the in-place one edits its result), and a post
    hook that records in opt.state: the loaded optimizer is torch.optim's, bit for bit."""
    torch_params = model_params(device)
    source = torch.optim.SGD(torch_params, lr=0.1, momentum=0.9)
    loss_of(torch_params, torch.randn(8, 3, device=device)).backward()
    source.step()
    checkpoint = source.state_dict()  # a plain torch.optim checkpoint loads into SAM

    def edit_in_place(o, sd):
        sd["param_groups"][0]["lr"] = 0.002
        sd["state"][0]["momentum_buffer"] = sd["state"][0]["momentum_buffer"] * 2

    def replace(o, sd):
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.003
        sd["state"][1]["momentum_buffer"] = sd["state"][1]["momentum_buffer"] + 1
        return sd

    def record(o):
        o.state["lr_after_load"] = o.param_groups[0]["lr"]

    loaded = {}
    for name, make in _torch_and_sam(backend).items():
        opt = make(model_params(device, seed=1))
        opt.register_load_state_dict_pre_hook(edit_in_place)
        opt.register_load_state_dict_pre_hook(replace, prepend=True)
        opt.register_load_state_dict_post_hook(record)
        opt.load_state_dict(copy.deepcopy(checkpoint))
        params = opt.param_groups[0]["params"]
        loaded[name] = (
            opt.param_groups[0]["lr"],
            opt.state["lr_after_load"],
            [bits(opt.state[p]["momentum_buffer"]) for p in params],
        )
    assert loaded["sam"] == loaded["torch"] and loaded["sam"][0] == 0.002


# ---------------------------------------------------------------------- named parameters
@pytest.mark.parametrize("base", ["SGD", "AdamW"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_state_dict_is_deterministic_across_named_and_unnamed(base, backend, device):
    """torch's test_state_dict_deterministic: an optimizer built on equal (not identical)
    parameters, named or not, loads the other's checkpoint, then both step alike and save the
    same checkpoint (param_names aside); the names survive when either side had them."""
    cls = BASES[base][0]
    kw = {"lr": 1e-2, **({"momentum": 0.9} if base == "SGD" else {})}
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)).to(device)

    def named(ps, is_named):
        return [(f"name{i}", p) for i, p in enumerate(ps)] if is_named else ps

    def without_names(sd):
        sd = copy.deepcopy(sd)
        for group in sd["param_groups"]:
            group.pop("param_names", None)
        return _flat(sd)

    for named0, named1 in itertools.product([True, False], repeat=2):
        params = model_params(device)
        opt = SAM(named(params, named0), cls, backend=backend, **kw)
        for _ in range(10):
            sam_step(opt, params, x)
        twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        twin = SAM(named(twin_params, named1), cls, backend=backend, **kw)
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))
        for _ in range(10):
            sam_step(opt, params, x)
            sam_step(twin, twin_params, x)
            assert [bits(p) for p in params] == [bits(p) for p in twin_params]
        assert without_names(opt.state_dict()) == without_names(twin.state_dict())
        if named0 or named1:
            assert twin.state_dict()["param_groups"][0]["param_names"] == ["name0", "name1"]


# ---------------------------------------------------------------------- three of torch's tests
def _scheduled_run(loop: str, constructors: list, backend: str, device: str) -> tuple[float, float, list]:
    """torch's test_param_group_with_lrscheduler_goes_right_direction, through step(closure) or
    the manual loop: (loss before, loss after, the weights' bits)."""
    torch.manual_seed(0)
    weight, weight2 = (torch.nn.Parameter(torch.randn(10, 5, device=device)) for _ in range(2))
    x = torch.randn(5, device=device)
    opt = SAM([{"params": [weight]}, {"params": [weight2], "lr": 0.01}], backend=backend)
    scheds = [make(opt) for make in constructors]

    def loss():
        return (weight.mv(x) + weight2.mv(x)).pow(2).sum()

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    initial = closure().item()  # leaves gradients behind, as torch's test does
    for _ in range(20):
        if loop == "closure":
            value = opt.step(closure)
        else:
            value = closure()
            opt.first_step(zero_grad=True)
            loss().backward()
            opt.second_step()
        for sched in scheds:
            sched.step(value) if isinstance(sched, ReduceLROnPlateau) else sched.step()
    return initial, closure().item(), [bits(weight), bits(weight2)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_param_groups_with_lr_schedulers_go_the_right_direction(backend, device):
    """torch's scheduler combinations for SGD, two groups (one with its own lr), the loss
    evaluated by the closure before the first step: 20 steps lower it, and the run equals the
    manual loop (first_step/second_step) over the same batches, bit for bit."""
    schedulers = next(
        i for i in common_optimizers.optim_db if i.optim_cls is torch.optim.SGD
    ).scheduler_inputs
    for constructors in schedulers:
        before, after, weights = _scheduled_run("closure", constructors, backend, device)
        assert after < before
        assert weights == _scheduled_run("manual", constructors, backend, device)[2]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_checkpoint_with_a_number_for_step_loads(backend, device):
    """torch's test_load_nontensor_step: Adam's "step" saved as a Python number loads (into the
    device count), and the next step equals the one after loading the tensor checkpoint."""
    runs = []
    for as_number in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(2, 3, device=device)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        opt = SAM(params, torch.optim.AdamW, lr=1e-2, backend=backend)
        for _ in range(3):
            opt.step(lambda: torch.tensor(1.0))
        saved = copy.deepcopy(opt.state_dict())
        if as_number:
            for entry in saved["state"].values():
                entry["step"] = entry["step"].item()
        opt.load_state_dict(saved)
        assert all(torch.is_tensor(opt.state[p]["step"]) and float(opt.state[p]["step"]) == 3 for p in params)
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        opt.step(lambda: torch.tensor(1.0))
        runs.append([bits(p) for p in params] + [bits(v) for p in params for v in opt.state[p].values()])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_state_after_one_step_has_torch_optims_keys(backend, device):
    """torch's test_non_empty_state, for every configuration of torch's suite: after one step
    (gradients from a backward before it, a closure that runs none) every entry of opt.state
    holds torch.optim's keys for that configuration (none at all for SGD without momentum)."""
    for config in CONFIGS:
        base, kwargs = config.values
        cls = BASES[base][0]
        keys = {}
        for name in ("torch", "sam"):
            torch.manual_seed(0)
            model = torch.nn.Linear(5, 5, bias=False).to(device)
            given = copy.deepcopy(kwargs)
            opt = (
                cls(model.parameters(), **given)
                if name == "torch"
                else SAM(model.parameters(), cls, backend=backend, **given)
            )
            opt.zero_grad()
            model(torch.rand(2, 5, device=device)).sum().backward()
            opt.step() if name == "torch" else opt.step(lambda: 1.0)
            assert all(len(entry) > 0 for entry in opt.state.values())
            keys[name] = [sorted(opt.state[p]) for p in model.parameters() if p in opt.state]
        assert keys["sam"] == keys["torch"], config.id
