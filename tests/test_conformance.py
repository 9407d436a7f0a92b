"""Conformance with torch.optim, in the spirit of PyTorch's own generic optimizer tests.

The configurations and the bad inputs come from torch's ``OptimizerInfo`` machinery
(``torch.testing._internal.common_optimizers``, shipped with torch) for SGD and AdamW; SAM
wraps each. Every check compares with what ``torch.optim`` does with the same calls:
checkpoints (determinism, named and unnamed cross-loading, ``weights_only``), copies, every
hook, complex parameters against their real views, non-contiguous parameters, tensor
learning rates of 0, 1 and 2 dimensions, steps that must change nothing, printing.

What cannot conform by design (docs/design.md): duplicate parameters in a group are refused
where torch warns (the flat buffers hold each parameter once), and ``step()`` without a
closure runs no pass of its own (SAM needs two).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from conftest import ALL_BACKENDS
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
