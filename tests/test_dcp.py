"""Checkpoints through torch.distributed.checkpoint (DCP): FSDP2 on two ranks, and one process.

The two-rank part (``tests/_dcp_worker.py``, run once for the module) trains SAM on an
FSDP2 model, saves with ``dcp.save(get_state_dict(model, opt))`` on the way, loads into a
fresh model and optimizer (``get_state_dict`` as the template, ``dcp.load``,
``set_state_dict``) and continues. Against what:

* the resumed run equals the uninterrupted one **bit for bit**, on every rank, weights and
  every state entry: DCP writes and reads the raw bytes of each shard, and the resumed run
  then executes the same operations on the same shards (the gloo sums of two ranks do not
  depend on order), so any difference is a lost or altered piece of state;
* the uninterrupted run equals single-process SAM on the whole batch (computed here, no
  process group) to float rounding: the all-reduce adds half-batch sums in another order;
* the optimizer state was saved sharded: DTensor entries, and in the checkpoint's metadata
  one chunk per rank, each in that rank's own file;
* DCP's initialization of a fresh optimizer gives SAM the state torch's own optimizer gets.

The one-process part runs the same recipe on ordinary parameters (flat buffers, the
compiled backend where it builds), and checks the closure-less ``step()`` DCP relies on and
sam_fused's own checkpoint entry directly.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sam_fused import SAM
from sam_fused.variants import VARIANTS

sys.path.insert(0, str(Path(__file__).parent))
import _dcp_worker as D  # the cases both sides build
import _distributed_worker as W
from _ranks import run_ranks
from conftest import ALL_BACKENDS

WORKER = Path(__file__).resolve().parent / "_dcp_worker.py"
LAUNCH_TIMEOUT = 300  # seconds; the two ranks take about 30 s on two cores
RTOL, ATOL = 2e-5, 1e-6  # the all-reduce's order against one full-batch backward (test_distributed.py)

CASE_IDS = [D.case_name(c, b) for c in D.CASES for b in D.BACKENDS]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("dcp")
    return out, run_ranks(WORKER, out, W.WORLD, LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def ranks(run) -> list[dict[str, Any]]:
    return run[1]


def _assert_equal_runs(got: dict[str, Any], want: dict[str, Any], where: str, entry: bool = True) -> None:
    """This rank's shards of weights and state, bit for bit; ``entry``: and sam_fused's own
    optimizer-wide entry (the step count, the skipped steps)."""
    assert got["backends"] == want["backends"], where
    for i, (a, b) in enumerate(zip(got["params"], want["params"], strict=True)):
        assert torch.equal(a, b), f"{where}: param {i} differs by {float((a - b).abs().max())}"
    for i, (sa, sb) in enumerate(zip(got["state"], want["state"], strict=True)):
        assert sa.keys() == sb.keys(), f"{where}: state keys of param {i}"
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{where}: state {key!r} of param {i} differs"
    if entry:
        assert got["step_index"] == want["step_index"], where
        assert got["skipped"] == want["skipped"], where


def _single_process(case: tuple[str, str, dict[str, Any]], backend: str) -> dict[str, Any]:
    variant, base, options = case
    model = W.make_model()
    params = list(model.parameters())
    opt = W.make_sam(params, base, backend, variant, options)
    W.train(model, opt, D.batches())
    return {"params": params, "state": [dict(opt.state[p]) for p in params]}


# ---------------------------------------------------------------------------- FSDP2, two ranks
@pytest.mark.parametrize("name", CASE_IDS)
def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(ranks, name):
    for rank, res in enumerate(ranks):
        case = res[name]
        _assert_equal_runs(case["saving"], case["uninterrupted"], f"rank {rank}, {name}, saving")
        assert case["loaded_step_index"] == D.SPLIT
        _assert_equal_runs(case["resumed"], case["uninterrupted"], f"rank {rank}, {name}, resumed")


@pytest.mark.parametrize(("case", "backend"), [(c, b) for c in D.CASES for b in D.BACKENDS], ids=CASE_IDS)
def test_uninterrupted_run_equals_single_process_sam(ranks, case, backend):
    want = _single_process(case, backend)
    for res in ranks:
        got = res[D.case_name(case, backend)]["uninterrupted"]
        for a, b in zip(got["full_params"], want["params"], strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=RTOL, atol=ATOL)
        for sa, sb in zip(got["full_state"], want["state"], strict=True):
            assert sa.keys() == sb.keys()
            for key in sa:
                torch.testing.assert_close(sa[key], sb[key], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", CASE_IDS)
def test_optimizer_state_is_saved_sharded(run, name):
    """DTensor entries go to dcp.save, and each rank writes its own rows of every state tensor."""
    from torch.distributed.checkpoint import FileSystemReader

    out, ranks = run
    fqns = [n for n, _ in W.make_model().named_parameters()]
    rows = {
        fqn: [res[name]["uninterrupted"]["params"][i].shape[0] for res in ranks] for i, fqn in enumerate(fqns)
    }
    running = VARIANTS[name.split("-")[0]].running_state
    for res in ranks:
        types = res[name]["saved_types"]
        tensors = {k: v for k, v in types.items() if not k.endswith(".step")}
        assert tensors and all(t == ("DTensor", ["Shard(dim=0)"]) for t in tensors.values()), types
        if running is not None:
            assert all(f"{fqn}.{running}" in types for fqn in fqns)
    metadata = FileSystemReader(str(out / "checkpoints" / name)).read_metadata()
    files = {
        (index.fqn, tuple(index.offset or ())): info.relative_path
        for index, info in metadata.storage_data.items()
    }
    checked = set()
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith("optim.state.") or key.endswith(".step"):
            continue
        counts = rows[key[len("optim.state.") :].rsplit(".", 1)[0]]
        starts = [sum(counts[:r]) for r in range(len(counts))]
        rest = tuple(meta.size[1:])
        offsets = [(start, *(0,) * len(rest)) for start in starts]
        want = sorted((offset, (n, *rest)) for offset, n in zip(offsets, counts))
        assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks) == want, key
        for rank, (offset, n) in enumerate(zip(offsets, counts)):
            if n:  # rank 1's share of the one-row layer is empty: nothing to write
                assert files[(key, offset)] == f"__{rank}_0.distcp", key
        checked.add(key[len("optim.state.") :])
    assert checked == set(tensors)  # every state tensor was saved, and sharded


@pytest.mark.parametrize(("option", "case", "options"), D.OPTION_CASES, ids=[o[0] for o in D.OPTION_CASES])
def test_other_state_dict_options_resume_bit_for_bit(ranks, option, case, options):
    """full_state_dict=True: everything. flatten_optimizer_state_dict=True: weights and every
    state entry, but not sam_fused's optimizer-wide entry, which that format drops (the step
    count restarts; VaSSO's steps do not depend on it, LookSAM's are refused below)."""
    name = f"{option}/{D.case_name(case, 'auto')}"
    flattened = options.get("flatten_optimizer_state_dict", False)
    for rank, res in enumerate(ranks):
        got = res[name]
        _assert_equal_runs(got["resumed"], got["uninterrupted"], f"rank {rank}, {name}", entry=not flattened)
        if flattened:
            assert got["loaded_step_index"] == 0 and got["resumed"]["step_index"] == D.STEPS - D.SPLIT
        else:
            assert got["loaded_step_index"] == D.SPLIT


def test_flattened_checkpoint_of_a_scheduled_variant_is_refused(ranks):
    """flatten_optimizer_state_dict=True rebuilds the groups from the optimizer's own keys and
    drops sam_fused's entry, which holds LookSAM's schedule: refused, with the way out."""
    for res in ranks:
        message = res["flatten/looksam"].get("error")
        assert message is not None and "flatten_optimizer_state_dict" in message
        assert "step count" in message


@pytest.mark.parametrize("base", sorted(W.BASES))
def test_dcp_initializes_a_fresh_optimizer_as_it_does_torch_optim(ranks, base):
    """get_optimizer_state_dict on a fresh optimizer steps it once with zero gradients and lr 0;
    SAM's base state then equals torch's own optimizer's, its variant state is zero, the
    weights, learning rates and SAM's step count are unchanged and the gradients gone."""
    w0 = [p.detach() for p in W.make_model().parameters()]
    for res in ranks:
        fresh = res[f"fresh/{base}"]
        sam, ref = fresh["sam"], fresh["torch"]
        assert sam["state"].keys() == ref["state"].keys() and sam["state"]
        for fqn, entry in ref["state"].items():
            assert set(sam["state"][fqn]) == {*entry, "vasso_d"}
            for key, value in entry.items():
                torch.testing.assert_close(sam["state"][fqn][key], value, rtol=0, atol=0, check_dtype=False)
            assert not sam["state"][fqn]["vasso_d"].any()
        for got in (sam["params"], ref["params"]):
            assert all(torch.equal(a, b) for a, b in zip(got, w0))
        assert sam["lr"] == ref["lr"] == [W.BASES[base][1]["lr"]]
        assert sam["step_index"] == 0
        assert all(g is None for g in sam["grads"])


# ---------------------------------------------------------------------------- one process
def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))


def _steps(model: nn.Module, opt: SAM, steps: range) -> None:
    gen = torch.Generator().manual_seed(11)
    data = [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(steps.stop)]
    W.train(model, opt, [data[i] for i in steps])


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(("variant", "base"), [("sam", "sgd"), ("vasso", "adamw"), ("looksam", "adamw")])
def test_one_process_dcp_round_trip_is_bit_exact(tmp_path, backend, variant, base):
    """The same recipe without a process group, on ordinary parameters (flat buffers under a
    fused backend: DCP loads into views of them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = {"k": 2} if variant == "looksam" else {}
    make = lambda seed: (m := _model(seed), W.make_sam(m.parameters(), base, backend, variant, options))
    model, opt = make(0)
    _steps(model, opt, range(5))
    want = [p.detach().clone() for p in model.parameters()], [dict(opt.state[p]) for p in model.parameters()]

    model, opt = make(0)
    _steps(model, opt, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path)
    model, opt = make(1)  # other weights: everything must come from the checkpoint
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    _steps(model, opt, range(3, 5))
    for p, w, entry in zip(model.parameters(), *want):
        assert torch.equal(p.detach(), w)
        assert opt.state[p].keys() == entry.keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in entry.items())


def _as_dcp_initializes(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """What DCP's state initialization does: zero gradients, every lr 0, step()."""
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in opt.param_groups:
        group["lr"] = 0.0


@pytest.mark.parametrize("base", sorted(W.BASES))
def test_closure_less_step_with_zero_gradients_is_the_base_step(base):
    """No state, every gradient zero, lr 0: step() runs SAM's step (a zero perturbation), which
    is the base optimizer's step on zero gradients; torch.optim's own step is the reference
    (SGD's first momentum is the weight decay term)."""
    cls, kwargs = W.BASES[base]
    model, twin = _model(0), _model(0)
    opt = W.make_sam(model.parameters(), base, "auto", "vasso")
    ref = cls(twin.parameters(), **kwargs)
    _as_dcp_initializes(opt, list(model.parameters()))
    _as_dcp_initializes(ref, list(twin.parameters()))
    assert opt.step() is None
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q) and torch.equal(p, _model(0).state_dict()[_name(model, p)])
        assert set(opt.state[p]) == {*ref.state[q], "vasso_d"}
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=0, atol=0, check_dtype=False)
    assert opt._engine.step.step_index == 0


@pytest.mark.parametrize("variant", ["interval", "rsam"])
def test_closure_less_zero_gradient_step_leaves_the_schedule_and_noise(variant):
    """The initialization step is not one of SAM's scheduled steps: interval SAM still perturbs
    on the step after it, RSAM draws the noise of a fresh optimizer."""
    options = {"k": 2, "offset": 1} if variant == "interval" else {}
    runs = []
    for initialize in (False, True):
        model = _model(0)
        # no weight decay: the zero-gradient step leaves the weights, so the noise shows bitwise
        opt = SAM(
            model.parameters(),
            torch.optim.SGD,
            lr=0.1,
            momentum=0.9,
            variant=variant,
            variant_options=options,
        )
        if initialize:
            _as_dcp_initializes(opt, list(model.parameters()))
            opt.step()
            opt.zero_grad(set_to_none=True)
            opt.state.clear()  # SGD's momentum moved; fresh again, so the rest can be compared
        assert opt.perturbs_this_step is (variant != "interval")
        if variant == "rsam":
            opt.noise_step()
            runs.append([p.detach().clone() for p in model.parameters()])
            opt.abort_step()
    if variant == "rsam":
        assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b in ("reference", "cpp", "triton")])
def test_closure_less_step_is_refused_otherwise(backend):
    """No gradient at all, a gradient that is not zero, a learning rate that is not 0 (a loop's
    step() after zero_grad()), existing state: the usual error, and nothing changes (the zero
    check sees every parameter, not only the first)."""
    model = _model(0)
    params = list(model.parameters())
    opt = W.make_sam(params, "sgd", backend)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()  # no backward yet
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()  # the learning rate is 0.1
    _as_dcp_initializes(opt, params)
    params[-1].grad[0] = 1e-30
    grads = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and len(opt.state) == 0
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    for group in opt.param_groups:
        group["lr"] = W.BASES["sgd"][1]["lr"]
    _steps(model, opt, range(1))
    _as_dcp_initializes(opt, params)
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()  # with state (VaSSO's or F-SAM's direction would not be zero)
    assert all(torch.equal(v, opt.state[next(model.parameters())][k]) for k, v in state.items())


def _name(model: nn.Module, param: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


# ---------------------------------------------------------------------------- sam_fused's own entry
def _trained(variant: str, options: dict | None = None) -> tuple[nn.Module, SAM]:
    model = _model(0)
    opt = SAM(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "rho": 0.2}],
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
        variant=variant,
        variant_options=options,
    )
    _steps(model, opt, range(3))
    return model, opt


def test_every_param_group_carries_sam_fused_entry():
    _, opt = _trained("looksam", {"k": 2})
    saved = opt.state_dict()
    entries = [g["sam_fused"] for g in saved["param_groups"]]
    assert len(entries) == 2 and entries[0] == entries[1]
    assert entries[0]["step_index"] == 3 and entries[0]["looksam_gv2"] > 0
    assert "sam_fused" not in saved
    fresh = SAM(_model(1).parameters(), torch.optim.SGD, lr=0.1, variant="rsam")
    # a fresh RSAM already shows the generator its first noise_step() seeds: one structure
    assert isinstance(fresh.state_dict()["param_groups"][0]["sam_fused"]["generator"], torch.Tensor)


def test_loading_keeps_the_entry_out_of_the_param_groups_and_reads_the_old_format():
    _, opt = _trained("looksam", {"k": 2})
    saved = opt.state_dict()
    old = copy.deepcopy(saved)  # sam_fused's earlier format: one top-level entry, status by index
    entry = old["param_groups"][0]["sam_fused"]
    for group in old["param_groups"]:
        del group["sam_fused"]
    old["sam_fused"] = {
        "step_index": entry["step_index"],
        "status": {2: entry["skipped_steps"], 3: entry["looksam_gv2"]},
        "generator": entry["generator"],
    }
    for checkpoint in (saved, old):
        _, twin = _trained("looksam", {"k": 2})
        twin._engine.step.step_index = 0
        twin._engine.status.zero_()
        twin.load_state_dict(checkpoint)
        assert all("sam_fused" not in g for g in twin.param_groups)
        _assert_same_checkpoint(twin.state_dict(), saved)


@pytest.mark.parametrize("variant", ["looksam", "interval", "rsam"])
def test_a_checkpoint_that_lost_the_entry_is_refused_where_it_decides_the_run(variant):
    options = {"k": 2} if variant in ("looksam", "interval") else {}
    _, opt = _trained(variant, options) if variant != "rsam" else (None, _rsam_trained())
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["sam_fused"]
    before = opt.state_dict()
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict"):
        opt.load_state_dict(saved)
    _assert_same_checkpoint(opt.state_dict(), before)


def _assert_same_checkpoint(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same_checkpoint(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_checkpoint(x, y)
    else:
        assert a == b


def _rsam_trained() -> SAM:
    model = _model(0)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, variant="rsam")
    for _ in range(2):
        opt.noise_step()
        W.loss_fn(model(torch.ones(2, 6)), torch.zeros(2, 3)).backward()
        opt.first_step(zero_grad=True)
        W.loss_fn(model(torch.ones(2, 6)), torch.zeros(2, 3)).backward()
        opt.second_step(zero_grad=True)
    return opt


def test_a_checkpoint_without_the_entry_loads_where_it_decides_nothing():
    """Plain SAM: the entry holds only the skipped-steps count, which restarts at 0."""
    _, opt = _trained("sam")
    opt._engine.status[2] = 4.0  # status.SKIPPED
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["sam_fused"]
    opt.load_state_dict(saved)
    assert float(opt.skipped_steps) == 0.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda gs: gs[1]["sam_fused"].update(step_index=7), "different 'sam_fused' entries"),
        (lambda gs: [g["sam_fused"].update(step_index=-1) for g in gs], "non-negative integer"),
        (lambda gs: [g["sam_fused"].update(skipped_steps="many") for g in gs], "must be a number"),
        (lambda gs: [g["sam_fused"].pop("looksam_gv2") for g in gs], "lacks"),
    ],
)
def test_a_bad_entry_is_refused_before_anything_changes(edit, message):
    _, opt = _trained("looksam", {"k": 2})
    saved = opt.state_dict()
    bad = copy.deepcopy(saved)
    edit(bad["param_groups"])
    opt._engine.step.step_index = 1
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert opt._engine.step.step_index == 1
