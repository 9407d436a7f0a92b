"""AESAM (Jiang, Yang, Zhang, Kwok, ICLR 2023): a SAM step only where ||g||^2 is high.

The rule, re-implemented here in float64 from the paper as docs/variants.md states it, per
step t (0-based) with q = ||g||^2 of the first pass's gradient:

    mu      <- delta mu + (1 - delta) q
    sigma^2 <- delta sigma^2 + (1 - delta) (q - mu)^2        (the new mu)
    c_t      = (t / T) lambda1 + (1 - t / T) lambda2
    SAM step iff q >= mu + c_t sigma; otherwise the base step with g

The loss, weights and float64 base updates are test_variants.py's (its ``Problem``: a fresh
minibatch per step, parameters of 1, 7, 4097 elements, a matrix and a conv kernel in two
param groups). Every backend runs the table, with SGD (momentum) and AdamW.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import backends_for
from test_variants import (
    SHAPES,
    SMALL_SHAPES,
    Case,
    Problem,
    Sim,
    build,
    copy64,
    gnorm,
    init_weights,
    max_rel_error,
)

from sam_fused import AESAM
from sam_fused.graph import GraphedSAMStep

# delta = 0.5 rather than the default 0.9: with mu and sigma^2 starting at 0, the first ~7 steps
# of a 0.9 run are all SAM steps on this problem; 0.5 mixes both kinds from step 1 on
RULE = {"delta": 0.5, "lambda1": -1.0, "lambda2": 1.0}


class AESAMRule:
    """AE-SAM's decision in float64, written from the rule above (``quirk``: a wrong variant)."""

    def __init__(self, total_steps: int, delta: float, lambda1: float, lambda2: float, quirk=None) -> None:
        self.total, self.delta, self.l1, self.l2, self.quirk = total_steps, delta, lambda1, lambda2, quirk
        self.mean, self.var = 0.0, 0.0

    def decide(self, t: int, q: float) -> bool:
        d = self.delta
        old_mean = self.mean
        self.mean = d * self.mean + (1 - d) * q
        centre = old_mean if self.quirk == "old_mean" else self.mean
        self.var = d * self.var + (1 - d) * (q - centre) ** 2
        c = (t / self.total) * self.l1 + (1 - t / self.total) * self.l2
        return q >= self.mean + c * math.sqrt(self.var)


def simulate(name: str, options: dict, problem, weights, rhos, base, steps, total, quirk=None):
    """The float64 run: per step the rule's decision, then a SAM step or the base step with g."""
    sim = Sim(name, options, problem, weights, rhos, base)
    rule = AESAMRule(total, **RULE, quirk=quirk)
    out = []
    for t in range(steps):
        q = float(gnorm(sim.grad(sim.w)) ** 2)
        sam = rule.decide(t, q)
        sim._step(sam, None)  # full=False: one pass, the plain base update (not LookSAM here)
        sim.index += 1
        out.append((sam, [w.clone() for w in sim.w], rule.mean, rule.var))
    return out


def drive(opt, params, problem, steps, read=None):
    """The manual loop; records (two passes?, the weights) and, with ``read``, ``read(opt)``'s
    values after each step."""
    records = []
    for step in range(steps):
        problem.set_grads(params, step)
        two = opt.first_step()
        if two:
            problem.set_grads(params, step)
            opt.second_step()
        record = (two, [copy64(p) for p in params])
        records.append(record if read is None else record + read(opt))
    return records


def statistics(opt) -> tuple[float, float]:
    return opt.statistics["mean"], opt.statistics["var"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


STEPS = 12
TABLE = [
    pytest.param(name, base, backend, id=f"{backend}-{name}-{base}")
    for name in ("sam", "asam")
    for base in ("sgd", "adamw")
    for backend in backends_for("sam")
]


@pytest.mark.parametrize("name,base,backend", TABLE)
def test_aesam_matches_float64_rule(name, base, backend, device):
    """Each step's kind, the weights and mu, sigma^2 follow the float64 rule; both kinds occur."""
    seed = 300 + ("sam", "asam").index(name) * 2 + ("sgd", "adamw").index(base)
    options = {"eta": 0.01, "adaptive": True} if name == "asam" else {}
    case = Case(AESAM, {**RULE, "total_steps": STEPS, **options}, (0.5, 1.5))
    problem, weights = Problem(SHAPES, seed), init_weights(SHAPES, seed)
    params, opt = build(case, base, backend, [[w.to(device) for w in g] for g in weights])
    records = drive(opt, params, problem, STEPS, statistics)
    sim_options = {"eta": 0.01} if name == "asam" else {}
    expected = simulate(name, sim_options, problem, weights, case.rhos, base, STEPS, STEPS)
    kinds = [r[0] for r in records]
    assert kinds == [e[0] for e in expected], f"SAM steps {kinds}, the rule's {[e[0] for e in expected]}"
    assert 0 < sum(kinds) < STEPS, f"the run must mix SAM and base steps to test anything: {kinds}"
    for step, ((_, got, mean, var), (_, want, want_mean, want_var)) in enumerate(zip(records, expected)):
        err = max_rel_error([g.cpu() for g in got], want)
        assert err <= 1e-5, f"step {step}: weights off by {err:.3g}"
        assert rel(mean, want_mean) <= 1e-5 and rel(var, want_var) <= 1e-4, (
            step,
            mean,
            want_mean,
            var,
            want_var,
        )
    assert opt.sam_fraction == sum(kinds) / STEPS
    # the comparison can fail: SAM on every step, and sigma^2 taken around the old mean, are far off
    always = Sim(name, sim_options, problem, weights, case.rhos, base)
    for _ in range(STEPS):
        always.step()
    assert max_rel_error([g.cpu() for g in records[-1][1]], always.w) > 1e-3
    wrong = simulate(name, sim_options, problem, weights, case.rhos, base, STEPS, STEPS, quirk="old_mean")
    assert rel(records[-1][3], wrong[-1][3]) > 1e-2


@pytest.mark.parametrize(
    "name,options,backend",
    [
        pytest.param(n, o, b, id=f"{b}-{n}")
        for n, o in (
            ("usam", {}),
            ("vasso", {"theta": 0.4}),
            ("fsam", {"sigma": 0.8, "lam": 0.6}),
            ("gcsam", {}),
            ("gsam", {"alpha": 0.3}),
        )
        for b in backends_for(n)
    ],
)
def test_aesam_over_other_ascents(name, options, backend, device):
    """variant=: the SAM steps are that variant's (its running state moves only on them)."""
    steps, seed = 8, 320 + len(name)
    rhos = (0.01, 0.03) if name == "usam" else (0.5, 1.5)
    case = Case(AESAM, {**RULE, "total_steps": steps, "variant": name, "variant_options": options}, rhos)
    problem, weights = Problem(SMALL_SHAPES, seed), init_weights(SMALL_SHAPES, seed)
    params, opt = build(case, "sgd", backend, [[w.to(device) for w in g] for g in weights])
    records = drive(opt, params, problem, steps, statistics)
    expected = simulate(name, options, problem, weights, rhos, "sgd", steps, steps)
    assert [r[0] for r in records] == [e[0] for e in expected]
    assert 0 < sum(r[0] for r in records) < steps
    for step, (got, want) in enumerate(zip(records, expected)):
        err = max_rel_error([g.cpu() for g in got[1]], want[1])
        assert err <= 1e-5, f"{name} step {step}: weights off by {err:.3g}"


@pytest.mark.parametrize("backend", backends_for("sam"))
def test_passes_per_step_are_one_plus_the_sam_fraction(backend, device):
    """step(closure) runs the closure 1 + (SAM step) times per step: passes = steps (1 + fraction),
    the fraction being the float64 rule's."""
    steps, seed = 10, 331
    problem, weights = Problem(SMALL_SHAPES, seed), init_weights(SMALL_SHAPES, seed)
    case = Case(AESAM, {**RULE, "total_steps": steps}, (0.5, 1.5))
    params, opt = build(case, "sgd", backend, [[w.to(device) for w in g] for g in weights])
    calls = 0
    for step in range(steps):

        def closure(step=step):
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = problem.loss(params, step)
            loss.backward()
            return loss

        opt.step(closure)
    expected = simulate("sam", {}, problem, weights, case.rhos, "sgd", steps, steps)
    fraction = sum(e[0] for e in expected) / steps
    assert 0 < fraction < 1
    assert opt.sam_fraction == fraction
    assert calls == steps * (1 + fraction)


def _run(backend, device, steps, stop=None, seed=341):
    """AESAM over ``steps`` steps; with ``stop``, checkpointed there and resumed into a freshly
    built parameter set and optimizer. Returns the parameters and the optimizer."""
    problem, weights = Problem(SMALL_SHAPES, seed), init_weights(SMALL_SHAPES, seed)
    case = Case(AESAM, {**RULE, "total_steps": steps}, (0.5, 1.5))
    params, opt = build(case, "adamw", backend, [[w.to(device) for w in g] for g in weights])
    for step in range(steps):
        if step == stop:
            buffer = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            fresh = [[torch.zeros_like(w) for w in g] for g in weights]  # not the trained weights
            params, opt = build(case, "adamw", backend, [[w.to(device) for w in g] for g in fresh])
            with torch.no_grad():
                for p, w in zip(params, saved["params"]):
                    p.copy_(w)
            opt.load_state_dict(saved["opt"])
        problem.set_grads(params, step)
        if opt.first_step():
            problem.set_grads(params, step)
            opt.second_step()
    return params, opt


@pytest.mark.parametrize("backend", backends_for("sam"))
def test_resume_is_bitwise_the_uninterrupted_run(backend, device):
    """mu, sigma^2, the counts and t come back from state_dict(): the resumed run is the same."""
    params, opt = _run(backend, device, 9)
    resumed, opt2 = _run(backend, device, 9, stop=5)
    assert opt2.statistics == opt.statistics
    assert 0 < opt.statistics["sam_steps"] < 9
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


def _snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        [p.grad.clone() for p in params],
        {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)},
        opt.statistics,
        opt.engine.step.step_index,
    )


def _same(a, b) -> bool:
    (w1, g1, s1, e1, i1), (w2, g2, s2, e2, i2) = a, b
    tensors = all(torch.equal(x, y) for x, y in zip(w1 + g1, w2 + g2))
    state = s1.keys() == s2.keys() and all(
        s1[i].keys() == s2[i].keys() and all(torch.equal(s1[i][k], s2[i][k]) for k in s1[i]) for i in s1
    )
    return tensors and state and e1 == e2 and i1 == i2


@pytest.mark.parametrize("backend", backends_for("sam"))
def test_refused_checkpoints_change_nothing(backend, device):
    problem, weights = Problem(SMALL_SHAPES, 351), init_weights(SMALL_SHAPES, 351)
    case = Case(AESAM, {**RULE, "total_steps": 10}, (0.5, 1.5))
    params, opt = build(case, "sgd", backend, [[w.to(device) for w in g] for g in weights])
    drive(opt, params, problem, 3)
    problem.set_grads(params, 3)
    good = opt.state_dict()
    before = _snapshot(opt, params)
    bad_entries = [
        {"mean": -1.0, "var": 0.0, "sam_steps": 0, "steps": 0},
        {"mean": float("nan"), "var": 0.0, "sam_steps": 0, "steps": 0},
        {"mean": 1.0, "var": 0.0, "sam_steps": 3, "steps": 2},
        {"mean": 1.0, "var": 0.0, "sam_steps": 1.5, "steps": 2},
        {"mean": 1.0, "var": 0.0},
        [1.0, 0.0],
    ]
    for entry in bad_entries:
        groups = [
            {**g, "sam_fused": {**g["sam_fused"], "policy": {"aesam": entry}}} for g in good["param_groups"]
        ]
        saved = {**good, "param_groups": groups}
        with pytest.raises(ValueError, match="aesam"):
            opt.load_state_dict(saved)
        assert _same(before, _snapshot(opt, params)), entry


def test_bad_arguments_are_refused():
    params = [torch.nn.Parameter(torch.randn(3))]
    for kwargs, match in (
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 2.5}, "total_steps"),
        ({"total_steps": True}, "total_steps"),
        ({"total_steps": 10, "delta": 1.5}, "delta"),
        ({"total_steps": 10, "lambda1": float("nan")}, "lambda1"),
        ({"total_steps": 10, "lambda2": "1"}, "lambda2"),
        ({"total_steps": 10, "initial_var": -1.0}, "initial_var"),
        ({"total_steps": 10, "variant": "rsam"}, "rsam"),
        ({"total_steps": 10, "variant": "looksam"}, "looksam"),
        ({"total_steps": 10, "variant": "interval"}, "interval"),
    ):
        with pytest.raises(ValueError, match=match):
            AESAM(params, lr=0.1, **kwargs)
    with pytest.raises(TypeError, match="total_steps"):
        AESAM(params, lr=0.1)


@pytest.mark.parametrize("backend", backends_for("sam"))
def test_abandoned_sam_step_puts_the_statistics_back(backend, device):
    """abort_step() after a SAM step's first_step(): mu, sigma^2 and the counts are as before,
    and taking the step again gives the uninterrupted run's numbers."""
    problem, weights = Problem(SMALL_SHAPES, 361), init_weights(SMALL_SHAPES, 361)
    case = Case(AESAM, {**RULE, "total_steps": 8}, (0.5, 1.5))
    runs = []
    for interrupt in (False, True):
        params, opt = build(case, "sgd", backend, [[w.to(device) for w in g] for g in weights])
        aborted = False
        for step in range(8):
            problem.set_grads(params, step)
            entry = opt.statistics
            sam = opt.first_step()
            if sam and interrupt and step > 0 and not aborted:
                assert opt.abort_step()
                assert opt.statistics == entry
                aborted = True
                problem.set_grads(params, step)
                sam = opt.first_step()
                assert sam
            if sam:
                problem.set_grads(params, step)
                opt.second_step()
        assert aborted or not interrupt
        runs.append((params, opt.statistics))
    (p1, e1), (p2, e2) = runs
    assert e1 == e2
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


@pytest.mark.parametrize("backend", backends_for("sam"))
def test_nonfinite_gradient_is_a_skipped_base_step(backend, device):
    """A NaN in the gradient: the step is skipped (weights, state unchanged), first_step()
    returns False, mu and sigma^2 stay, the step counts."""
    problem, weights = Problem(SMALL_SHAPES, 371), init_weights(SMALL_SHAPES, 371)
    case = Case(AESAM, {**RULE, "total_steps": 10}, (0.5, 1.5))
    params, opt = build(case, "sgd", backend, [[w.to(device) for w in g] for g in weights])
    drive(opt, params, problem, 3)
    problem.set_grads(params, 3)
    params[2].grad[0, 0] = float("nan")
    before = _snapshot(opt, params)
    assert opt.first_step() is False
    after = _snapshot(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[2].keys() == after[2].keys()
    assert all(torch.equal(before[2][i][k], after[2][i][k]) for i in before[2] for k in before[2][i])
    entry, old = opt.statistics, before[3]
    assert (entry["mean"], entry["var"], entry["sam_steps"]) == (old["mean"], old["var"], old["sam_steps"])
    assert entry["steps"] == old["steps"] + 1
    assert float(opt.skipped_steps) == 1


def test_grad_scaler_gives_the_unscaled_norm(device):
    """Under a GradScaler q is the unscaled ||g||^2: the same decisions and statistics."""
    problem, weights = Problem(SMALL_SHAPES, 381), init_weights(SMALL_SHAPES, 381)
    case = Case(AESAM, {**RULE, "total_steps": 6}, (0.5, 1.5))
    entries = []
    for scale in (None, 2.0**10):
        params, opt = build(case, "sgd", "reference", [[w.to(device) for w in g] for g in weights])
        scaler = (
            None if scale is None else torch.amp.GradScaler(device, init_scale=scale, growth_interval=100)
        )
        factor = 1.0 if scale is None else scale
        if scaler is not None:
            scaler.scale(torch.ones((), device=device))  # the scale tensor exists from here on
        for step in range(6):
            problem.set_grads(params, step)
            for p in params:
                p.grad.mul_(factor)
            if opt.first_step(grad_scaler=scaler):
                problem.set_grads(params, step)
                for p in params:
                    p.grad.mul_(factor)
                opt.second_step(grad_scaler=scaler)
            if scaler is not None:
                scaler.update()
        entries.append(opt.statistics)
    plain, scaled = entries
    assert plain["sam_steps"] == scaled["sam_steps"] and 0 < plain["sam_steps"] < 6
    assert rel(scaled["mean"], plain["mean"]) < 1e-6 and rel(scaled["var"], plain["var"]) < 1e-5


def test_cuda_graphs_are_refused(device):
    model = torch.nn.Linear(4, 2).to(device)
    opt = AESAM(model.parameters(), total_steps=10, lr=0.1, backend="reference")
    x, y = torch.randn(3, 4, device=device), torch.randn(3, 2, device=device)
    with pytest.raises(ValueError, match="AESAM reads"):
        GraphedSAMStep(model, torch.nn.functional.mse_loss, opt, x, y)


def test_threshold_scale_runs_from_lambda2_to_lambda1():
    opt = AESAM([torch.nn.Parameter(torch.ones(2))], total_steps=4, lambda1=-0.5, lambda2=2.0, lr=0.1)
    scales = [opt.policy.threshold_scale(t) for t in (0, 2, 4, 9)]
    assert scales == [2.0, 0.75, -0.5, -0.5]  # t / T capped at 1 past the planned end


def test_dcp_round_trip_is_bitwise(tmp_path):
    """torch.distributed.checkpoint (one process): the statistics travel in the "sam_fused"
    group entry; a freshly built model and optimizer continue as the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        opt = AESAM(model.parameters(), total_steps=10, delta=0.5, lr=0.1, momentum=0.9, backend="reference")
        return model, opt

    gen = torch.Generator().manual_seed(11)
    data = [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(6)]

    def train(model, opt, steps):
        for i in steps:
            x, y = data[i]
            torch.nn.functional.mse_loss(model(x), y).backward()
            if opt.first_step(zero_grad=True):
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.second_step(zero_grad=True)

    model, opt = make(0)
    train(model, opt, range(6))
    want, want_statistics = [p.detach().clone() for p in model.parameters()], opt.statistics
    model, opt = make(0)
    train(model, opt, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path)
    model, opt = make(1)
    model_sd, optim_sd = get_state_dict(model, opt)  # creates the state with a zero-gradient step()
    assert opt.statistics == {"mean": 0.0, "var": 0.0, "sam_steps": 0, "steps": 0}
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    assert opt.statistics["steps"] == 3
    train(model, opt, range(3, 6))
    assert opt.statistics == want_statistics and 0 < want_statistics["sam_steps"] < 6
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), want))
