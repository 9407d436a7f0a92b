"""SAMWindow (late-phase SAM, Zhou et al., ICLR 2025): SAM steps only for start <= step < end.

The rule, re-implemented here in float64: step t (0-based, one per first_step()) is the
wrapped optimizer's own step (a SAM step; LookSAM's or interval SAM's schedule, by t) when
start <= t < end, and the base optimizer's step with the first pass's gradient otherwise;
with reset_momentum the base optimizer's state (momentum, Adam's moments and step count)
restarts at step start, as a freshly built one's. The loss, weights and float64 base updates
are test_variants.py's; every backend runs the table, with SGD (momentum) and AdamW.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import backends_for
from test_aesam import drive
from test_variants import (
    SMALL_SHAPES,
    BaseSim,
    Case,
    Problem,
    Sim,
    build,
    init_weights,
    max_rel_error,
)

from sam_fused import AESAM, RSAM, SAM, IntervalSAM, LookSAM
from sam_fused.graph import GraphedSAMStep
from sam_fused.schedules import SAMWindow


def simulate(name, options, problem, weights, rhos, base, steps, start, end, reset, quirk=None):
    """The float64 run: inside the window the variant's step, outside the base step with g.
    Returns, per step, (two passes?, weights)."""
    sim = Sim(name, options, problem, weights, rhos, base)
    out = []
    for t in range(steps):
        inside = start <= t and (end is None or t < end)
        if reset and t == start and quirk != "no_reset":
            sim.base = BaseSim(base, sim.base.hps, len(sim.w))
        if not inside:
            sim.descend(sim.grad(sim.w))  # the plain base step, whatever the variant
            two = False
        elif name == "looksam" and t % options["k"] != 0 and sim.gv is None:
            sim.descend(sim.grad(sim.w))  # a reuse step before any full one: g_v = 0
            two = False
        else:
            two = name not in ("looksam", "interval") or (t - options.get("offset", 0)) % options["k"] == 0
            two = two and t >= options.get("offset", 0)
            sim._step(two, None)
        sim.index += 1
        out.append((two, [w.clone() for w in sim.w]))
    return out


def setup(seed, base, backend, device, cls=SAM, options=None, rhos=(0.5, 1.5)):
    """The problem, its initial weights, and fresh parameters (copies) with their optimizer."""
    problem, weights = Problem(SMALL_SHAPES, seed), init_weights(SMALL_SHAPES, seed)
    on_device = [[w.to(device) for w in g] for g in weights]
    params, opt = build(Case(cls, options or {}, rhos), base, backend, on_device)
    return problem, weights, params, opt


CLASSES = {
    "sam": (SAM, {}),
    "looksam": (LookSAM, {"k": 3, "alpha": 0.7}),
    "interval": (IntervalSAM, {"k": 2}),
}
STEPS = 8
TABLE = [
    pytest.param(
        name, base, reset, window, backend, id=f"{backend}-{name}-{base}-{window}{'-reset' if reset else ''}"
    )
    for name, window in (("sam", (2, 5)), ("sam", (3, None)), ("looksam", (3, None)), ("interval", (1, 6)))
    for base in ("sgd", "adamw")
    for reset in (False, True)
    for backend in backends_for(name)
]


@pytest.mark.parametrize("name,base,reset,window,backend", TABLE)
def test_window_matches_float64_rule(name, base, reset, window, backend, device):
    """Each step's kind and the weights follow the float64 rule, with and without reset_momentum."""
    cls, options = CLASSES[name]
    start, end = window
    seed = 400 + len(name) + 2 * start + ("sgd", "adamw").index(base)
    rhos = (1.5, 3.0) if name == "looksam" else (0.5, 1.5)
    problem, weights, params, opt = setup(seed, base, backend, device, cls, options, rhos)
    window_obj = SAMWindow(opt, start, end, reset_momentum=reset)
    assert window_obj.active is (start == 0)
    records = drive(opt, params, problem, STEPS)
    expected = simulate(name, options, problem, weights, rhos, base, STEPS, start, end, reset)
    assert [r[0] for r in records] == [e[0] for e in expected]
    tol = 3e-5 if name == "looksam" else 1e-5
    for step, ((_, got), (_, want)) in enumerate(zip(records, expected)):
        err = max_rel_error([g.cpu() for g in got], want)
        assert err <= tol, f"{name}/{base}/{backend} step {step}: weights off by {err:.3g}"
    # the comparison can fail: without the window (SAM everywhere), and with the reset flipped
    whole = simulate(name, options, problem, weights, rhos, base, STEPS, 0, None, False)
    assert max_rel_error([g.cpu() for g in records[-1][1]], whole[-1][1]) > 30 * tol
    flipped = simulate(name, options, problem, weights, rhos, base, STEPS, start, end, not reset)
    if start > 0:  # a reset at step 0 is no reset
        assert max_rel_error([g.cpu() for g in records[-1][1]], flipped[-1][1]) > 30 * tol


@pytest.mark.parametrize("backend", backends_for("sam"))
def test_reset_momentum_starts_the_window_with_fresh_base_state(backend, device):
    """At step start the base state is what a freshly built optimizer makes of its first step
    (SGD: momentum_buffer = d; Adam: step = 1): before it, the old state."""
    problem, _, params, opt = setup(431, "adamw", backend, device)
    SAMWindow(opt, 3, reset_momentum=True)
    drive(opt, params, problem, 3)
    assert all(float(opt.state[p]["step"]) == 3 for p in params)
    problem.set_grads(params, 3)
    assert opt.first_step()
    problem.set_grads(params, 3)
    opt.second_step()
    assert all(float(opt.state[p]["step"]) == 1 for p in params)


@pytest.mark.parametrize("backend", backends_for("rsam"))
def test_rsam_noise_step_does_nothing_outside_the_window(backend, device):
    problem, _, params, opt = setup(441, "sgd", backend, device, RSAM, {"lam": 0.02, "seed": 3})
    SAMWindow(opt, 1, 2)
    kinds = []
    for step in range(3):
        before = [p.detach().clone() for p in params]
        opt.noise_step()
        moved = any(not torch.equal(p, b) for p, b in zip(params, before))
        problem.set_grads(params, step)
        two = opt.first_step()
        kinds.append((moved, two))
        if two:
            problem.set_grads(params, step)
            opt.second_step()
    assert kinds == [(False, False), (True, True), (False, False)]


@pytest.mark.parametrize("backend", backends_for("sam"))
def test_window_over_aesam_leaves_its_statistics_alone_outside(backend, device):
    """Outside the window the base step; inside, AESAM decides (its counts move only there)."""
    problem, _, params, opt = setup(451, "sgd", backend, device, AESAM, {"total_steps": 8, "delta": 0.5})
    SAMWindow(opt, 2, 6)
    assert opt.perturbs_this_step is False
    drive(opt, params, problem, 2)
    assert opt.statistics["steps"] == 0
    assert opt.perturbs_this_step is None  # inside: AESAM decides from the gradient
    records = drive(opt, params, problem, 6)
    assert opt.statistics["steps"] == 4
    assert sum(r[0] for r in records) == opt.statistics["sam_steps"]
    assert not records[-1][0] and not records[-2][0]


@pytest.mark.parametrize("backend", backends_for("sam"))
def test_passes_per_step(backend, device):
    """step(closure): one closure call per step outside the window, two inside."""
    problem, _, params, opt = setup(461, "sgd", backend, device)
    SAMWindow(opt, start=2, end=5)
    calls = []
    for step in range(8):

        def closure(step=step):
            calls.append(step)
            opt.zero_grad()
            loss = problem.loss(params, step)
            loss.backward()
            return loss

        opt.step(closure)
    assert calls == [0, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7]


def _run(backend, device, steps, stop=None, seed=471):
    """SAM in a window (2, 6) with reset_momentum; with ``stop``, checkpointed there (optimizer and
    window) and resumed into freshly built parameters, optimizer and window."""
    problem, weights = Problem(SMALL_SHAPES, seed), init_weights(SMALL_SHAPES, seed)
    case = Case(SAM, {}, (0.5, 1.5))
    params, opt = build(case, "sgd", backend, [[w.to(device) for w in g] for g in weights])
    window = SAMWindow(opt, 2, 6, reset_momentum=True)
    for step in range(steps):
        if step == stop:
            buffer = io.BytesIO()
            torch.save(
                {
                    "opt": opt.state_dict(),
                    "window": window.state_dict(),
                    "params": [p.detach() for p in params],
                },
                buffer,
            )
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            zeros = [[torch.zeros_like(w) for w in g] for g in weights]
            params, opt = build(case, "sgd", backend, [[w.to(device) for w in g] for g in zeros])
            window = SAMWindow(opt, 0)  # other settings: the checkpoint's replace them
            with torch.no_grad():
                for p, w in zip(params, saved["params"]):
                    p.copy_(w)
            opt.load_state_dict(saved["opt"])
            window.load_state_dict(saved["window"])
        problem.set_grads(params, step)
        if opt.first_step():
            problem.set_grads(params, step)
            opt.second_step()
    return params, opt, window


@pytest.mark.parametrize("stop", [1, 2, 4])
@pytest.mark.parametrize("backend", backends_for("sam"))
def test_resume_is_bitwise_the_uninterrupted_run(backend, device, stop):
    """Before the window, at its first step (the reset) and inside it."""
    params, opt, window = _run(backend, device, 8)
    resumed, opt2, window2 = _run(backend, device, 8, stop=stop)
    assert window2.state_dict() == window.state_dict() == {"start": 2, "end": 6, "reset_momentum": True}
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


@pytest.mark.parametrize("backend", backends_for("sam"))
def test_refusals_change_nothing(backend, device):
    problem, _, params, opt = setup(481, "sgd", backend, device)
    drive(opt, params, problem, 2)
    policy = opt.engine.policy
    for args, kwargs, error, match in (
        ((-1,), {}, ValueError, "start"),
        ((1.5,), {}, ValueError, "start"),
        ((True,), {}, ValueError, "start"),
        (("3",), {}, ValueError, "start"),
        ((3, 3), {}, ValueError, "greater than start"),
        ((3, 2), {}, ValueError, "greater than start"),
        ((3, 4.0), {}, ValueError, "end"),
        ((3,), {"reset_momentum": 1}, ValueError, "reset_momentum"),
    ):
        with pytest.raises(error, match=match):
            SAMWindow(opt, *args, **kwargs)
        assert opt.engine.policy is policy
    with pytest.raises(TypeError, match=r"sam_fused\.SAM"):
        SAMWindow(torch.optim.SGD(params, lr=0.1), 1)
    problem.set_grads(params, 2)
    assert opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step"):
        SAMWindow(opt, 5)
    assert opt.engine.policy is policy
    problem.set_grads(params, 2)
    opt.second_step()
    window = SAMWindow(opt, 5, 9)
    with pytest.raises(ValueError, match="already has a SAMWindow"):
        SAMWindow(opt, 6)
    for bad in ({"start": 1}, {"start": -1, "end": None, "reset_momentum": False}, [5, 9, False]):
        with pytest.raises(ValueError):
            window.load_state_dict(bad)
        assert window.state_dict() == {"start": 5, "end": 9, "reset_momentum": False}
    # the refusals changed no step: the run continues as a window (5, 9) run does
    assert [r[0] for r in drive(opt, params, problem, 3)] == [False, False, True]  # steps 3, 4, 5


def test_cuda_graphs_are_refused(device):
    model = torch.nn.Linear(4, 2).to(device)
    opt = SAM(model.parameters(), lr=0.1, backend="reference")
    SAMWindow(opt, 3)
    x, y = torch.randn(3, 4, device=device), torch.randn(3, 2, device=device)
    with pytest.raises(ValueError, match="SAMWindow"):
        GraphedSAMStep(model, torch.nn.functional.mse_loss, opt, x, y)
