"""Parameters keep their own storage: what that rule promises, on every backend.

SAM never re-points ``p.data``: each parameter keeps the memory it had, as with any
``torch.optim`` optimizer (``sam_fused/placement.py``, ``docs/design.md``). The kernels reach
parameters through tables of their addresses, so the optimizer must also follow parameters
whose memory moves (``model.share_memory()``, ``p.data = ...``), restore parameters that
share memory exactly, and convert its state when the model is cast. Every numerical check
compares with an independent run: a twin model that nothing moved, a fresh optimizer that
loaded the state, or a float64 computation of the step written here.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from _helpers import regression_batch
from conftest import ALL_BACKENDS, DEVICE, FUSED_BACKENDS, supports

from sam_fused import SAM
from sam_fused.addresses import ParamAddresses
from sam_fused.placement import LayoutError, alias_layers, memory_span

BACKEND_PARAMS = [pytest.param(name, id=name) for name in ALL_BACKENDS]


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Awkward sizes: 1, 7, 4097 elements, and an empty bias."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(7, 1),  # a one-element bias
        torch.nn.Tanh(),
        torch.nn.Linear(1, 4097 // 17 + 1),
        torch.nn.Tanh(),
        torch.nn.Linear(4097 // 17 + 1, 7),
    )
    model.append(torch.nn.Linear(7, 0))  # an empty weight and bias: numel 0
    return model.to(device=DEVICE, dtype=dtype)


def batch(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return regression_batch(seed, 16, 7, 7, DEVICE, dtype)


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model[:5](x)
    return F.mse_loss(out, y) + model[5](out).sum()


def step(model: torch.nn.Module, opt: SAM, seed: int, dtype: torch.dtype = torch.float32) -> None:
    x, y = batch(seed, dtype)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)


def build(model: torch.nn.Module, backend: str, **kw) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=backend, **kw)


def assert_same(model_a, opt_a, model_b, opt_b) -> None:
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach())
        assert set(opt_a.state[p]) == set(opt_b.state[q])
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    return params, grads, state


def assert_unchanged(model, opt, snap) -> None:
    params, grads, state = snap
    for p, before, grad, entry in zip(model.parameters(), params, grads, state, strict=True):
        assert torch.equal(p.detach(), before)
        assert (p.grad is None) == (grad is None) and (grad is None or torch.equal(p.grad, grad))
        assert set(opt.state[p]) == set(entry)
        for key, value in entry.items():
            assert torch.equal(opt.state[p][key], value), key


# ---------------------------------------------------------------------- own storage
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_parameters_keep_their_own_storage(backend):
    model = make_model()
    before = [(p.untyped_storage().data_ptr(), p.data_ptr(), p.stride()) for p in model.parameters()]
    opt = build(model, backend)
    for seed in range(3):
        after = [(p.untyped_storage().data_ptr(), p.data_ptr(), p.stride()) for p in model.parameters()]
        assert after == before
        step(model, opt, seed)
    storages = [p.untyped_storage().data_ptr() for p in model.parameters() if p.numel()]
    assert len(set(storages)) == len(storages), "two parameters share a storage"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_one_layer_saves_only_itself(backend):
    """torch.save writes a tensor's whole storage: one layer's state_dict is that layer alone."""
    model = make_model()
    opt = build(model, backend)
    step(model, opt, 0)

    def saved_bytes(state: dict) -> int:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.tell()

    layer = model[2]
    alone = copy.deepcopy(layer)  # the same layer, in storages of its own
    assert saved_bytes(layer.state_dict()) == saved_bytes(alone.state_dict())


# ---------------------------------------------------------------------- memory that moves
def _twins(backend: str):
    models = [make_model(), make_model()]
    opts = [build(m, backend) for m in models]
    for m, o in zip(models, opts):
        step(m, o, 0)
    return models, opts


@pytest.mark.skipif(DEVICE != "cpu", reason="share_memory() moves CPU tensors to shared memory")
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_share_memory_after_building_is_followed(backend):
    (moved, twin), (opt, twin_opt) = _twins(backend)
    moved.share_memory()  # every storage moves to shared memory, in place
    assert all(p.is_shared() for p in moved.parameters())
    for seed in (1, 2):
        step(moved, opt, seed)
        step(twin, twin_opt, seed)
        assert_same(moved, opt, twin, twin_opt)
    assert all(p.is_shared() for p in moved.parameters()), "the parameters must stay shared"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_replaced_parameter_data_is_followed(backend):
    (moved, twin), (opt, twin_opt) = _twins(backend)
    for p in moved.parameters():
        p.data = p.data.clone()  # a new storage, same shape, dtype, device and strides
    new = [p.data_ptr() for p in moved.parameters()]
    for seed in (1, 2):
        step(moved, opt, seed)
        step(twin, twin_opt, seed)
        assert_same(moved, opt, twin, twin_opt)
    assert [p.data_ptr() for p in moved.parameters()] == new


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_data_replaced_between_the_passes_is_followed(backend):
    """A parameter moved while the weights are perturbed is restored where it went."""
    (moved, twin), (opt, twin_opt) = _twins(backend)
    for m, o in ((moved, opt), (twin, twin_opt)):
        x, y = batch(1)
        loss_of(m, x, y).backward()
        o.first_step(zero_grad=True)
        if m is moved:
            for p in m.parameters():
                p.data = p.data.clone()
        loss_of(m, x, y).backward()
        o.second_step(zero_grad=True)
    assert_same(moved, opt, twin, twin_opt)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_cast_after_building_converts_the_state_as_load_state_dict_does(backend):
    dtype = torch.float16
    if not supports(backend, "sam", dtype):
        pytest.skip(f"{backend} declares no float16 here")
    model = make_model()
    opt = build(model, backend)
    step(model, opt, 0)
    saved = copy.deepcopy(opt.state_dict())
    model.to(dtype)  # every p.data becomes a new float16 tensor
    twin = copy.deepcopy(model)
    twin_opt = build(twin, backend)
    twin_opt.load_state_dict(saved)  # torch.optim's conversion: state cast to the parameter's dtype
    for seed in (1, 2):
        step(model, opt, seed, dtype)
        step(twin, twin_opt, seed, dtype)
        assert_same(model, opt, twin, twin_opt)
    assert opt.backends == twin_opt.backends


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if not supports(b, "sam", torch.float64)])
def test_cast_the_backend_cannot_run_is_refused_with_nothing_changed(backend):
    model = make_model()
    opt = build(model, backend)
    step(model, opt, 0)
    model.double()
    x, y = batch(1, torch.float64)
    loss_of(model, x, y).backward()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=f"the {backend} backend cannot run these parameters"):
        opt.first_step()
    assert_unchanged(model, opt, snap)
    assert opt.backends == [backend]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_new_shape_is_refused_with_nothing_changed(backend):
    model = make_model()
    opt = build(model, backend)
    step(model, opt, 0)
    model[0].weight.data = torch.zeros(2, 7, device=DEVICE)
    snap = snapshot(model, opt)
    with pytest.raises(LayoutError, match="cannot follow a new shape"):
        opt.first_step()
    assert_unchanged(model, opt, snap)


# ---------------------------------------------------------------------- shared memory
class Tied(torch.nn.Module):
    """An autoencoder whose decoder weight is the encoder's memory, tied the old way
    (``dec.weight.data = enc.weight.data``): two Parameters over one storage ("same"), the
    decoder's the transpose ("transposed"), or a third layer over the same memory too ("three")."""

    def __init__(self, ties: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        transposed = ties == "transposed"
        width = 5 if transposed else 6
        self.enc = torch.nn.Linear(6, width, bias=False)
        self.mid = torch.nn.Linear(width, width)
        self.dec = torch.nn.Linear(width, 6, bias=False)
        self.dec.weight.data = self.enc.weight.data.t() if transposed else self.enc.weight.data
        self.third = torch.nn.Linear(6, 6, bias=False) if ties == "three" else None
        if self.third is not None:
            self.third.weight.data = self.enc.weight.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dec(torch.tanh(self.mid(torch.tanh(self.enc(x)))))
        return out if self.third is None else self.third(torch.sin(out))


def tied_step(model: Tied, opt: SAM, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g).to(DEVICE)
    for _ in range(2):
        F.mse_loss(model(x), x).backward()
        if opt.perturbed:
            opt.second_step(zero_grad=True)
        else:
            opt.first_step(zero_grad=True)


TIES = ["same", "transposed", "three"]
# fused updates, and RMSprop: the base optimizer's own step() after a separate restore
TIED_BASES = {
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
}


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("base", sorted(TIED_BASES))
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_tied_weights_stay_put_at_lr_zero(backend, base, ties):
    """Every memory location gets back the value it had before the step: with lr = 0 nothing
    moves, bit for bit, however many parameters share it."""
    model = Tied(ties).to(DEVICE)
    before = [p.detach().clone() for p in model.parameters()]
    cls, kw = TIED_BASES[base]
    opt = SAM(model.parameters(), cls, rho=0.2, lr=0.0, backend=backend, **kw)
    for seed in range(3):
        tied_step(model, opt, seed)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    assert model.dec.weight.data_ptr() == model.enc.weight.data_ptr()


def sam_step_in_float64(model: Tied, x: torch.Tensor, rho: float, lr: float) -> dict[str, torch.Tensor]:
    """The documented step for parameters that share memory, from autograd in float64: the
    norm counts each parameter's gradient, each alias adds its own perturbation to the
    shared memory, the memory gets back its value, and each alias's SGD update applies to it
    in turn (as torch.optim applies each parameter's update)."""
    transposed = model.dec.weight.shape != model.enc.weight.shape
    assert model.third is None
    shared = model.enc.weight.detach().double()
    mid_w, mid_b = model.mid.weight.detach().double(), model.mid.bias.detach().double()
    x = x.double()

    def grads(w: torch.Tensor, mw: torch.Tensor, mb: torch.Tensor):
        leaves = [t.clone().requires_grad_() for t in (w, w.t() if transposed else w, mw, mb)]
        enc_w, dec_w, m_w, m_b = leaves
        h = torch.tanh(torch.tanh(x @ enc_w.t()) @ m_w.t() + m_b)
        F.mse_loss(h @ dec_w.t(), x).backward()
        return [t.grad for t in leaves]

    g_enc, g_dec, g_mw, g_mb = grads(shared, mid_w, mid_b)
    norm = torch.sqrt(sum((g * g).sum() for g in (g_enc, g_dec, g_mw, g_mb)))
    g_dec_mem = g_dec.t() if transposed else g_dec  # the decoder's gradient laid over the memory
    eps = [rho * g / norm for g in (g_enc, g_dec_mem, g_mw, g_mb)]
    h_enc, h_dec, h_mw, h_mb = grads(shared + eps[0] + eps[1], mid_w + eps[2], mid_b + eps[3])
    h_dec_mem = h_dec.t() if transposed else h_dec
    return {
        "shared": shared - lr * h_enc - lr * h_dec_mem,
        "mid.weight": mid_w - lr * h_mw,
        "mid.bias": mid_b - lr * h_mb,
    }


@pytest.mark.parametrize("ties", ["same", "transposed"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_tied_weights_take_the_documented_step(backend, ties):
    model = Tied(ties).to(DEVICE)
    rho, lr = 0.3, 0.5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g).to(DEVICE)
    expected = sam_step_in_float64(model, x.cpu(), rho, lr)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, backend=backend)
    F.mse_loss(model(x), x).backward()
    opt.first_step(zero_grad=True)
    F.mse_loss(model(x), x).backward()
    opt.second_step(zero_grad=True)
    got = {"shared": model.enc.weight, "mid.weight": model.mid.weight, "mid.bias": model.mid.bias}
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach().cpu().double(), value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_overlapping_views_in_two_groups_restore_exactly(backend):
    """Two Parameters over overlapping slices of one tensor, in different param groups."""
    base = torch.randn(4097, device=DEVICE)
    original = base.clone()
    first = torch.nn.Parameter(base[:3000])
    second = torch.nn.Parameter(base[1000:])  # overlaps first over [1000, 3000)
    opt = SAM(
        [{"params": [first]}, {"params": [second], "rho": 0.5}],
        torch.optim.SGD,
        rho=0.2,
        lr=0.0,
        backend=backend,
    )
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        target = torch.randn(4097, generator=g).to(DEVICE)
        for _ in range(2):
            ((first - target[:3000]) ** 2).sum().backward()
            ((second * target[1000:]).sin()).sum().backward()
            if opt.perturbed:
                opt.second_step(zero_grad=True)
            else:
                opt.first_step(zero_grad=True)
    assert torch.equal(base, original)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_weights_tied_after_building_are_laid_out_again(backend):
    model = Tied("same").to(DEVICE)
    model.dec.weight.data = model.dec.weight.data.clone()  # untied when the optimizer is built
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.0, momentum=0.9, backend=backend)
    tied_step(model, opt, 0)
    model.dec.weight.data = model.enc.weight.data  # tied afterwards
    before = [p.detach().clone() for p in model.parameters()]
    for seed in (1, 2):
        tied_step(model, opt, seed)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)


# ---------------------------------------------------------------------- the machinery
def test_alias_layers_separate_every_overlap():
    """Against the definition, brute force: overlapping spans get different layers, each the
    lowest one no overlapping earlier span holds."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        starts = torch.randint(0, 60, (n,), generator=gen).tolist()
        lengths = torch.randint(0, 15, (n,), generator=gen).tolist()
        spans = [(s, s + n) for s, n in zip(starts, lengths)]
        layers = alias_layers(spans)

        def overlap(a, b):
            return a[1] > a[0] and b[1] > b[0] and a[0] < b[1] and b[0] < a[1]

        for i, span in enumerate(spans):
            taken = {layers[j] for j in range(i) if overlap(spans[j], span)}
            assert layers[i] == min(set(range(len(taken) + 1)) - taken)


def test_memory_span_is_from_the_first_to_the_last_element():
    base = torch.zeros(10, 12)
    for view in (base, base[2:5], base[:, 3:7], base.t(), base[1:, ::2], base[3:3]):
        start, stop = memory_span(view)
        if not view.numel():
            assert start == stop
            continue
        offsets = [
            sum(i * s for i, s in zip(index, view.stride()))
            for index in itertools.product(*map(range, view.shape))
        ]
        assert start == view.data_ptr() + min(offsets) * view.element_size()
        assert stop == view.data_ptr() + (max(offsets) + 1) * view.element_size()


@pytest.mark.skipif("cpp" not in FUSED_BACKENDS, reason="the C++ CPU library is not built here")
def test_native_and_python_address_checks_agree():
    from sam_fused.backends import get_backend

    get_backend("cpp")  # loads the library, and with it the native check
    params = [torch.nn.Parameter(torch.randn(n)) for n in (1, 7, 4097, 0)]
    native, python = ParamAddresses(params, False), ParamAddresses(params, False)
    python_only = lambda: python.now() == python.recorded
    for watch in (native, python):
        watch.record(watch.now())
    assert native.intact() and python_only()
    params[2].data = params[2].data.clone()
    assert not native.intact() and not python_only()
    for watch in (native, python):
        watch.record(watch.now())
    assert native.intact() and python_only()
    params[1].share_memory_()
    assert not native.intact() and not python_only()
