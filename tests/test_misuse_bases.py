"""Misuse around any base optimizer: copies, checkpoints of another base, hyperparameter tensors.

A copy, pickle or ``torch.save`` of a SAM around any ``torch.optim`` base works, not only
around SGD; a checkpoint saved by another base optimizer is refused when it is loaded,
naming both, with nothing changed; and an ``lr`` or ``betas``
tensor of several values set between the passes is refused before anything changes), on
every backend. The helpers and the base table are tests/test_misuse.py's.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import ALL_BACKENDS
from test_misuse import BASES, batch, build, loss_of, make_model, manual_step, snapshot, weights

from sam_fused import SAM


def _params(model: torch.nn.Module, base: str) -> list[torch.nn.Parameter]:
    params = list(model.parameters())
    return [p for p in params if p.ndim == 2] if base == "Muon" else params  # Muon: matrices only


def _copy(objects: tuple, how: str) -> tuple:
    if how == "deepcopy":
        return copy.deepcopy(objects)
    buffer = io.BytesIO()
    if how == "pickle":
        pickle.dump(objects, buffer)
        return pickle.loads(buffer.getvalue())
    torch.save(objects, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _flat_state(opt: SAM) -> list:
    saved = opt.state_dict()
    return [
        (i, k, v.detach().cpu().clone() if torch.is_tensor(v) else v)
        for i, entry in sorted(saved["state"].items())
        for k, v in sorted(entry.items())
    ]


# ---------------------------------------------------------------------- R5: copies, every base
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_copies_work_around_every_base_optimizer(backend, base, device):
    """deepcopy, pickle and torch.save/torch.load of a model with its SAM, after two steps: the
    copy's base optimizer is rebuilt on the copy's groups, with a view of its state, and the
    copy then steps exactly like the original (weights and state bit for bit), sharing no
    memory with it."""
    cls = getattr(torch.optim, base)
    for how in ("deepcopy", "pickle", "torch.save"):
        model = make_model(device)
        opt = SAM(_params(model, base), cls, rho=0.1, backend=backend, **BASES[base])
        for step in range(2):
            manual_step(model, opt, *batch(device, step))
        copied_model, copied = _copy((model, opt), how)
        inner = copied.base_optimizer
        assert type(inner) is cls and inner.param_groups is copied.param_groups, how
        assert [id(p) for p in inner.state] == [id(p) for p in copied.state], how  # a view of its state
        pairs = zip(copied_model.parameters(), model.parameters())
        assert all(p.data_ptr() != q.data_ptr() for p, q in pairs), how
        for step in (2, 3):
            manual_step(model, opt, *batch(device, step))
            manual_step(copied_model, copied, *batch(device, step))
        assert torch.equal(weights(copied_model), weights(model)), how
        state, copied_state = _flat_state(opt), _flat_state(copied)
        assert len(state) == len(copied_state) > 0, how
        for (i, k, v), (j, c, u) in zip(state, copied_state):
            assert (i, k) == (j, c) and (torch.equal(v, u) if torch.is_tensor(v) else v == u), (how, i, k)


# ---------------------------------------------------------------------- R3: a checkpoint of another base
CROSS = [("SGD", "Adam"), ("SGD", "AdamW"), ("Adam", "SGD"), ("AdamW", "SGD"), ("Adadelta", "SGD")]


@pytest.mark.parametrize("saved_by,into", CROSS, ids=[f"{a}-into-{b}" for a, b in CROSS])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_checkpoint_of_another_base_optimizer_is_refused(backend, saved_by, into, device):
    """SGD's checkpoint in SAM(Adam) would load and then stop every second_step with a bare
    KeyError ('betas') and the weights perturbed; Adam's or Adadelta's in SAM(SGD) raised one
    inside load_state_dict. Refused at load, naming both optimizers, whether the checkpoint is
    a SAM's or a plain torch.optim one; nothing changes, and the next step is the step of an
    optimizer that never saw it."""
    cls = getattr(torch.optim, into)
    for plain in (False, True):
        source_model = make_model(device, seed=2)
        saved_cls = getattr(torch.optim, saved_by)
        if plain:
            source = saved_cls(source_model.parameters(), **BASES[saved_by])
            loss_of(source_model, *batch(device, 0)).backward()
            source.step()
        else:
            source = SAM(source_model.parameters(), saved_cls, backend=backend, **BASES[saved_by])
            manual_step(source_model, source, *batch(device, 0))
        saved = source.state_dict()
        model, twin_model = make_model(device), make_model(device)
        opt, twin = (build(m, backend, base=cls, **BASES[into]) for m in (model, twin_model))
        for m, o in ((model, opt), (twin_model, twin)):
            manual_step(m, o, *batch(device, 1))
            loss_of(m, *batch(device, 2)).backward()  # gradients in flight too
        before = snapshot(model, opt)
        with pytest.raises(ValueError, match=rf"torch\.optim\.{saved_by}\b.*torch\.optim\.{into}\b"):
            opt.load_state_dict(saved)
        assert snapshot(model, opt) == before
        for m, o in ((model, opt), (twin_model, twin)):
            o.zero_grad()
            manual_step(m, o, *batch(device, 3))
        assert torch.equal(weights(model), weights(twin_model))


# ---------------------------------------------------------------------- B9, X7: tensors of several values
SEVERAL = [
    ("SGD", "lr", torch.tensor([0.1, 0.1])),
    ("AdamW", "lr", torch.tensor([1e-2, 1e-2])),
    ("Adam", "betas", (torch.tensor([0.9, 0.9]), 0.999)),
    ("AdamW", "betas", (0.9, torch.tensor([0.999, 0.999]))),
    ("RMSprop", "lr", torch.tensor([1e-2, 1e-2])),  # the base optimizer's own step() runs it
]


@pytest.mark.parametrize(
    "base,key,value", SEVERAL, ids=[f"{b}-{k}-{i}" for i, (b, k, _) in enumerate(SEVERAL)]
)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_hyperparameter_tensor_of_several_values_is_refused(backend, base, key, value, device):
    """Set between first_step() and second_step() (or before first_step()), an lr or a beta
    holding several values made the update fail halfway (TypeError, the weights restored and
    part of the state moved). Refused before anything changes, naming the key; with the value
    put back, the step completes as if nothing had happened."""
    cls = getattr(torch.optim, base)
    for when in ("between the passes", "before first_step"):
        model, twin_model = make_model(device), make_model(device)
        opt, twin = (build(m, backend, base=cls, **BASES[base]) for m in (model, twin_model))
        x, y = batch(device, 1)
        for m, o in ((model, opt), (twin_model, twin)):
            manual_step(m, o, *batch(device, 0))  # state to protect
            loss_of(m, x, y).backward()
            if when == "between the passes":
                o.first_step(zero_grad=True)
                loss_of(m, x, y).backward()
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        before = snapshot(model, opt)
        with pytest.raises(ValueError, match=rf"\['{key}'\].*holds one value"):
            opt.second_step() if when == "between the passes" else opt.first_step()
        assert snapshot(model, opt) == before, when
        opt.param_groups[0][key] = good
        for m, o in ((model, opt), (twin_model, twin)):
            if when == "before first_step":
                o.first_step(zero_grad=True)
                loss_of(m, x, y).backward()
            o.second_step(zero_grad=True)
        assert torch.equal(weights(model), weights(twin_model)), when
