"""The SAM family: USAM, ASAM, VaSSO, F-SAM, GCSAM, RSAM, GSAM, LookSAM, interval SAM.

Every numerical check compares the optimizer with an independent float64 simulation
written here from the formulas of docs/variants.md and the papers it cites (the reference
backend is under test, so nothing is imported from it), on fresh random inputs at awkward
sizes (1, 7, 4097 elements, a (33, 65) matrix and a (5, 3, 3, 3) conv kernel) spread over
two param groups with different rho and lr.

The loss is synthetic and deterministic, with a closed-form gradient that depends on the
point it is taken at (so the second pass really differs from the first)::

    L_t(w) = sum_p sum_i s_t,pi (1.5 w_pi - cos(3 w_pi) / 3)  +  0.5 (sum_p <b_p, w_p>)^2
    g_p(w) = s_t,p (1.5 + sin(3 w_p)) + (sum_q <b_q, w_q>) b_p

with a fresh s_t per step t (a new "minibatch"; both passes of a step share it), |s| in
[0.5, 1.5] with random signs, and b ~ N(0, 1/d). |g| stays above about 0.2, so Adam's first
update (m / sqrt(v) = sign(g)) is well conditioned and float32 vs float64 differences stay
at float32 rounding; the per-step s_t makes Adam's later updates depend on the gradients'
details (with a fixed s, Adam is nearly sign descent and hides a wrong perturbation). The
gradient is evaluated in float64 at the optimizer's own (float32) weights and rounded to the
parameter dtype; the simulation evaluates it in float64 at its own weights.

Each float64 comparison also checks that a plausible wrong implementation (a "mutant" of
the simulation: SAM instead of the variant, GC in the ascent only, RSAM's eps added to
w + delta, LookSAM's reuse steps without g_v) lands far outside the tolerance.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import pytest
import torch
from conftest import backends_for, in_place_parameter, split_backend, table_backends_for

from sam_fused import ASAM, FSAM, GCSAM, GSAM, RSAM, SAM, USAM, IntervalSAM, Lion, LookSAM, VaSSO

SHAPES = (((1,), (7,), (33, 65)), ((4097,), (5, 3, 3, 3)))  # group 0, group 1
SMALL_SHAPES = (((1,), (7,), (6, 5)), ((37,), (3, 2, 2, 2)))  # for the bit-exact API tests
NORM_EPS = 1e-12
PER_STEP_BUFFERS = ("backup", "first_grad", "rsam_delta", "old_p", "old_g")

# base optimizers: (class, constructor kwargs = group 0's values, group 1's overrides)
BASES = {
    "sgd": (
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
        dict(lr=0.02, weight_decay=4e-3),
    ),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05), dict(lr=3e-3, weight_decay=0.02)),
    "lion": (Lion, dict(lr=2e-3, weight_decay=0.1), dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=0.2)),
}


@dataclass
class Case:
    """A variant under test: its class, its options, the two groups' rho, its simulation."""

    cls: type
    options: dict = field(default_factory=dict)
    rhos: tuple[float, float] = (0.5, 1.5)
    sim: str = ""  # the simulation's name for it
    mutant: tuple[str, dict, str | None] = ("sam", {}, None)  # a plausible wrong implementation
    tol: float = 1e-5  # max |w - w64| / max(1, |w64|) over the run
    steps: int = 4  # enough for VaSSO's / F-SAM's first-step rule and three EMA updates


# Options differ from the defaults where that makes a wrong option plumbing visible. rho is
# large (for the size of the gradient norm, about 100) so that the perturbation changes the
# gradient well beyond float32 rounding; USAM's unnormalized eps = rho g needs a small one.
# RSAM's lam is small so that delta and lam * g_hat have comparable norms.
CASES = {
    "usam": Case(USAM, {}, (0.01, 0.03), "usam"),
    "asam": Case(ASAM, {"eta": 0.01}, (0.5, 1.5), "asam"),
    "vasso": Case(VaSSO, {"theta": 0.4}, (0.5, 1.5), "vasso"),
    "fsam": Case(
        FSAM,
        {"sigma": 0.8, "lam": 0.6},
        (0.5, 1.5),
        "fsam",
        ("fsam", {"sigma": 0.8, "lam": 0.6}, "m_from_zero"),
    ),
    "gcsam": Case(GCSAM, {}, (0.5, 1.5), "gcsam", ("gcsam", {}, "ascent_only_gc"), steps=3),
    "rsam": Case(RSAM, {"lam": 0.02, "seed": 7}, (0.5, 1.5), "rsam", ("rsam", {"lam": 0.02}, "from_noisy")),
    "gsam": Case(GSAM, {"alpha": 0.3}, (0.5, 1.5), "gsam"),
    # LookSAM's reuse direction g + alpha (||g|| / ||g_v||) g_v multiplies the float32 error of
    # g_v (a difference of nearly parallel vectors: rounding of g, g_p and w + eps) by
    # alpha ||g|| / ||g_v|| (about 20-50 here), and SGD's momentum accumulates it over the
    # reuse steps: observed 5e-6 to 1e-5, so the bound is 3e-5 (the mutant is off by ~1).
    "looksam": Case(
        LookSAM, {"k": 3, "alpha": 0.7}, (1.5, 3.0), "looksam", ("interval", {"k": 3}, None), 3e-5, 7
    ),
    "interval": Case(IntervalSAM, {"k": 3}, (0.5, 1.5), "interval", steps=7),
}
# LookSAM / interval SAM run 7 steps with k = 3: full steps 0, 3, 6; reuse steps 1, 2, 4, 5.
# GCSAM runs 3 (its row kernel is slow in the Triton interpreter; it keeps no state).


# ---------------------------------------------------------------------------- problem
class Problem:
    """The synthetic loss above; each step is a new "minibatch" (fresh ``s``), drawn from ``seed``."""

    def __init__(self, shapes, seed: int) -> None:
        self.shapes = [s for group in shapes for s in group]
        self.seed = seed
        total = sum(math.prod(s) for s in self.shapes)
        gen = torch.Generator().manual_seed(seed)
        self.b = [torch.randn(s, generator=gen, dtype=torch.float64) / math.sqrt(total) for s in self.shapes]
        self._s: dict[int, list[torch.Tensor]] = {}

    def s(self, step: int) -> list[torch.Tensor]:
        if step not in self._s:
            gen = torch.Generator().manual_seed(self.seed * 1000 + step + 1)
            out = []
            for shape in self.shapes:
                sign = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
                out.append(sign * (0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)))
            self._s[step] = out
        return self._s[step]

    def grad64(self, ws: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        dev = ws[0].device
        b = [x.to(dev) for x in self.b]
        coupling = sum((bi * w).sum() for bi, w in zip(b, ws))
        return [s.to(dev) * (1.5 + torch.sin(3 * w)) + coupling * bi for s, bi, w in zip(self.s(step), b, ws)]

    def set_grads(self, params: list[torch.Tensor], step: int) -> None:
        """p.grad = g(p) (exact, rounded to p's dtype), written into the existing grad."""
        grads = self.grad64([p.detach().double() for p in params], step)
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.copy_(g)

    def loss(self, params: list[torch.Tensor], step: int) -> torch.Tensor:
        """The same loss for autograd (closure tests), in the parameters' dtype."""
        total = 0
        coupling = 0
        for s, b, p in zip(self.s(step), self.b, params):
            s, b = s.to(p), b.to(p)
            total = total + (s * (1.5 * p - torch.cos(3 * p) / 3)).sum()
            coupling = coupling + (b * p).sum()
        return total + 0.5 * coupling**2


def init_weights(shapes, seed: int, dtype=torch.float32) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in group] for group in shapes]


def build(case: Case, base: str, backend: str, weights, dtype=torch.float32, **extra):
    """Fresh parameters (copies of ``weights``) in two groups and the variant's optimizer
    (``"<backend>-table"``: offset views of larger storages, at unaligned addresses)."""
    base_cls, kw, kw1 = BASES[base]
    backend, in_place = split_backend(backend)
    if in_place:
        groups = [[in_place_parameter(w.to(dtype)) for w in group] for group in weights]
    else:
        groups = [[w.clone().to(dtype).requires_grad_() for w in group] for group in weights]
    opt = case.cls(
        [{"params": groups[0]}, {"params": groups[1], "rho": case.rhos[1], **kw1}],
        base_cls,
        rho=case.rhos[0],
        backend=backend,
        **{**case.options, **extra},
        **kw,
    )
    if in_place:  # the multi-tensor kernels run them, not the reference
        assert {b.backend.name for b in opt._engine.buckets} == {backend}
    return groups[0] + groups[1], opt


# ---------------------------------------------------------------------------- float64 simulation
def gnorm(ts) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in ts))


def gdot(a, b) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def centralize(g: torch.Tensor) -> torch.Tensor:
    if g.dim() <= 1:
        return g
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)


class BaseSim:
    """torch.optim.SGD / AdamW and Lion (the authors' update), textbook form, float64
    (checked against torch.optim and sam_fused.Lion below)."""

    def __init__(self, base: str, hps: list[dict], n: int) -> None:
        self.base, self.hps = base, hps
        self.buf: list[torch.Tensor | None] = [None] * n
        self.m: list[torch.Tensor | None] = [None] * n
        self.v: list[torch.Tensor | None] = [None] * n
        self.t = [0] * n

    def update(self, i: int, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        hp = self.hps[i]
        if self.base == "sgd":
            d = d + hp["weight_decay"] * w
            if hp.get("momentum", 0):
                prev = self.buf[i]
                self.buf[i] = d.clone() if prev is None else hp["momentum"] * prev + d
                d = self.buf[i]
            return w - hp["lr"] * d
        if self.base == "lion":  # w (1 - lr wd) - lr sign(beta1 m + (1 - beta1) d); m <- beta2 m + ...
            beta1, beta2 = hp.get("betas", (0.9, 0.99))
            m = torch.zeros_like(w) if self.m[i] is None else self.m[i]
            w = w * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] * torch.sign(beta1 * m + (1 - beta1) * d)
            self.m[i] = beta2 * m + (1 - beta2) * d
            return w
        beta1, beta2 = hp.get("betas", (0.9, 0.999))
        eps = hp.get("eps", 1e-8)
        self.t[i] += 1
        t = self.t[i]
        if self.m[i] is None:
            self.m[i], self.v[i] = torch.zeros_like(w), torch.zeros_like(w)
        w = w * (1 - hp["lr"] * hp["weight_decay"])
        self.m[i] = beta1 * self.m[i] + (1 - beta1) * d
        self.v[i] = beta2 * self.v[i] + (1 - beta2) * d * d
        m_hat = self.m[i] / (1 - beta1**t)
        v_hat = self.v[i] / (1 - beta2**t)
        return w - hp["lr"] * m_hat / (torch.sqrt(v_hat) + eps)


class Sim:
    """One variant, step by step, in float64, from the formulas of docs/variants.md.

    ``quirk`` makes a deliberately wrong version (the mutants that show the test can fail).
    """

    def __init__(self, name, options, problem, weights, rhos, base, quirk=None) -> None:
        self.name, self.o, self.problem, self.quirk = name, options, problem, quirk
        self.w = [w.double().clone() for group in weights for w in group]
        self.group = [gi for gi, group in enumerate(weights) for _ in group]
        self.rho = [rhos[gi] for gi in self.group]
        _, kw, kw1 = BASES[base]
        self.base = BaseSim(base, [kw if gi == 0 else {**kw, **kw1} for gi in self.group], len(self.w))
        self.index = 0
        self.d = None  # VaSSO
        # F-SAM: the official code starts m at g; the mutant "m_from_zero" starts it at 0
        self.m = [torch.zeros_like(w) for w in self.w] if quirk == "m_from_zero" else None
        self.gv = None  # LookSAM

    def grad(self, ws):
        return self.problem.grad64(ws, self.index)

    def descend(self, d) -> None:
        self.w = [self.base.update(i, w, di) for i, (w, di) in enumerate(zip(self.w, d))]

    def step(self, delta=None) -> bool:
        name, o = self.name, self.o
        full = name not in ("looksam", "interval") or self.index % o["k"] == 0
        try:
            return self._step(full, delta)
        finally:
            self.index += 1

    def _step(self, full, delta) -> bool:
        name, o, w = self.name, self.o, self.w
        if not full:  # one pass
            g = self.grad(w)
            if name == "looksam":
                scale = gnorm(g) / gnorm(self.gv)
                g = [gi + o["alpha"] * scale * gvi for gi, gvi in zip(g, self.gv)]
            self.descend(g)
            return False
        if name == "rsam":
            g = self.grad([wi + di for wi, di in zip(w, delta)])
            v = [di + o["lam"] * gi for di, gi in zip(delta, g)]
        else:
            g = self.grad(w)
            if name == "gcsam":
                g = [centralize(gi) for gi in g]
            v = g
            if name == "vasso":
                theta = o["theta"]
                self.d = g if self.d is None else [(1 - theta) * d + theta * gi for d, gi in zip(self.d, g)]
                v = self.d
            elif name == "fsam":  # v = g - sigma m with last step's m, then the EMA; v = m = g at first
                if self.m is None:
                    v, self.m = g, g
                else:
                    v = [gi - o["sigma"] * mi for gi, mi in zip(g, self.m)]
                    self.m = [o["lam"] * mi + (1 - o["lam"]) * gi for mi, gi in zip(self.m, g)]
        if name == "asam":  # eps = rho T^2 g / ||T g||, T = |w| + eta
            t = [wi.abs() + o["eta"] for wi in w]
            norm = gnorm([ti * vi for ti, vi in zip(t, v)])
            eps = [r * ti * ti * vi / (norm + NORM_EPS) for r, ti, vi in zip(self.rho, t, v)]
        elif name == "usam":
            eps = [r * vi for r, vi in zip(self.rho, v)]
        else:
            norm = gnorm(v)
            eps = [r * vi / (norm + NORM_EPS) for r, vi in zip(self.rho, v)]
        origin = [wi + di for wi, di in zip(w, delta)] if self.quirk == "from_noisy" else w
        gp = self.grad([wi + ei for wi, ei in zip(origin, eps)])
        if name == "gcsam" and self.quirk != "ascent_only_gc":
            gp = [centralize(x) for x in gp]
        if name == "gsam":
            coef = gdot(g, gp) / gdot(gp, gp)
            gp = [x - o["alpha"] * (gi - coef * x) for x, gi in zip(gp, g)]
        elif name == "looksam":
            coef = gdot(gp, g) / gdot(g, g)
            self.gv = [x - coef * gi for x, gi in zip(gp, g)]
        self.descend(gp)
        return True

    def variant_state(self) -> tuple[str, list[torch.Tensor]] | None:
        if self.name == "vasso":
            return "vasso_d", self.d
        if self.name == "fsam":
            return "fsam_m", self.m
        if self.name == "looksam":
            return "looksam_gv", self.gv
        return None


def copy64(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy (``.double().cpu()`` of a float64 CPU tensor would be the tensor itself)."""
    return t.detach().to("cpu", torch.float64, copy=True)


def drive(opt, params, problem, steps, noise=False, check_reuse=True):
    """The manual loop; records (perturbed, delta read back, weights, variant state)."""
    name_state = type(opt).__name__
    records = []
    for step in range(steps):
        delta = None
        if noise:
            before = [copy64(p) for p in params]
            opt.noise_step()
            delta = [copy64(p) - b for p, b in zip(params, before)]
        expect_perturb = opt.perturbs_this_step
        problem.set_grads(params, step)
        perturbed = opt.first_step()
        if check_reuse:
            assert perturbed is expect_perturb, f"{name_state} step {step}: first_step returned {perturbed}"
        if perturbed:
            problem.set_grads(params, step)
            opt.second_step()
        state = {
            k: [copy64(opt.state[p][k]) for p in params]
            for k in ("vasso_d", "fsam_m", "looksam_gv")
            if k in opt.state[params[0]]
        }
        records.append((perturbed, delta, [copy64(p) for p in params], state))
    return records


def simulate(case: Case, problem, weights, base, records, mutant=False):
    """Replay the run in float64 (RSAM: with the delta read back from the optimizer)."""
    if mutant:
        name, options, quirk = case.mutant
        options = {**case.options, **options}
    else:
        name, options, quirk = case.sim, dict(case.options), None
    sim = Sim(name, options, problem, weights, case.rhos, base, quirk)
    out = []
    for _, delta, *_ in records:
        out.append((sim.step(delta), [w.clone() for w in sim.w], sim.variant_state()))
    return out


def max_rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max |got - want| / max(1, |want|) elementwise: relative, with O(1) values' scale."""
    return max(float(((a - b).abs() / b.abs().clamp_min(1.0)).max()) for a, b in zip(got, want))


# ---------------------------------------------------------------------------- 0. the simulation's base
@pytest.mark.parametrize("base", sorted(BASES))
def test_simulated_base_update_is_torch_optim(base):
    """The float64 base update used below is torch.optim's own (validates the simulation)."""
    base_cls, kw, kw1 = BASES[base]
    gen = torch.Generator().manual_seed(11)
    ws = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((7,), (4, 3))]
    params = [w.clone().requires_grad_() for w in ws]
    extra = {} if base_cls is Lion else {"foreach": False}
    ref = base_cls([{"params": params[:1]}, {"params": params[1:], **kw1}], **extra, **kw)
    sim = BaseSim(base, [kw, {**kw, **kw1}], 2)
    for _ in range(5):
        grads = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in ws]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        ref.step()
        ws = [sim.update(i, w, g) for i, (w, g) in enumerate(zip(ws, grads))]
        for p, w in zip(params, ws):
            torch.testing.assert_close(p.detach(), w, rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------------------- 1. against float64
# The table of (variant, base, options) cases, run on every backend that declares it runs the
# variant: reference, Triton (interpreter), cpp and the CUDA source (emulated on the CPU), and
# each fused backend again over table buckets ("<backend>-table": parameters left in place).
# float32 vs float64 over 7 steps: observed errors are 5e-7 to 1e-6 relative to max(1, |w|)
# for every variant but LookSAM (see CASES); the bound is 1e-5. The backends that take float64
# parameters run again in float64, to float64 rounding (FLOAT64_TOL).
FLOAT64_TOL = 1e-11
TABLE = [
    pytest.param(name, base, backend, dtype, id=f"{backend}-{name}-{base}{label}")
    for name in sorted(CASES)
    for base in sorted(BASES)
    for dtype, label in ((torch.float32, ""), (torch.float64, "-f64"))
    for backend in backends_for("sam" if name == "asam" else name, dtype)
    + table_backends_for("sam" if name == "asam" else name, dtype)
]


@pytest.mark.parametrize("name,base,backend,dtype", TABLE)
def test_variant_matches_float64_textbook(name, base, backend, dtype, device):
    case = CASES[name]
    tol = case.tol if dtype == torch.float32 else FLOAT64_TOL
    seed = 100 + sorted(CASES).index(name) * 2 + sorted(BASES).index(base)
    problem = Problem(SHAPES, seed)
    weights = init_weights(SHAPES, seed)
    params, opt = build(case, base, backend, [[w.to(device) for w in g] for g in weights], dtype)
    records = drive(opt, params, problem, case.steps, noise=name == "rsam")
    expected = simulate(case, problem, weights, base, records)
    for step, ((perturbed, _, got, state), (want_perturbed, want, want_state)) in enumerate(
        zip(records, expected)
    ):
        assert perturbed == want_perturbed, f"step {step}: perturbed {perturbed}, expected {want_perturbed}"
        err = max_rel_error([g.cpu() for g in got], want)
        assert err <= tol, f"{name}/{base}/{backend} step {step}: weights off by {err:.3g}"
        if want_state is not None:
            key, tensors = want_state
            err = max_rel_error([t.cpu() for t in state[key]], tensors)
            assert err <= tol, f"{name} step {step}: {key} off by {err:.3g}"
    # the comparison can fail: a plausible wrong implementation is far outside the tolerance
    wrong = simulate(case, problem, weights, base, records, mutant=True)
    err = max_rel_error([g.cpu() for g in records[-1][2]], wrong[-1][1])
    assert err > 30 * tol, f"the test cannot tell {name} from its mutant {case.mutant} ({err:.3g})"


def test_variant_perturbation_state_first_steps(backend, device):
    """VaSSO's d and F-SAM's m after the first step: d = g, m = g (F-SAM's official code)."""
    problem = Problem(SMALL_SHAPES, 5)
    weights = init_weights(SMALL_SHAPES, 5)
    for cls, key, expect in (
        (VaSSO, "vasso_d", lambda g: g),
        (FSAM, "fsam_m", lambda g: g),
    ):
        case = Case(cls, {"theta": 0.4} if cls is VaSSO else {"sigma": 0.8, "lam": 0.6})
        params, opt = build(case, "sgd", backend, [[w.to(device) for w in g] for g in weights])
        g = problem.grad64([p.detach().double().cpu() for p in params], 0)
        records = drive(opt, params, problem, 1)
        for got, gi in zip(records[0][3][key], g):
            torch.testing.assert_close(got, expect(gi), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backends_for("gcsam"))
def test_gcsam_centralizes_both_passes_in_place(backend, device):
    """Gradients of 2+ dims lose their per-row mean (all dims but the first), in place, in
    both passes; 1-D gradients are left as they are (docs/variants.md)."""
    weights = init_weights(SHAPES, 9)
    problem = Problem(SHAPES, 9)
    params, opt = build(CASES["gcsam"], "sgd", backend, [[w.to(device) for w in g] for g in weights])
    for pass_ in (1, 2):
        raw = problem.grad64([p.detach().double() for p in params], 0)
        problem.set_grads(params, 0)
        if pass_ == 1:
            opt.first_step()
        else:
            opt.second_step()
        for p, g in zip(params, raw):
            want = centralize(g.float().double())
            torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=1e-6, msg=f"pass {pass_}")
            if p.dim() == 1:
                assert torch.equal(p.grad, g.float()), f"pass {pass_}: a 1-D gradient was changed"


# ---------------------------------------------------------------------------- 1b. RSAM's noise
@pytest.mark.parametrize("noise_std", [None, 0.01])
def test_rsam_noise_std_and_seed(noise_std, backend, device):
    """delta ~ N(0, std^2): default std = rho_group / sqrt(d); same seed, same delta."""
    weights = init_weights(SHAPES, 3)
    case = Case(RSAM, {"seed": 5, "noise_std": noise_std}, (0.5, 1.5))
    total = sum(math.prod(s) for g in SHAPES for s in g)

    def draw(seed, which_backend):
        params, opt = build(
            case, "sgd", which_backend, [[w.to(device) for w in g] for g in weights], seed=seed
        )
        before = [p.detach().clone() for p in params]
        opt.noise_step()
        return [(p.detach() - b).cpu() for p, b in zip(params, before)]

    delta = draw(5, backend)
    split = len(SHAPES[0])
    for gi, part in enumerate((delta[:split], delta[split:])):
        flat = torch.cat([d.flatten().double() for d in part])
        std = case.rhos[gi] / math.sqrt(total) if noise_std is None else noise_std
        n = flat.numel()
        assert abs(float(flat.std()) / std - 1) < 5 / math.sqrt(2 * n), f"group {gi}: std {flat.std()}"
        assert abs(float(flat.mean())) < 5 * std / math.sqrt(n)
    again = draw(5, backend)
    assert all(torch.equal(a, b) for a, b in zip(delta, again)), "same seed, different delta"
    other = draw(6, backend)
    assert not any(torch.equal(a, b) for a, b in zip(delta[2:], other[2:])), "the seed is ignored"
    if backend == "triton":
        reference = draw(5, "reference")
        assert all(torch.equal(a, b) for a, b in zip(delta, reference)), "backends draw different deltas"


@pytest.mark.parametrize("backend", backends_for("rsam"))
def test_rsam_restores_unperturbed_parameters(backend, device):
    """A parameter without gradient loses its noise at first_step (it takes no part)."""
    weights = init_weights(SMALL_SHAPES, 8)
    params, opt = build(CASES["rsam"], "sgd", backend, [[w.to(device) for w in g] for g in weights])
    problem = Problem(SMALL_SHAPES, 8)
    opt.noise_step()
    assert not torch.equal(params[1].detach().cpu(), weights[0][1])
    problem.set_grads(params, 0)
    params[1].grad = None
    opt.first_step()
    assert torch.equal(params[1].detach().cpu(), weights[0][1])
    problem.set_grads(params, 0)
    params[1].grad = None
    opt.second_step()
    assert torch.equal(params[1].detach().cpu(), weights[0][1])


# ---------------------------------------------------------------------------- 2. reference vs fused
def ulps(a: torch.Tensor, b: torch.Tensor, floor: float) -> float:
    """max |a - b| in units of a's dtype spacing at max(|a|, |b|, floor)."""
    bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[a.dtype]
    scale = torch.maximum(a.abs(), b.abs()).double().clamp_min(floor)
    spacing = 2.0 ** (torch.floor(torch.log2(scale)) - bits)
    return float(((a.double() - b.double()).abs() / spacing).max())


def feed(problem, step, source, *targets) -> None:
    """Give every optimizer the gradient at ``source``'s point (the reference's)."""
    grads = problem.grad64([p.detach().double() for p in source], step)
    for params in (source, *targets):
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.copy_(g)


# Tolerances in units of the dtype's spacing. Weights are measured at max(|w|, 1) (they are
# O(1)); state tensors at max(|x|, 4), 4 being the gradients' scale (momentum, Adam's m and
# the variants' d, m, g_v are combinations of gradients, and near-zero entries come from
# cancellation). fp32: the backends differ only in reduction order (observed <= 1 ulp in the
# weights, <= 2 in LookSAM's g_v); 8 ulps is 1e-6. bf16: the Triton interpreter rounds
# fp32 -> bf16 toward zero where the reference (and compiled GPU code) rounds to nearest, so
# every bf16 store may differ by one ulp, and GCSAM's in-place centralized gradient is one
# more bf16 store before the update (observed: weights 1 ulp, state <= 2 ulps). Without the
# re-sync the bf16 runs drift apart by ~2 ulps per step (truncation is biased toward zero).
AGREE = {torch.float32: (8, 8), torch.bfloat16: (2, 3)}


@pytest.mark.parametrize(
    "name, dtype, fused",
    [
        pytest.param(name, dtype, fused, id=f"{name}-{label}-{fused}")
        for name in sorted(CASES)
        for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
        for fused in backends_for("sam" if name == "asam" else name, dtype, fused_only=True)
    ],
)
def test_fused_backend_matches_reference(name, dtype, fused, device):
    """Both backends step in lockstep on the same gradients (the reference's); after each
    step the weights and every state tensor agree, then the fused optimizer is re-synced
    from the reference's checkpoint so differences cannot compound (which also loads a
    reference checkpoint into the fused layout on every step)."""
    case = CASES[name]
    seed = 300 + sorted(CASES).index(name)
    problem = Problem(SHAPES, seed)
    weights = init_weights(SHAPES, seed, dtype=dtype)
    base = "adamw" if name in ("asam", "fsam", "gsam", "looksam") else "sgd"
    (ref, opt_r), (tri, opt_t) = (
        build(case, base, backend, [[w.to(device) for w in g] for g in weights], dtype)
        for backend in ("reference", fused)
    )
    w_tol, s_tol = AGREE[dtype]
    for step in range(4):  # LookSAM / interval SAM: full, reuse, reuse, full
        if name == "rsam":
            opt_r.noise_step()
            opt_t.noise_step()
            for a, b in zip(ref, tri):
                assert torch.equal(a, b), f"step {step}: the backends drew different noise"
        feed(problem, step, ref, tri)
        perturbed = opt_r.first_step()
        assert opt_t.first_step() is perturbed
        if perturbed:
            for a, b in zip(ref, tri):
                assert ulps(a.detach(), b.detach(), 1.0) <= w_tol, f"step {step}: w + eps"
            feed(problem, step, ref, tri)
            opt_r.second_step()
            opt_t.second_step()
        for i, (a, b) in enumerate(zip(ref, tri)):
            err = ulps(a.detach(), b.detach(), 1.0)
            assert err <= w_tol, f"{name} step {step} param {i}: {err} ulps"
            keys = set(opt_r.state[a]) - {"step"}
            assert keys == set(opt_t.state[b]) - {"step"}, f"step {step}: state keys differ"
            for k in keys:
                err = ulps(opt_r.state[a][k], opt_t.state[b][k], 4.0)
                assert err <= s_tol, f"{name} step {step} param {i}: state {k} off by {err} ulps"
            if "step" in opt_r.state[a]:
                assert float(opt_r.state[a]["step"]) == float(opt_t.state[b]["step"])
        checkpoint = opt_r.state_dict()
        with torch.no_grad():
            for a, b in zip(ref, tri):
                b.copy_(a)
        opt_t.load_state_dict(checkpoint)


# ---------------------------------------------------------------------------- 3. checkpoints
RESUME = {
    "vasso": (VaSSO, {"theta": 0.4}, ("vasso_d",)),
    "fsam": (FSAM, {"sigma": 0.8, "lam": 0.6}, ("fsam_m",)),
    "looksam": (LookSAM, {"k": 3, "alpha": 0.7}, ("looksam_gv",)),
    "rsam": (RSAM, {"lam": 0.5, "seed": 3}, ()),
}


class Model(torch.nn.Module):
    def __init__(self, shapes, seed: int) -> None:
        super().__init__()
        weights = init_weights(shapes, seed)
        self.g0 = torch.nn.ParameterList([torch.nn.Parameter(w) for w in weights[0]])
        self.g1 = torch.nn.ParameterList([torch.nn.Parameter(w) for w in weights[1]])


def make_resumable(name, base, backend, device, seed, rsam_seed=3):
    cls, options, _ = RESUME[name]
    if name == "rsam":
        options = {**options, "seed": rsam_seed}
    base_cls, kw, kw1 = BASES[base]
    model = Model(SMALL_SHAPES, seed).to(device)
    opt = cls(
        [{"params": model.g0.parameters()}, {"params": model.g1.parameters(), "rho": 0.3, **kw1}],
        base_cls,
        rho=0.1,
        backend=backend,
        **options,
        **kw,
    )
    return model, opt


def run_steps(model, opt, problem, steps) -> None:
    params = list(model.parameters())
    for step in steps:
        if isinstance(opt, RSAM):
            opt.noise_step()
        problem.set_grads(params, step)
        if opt.first_step(zero_grad=True):
            problem.set_grads(params, step)
            opt.second_step(zero_grad=True)


@pytest.mark.parametrize(
    "name, base",
    [("vasso", "sgd"), ("fsam", "adamw"), ("looksam", "sgd"), ("looksam", "adamw"), ("rsam", "adamw")],
)
def test_resume_mid_run_is_bit_exact(name, base, backend, device):
    """N steps in one run (its checkpoint serialized at step k on the way) equal k steps, a
    fresh model and optimizer built differently, both state dicts loaded, N - k more steps."""
    problem = Problem(SMALL_SHAPES, 21)
    total, split = 7, 4  # LookSAM k = 3: resumes on a reuse step (4), then 5 and the full step 6
    model, opt = make_resumable(name, base, backend, device, seed=1)
    run_steps(model, opt, problem, range(split))
    checkpoint = opt.state_dict()
    persistent = RESUME[name][2]
    for i, st in checkpoint["state"].items():
        for key in persistent:
            assert key in st, f"param {i}: {key} is missing from state_dict()"
        for key in PER_STEP_BUFFERS:
            assert key not in st, f"param {i}: per-step buffer {key} was saved"
    for group in checkpoint["param_groups"]:  # sam_fused's own entry rides in every group
        assert group["sam_fused"]["step_index"] == split
        if name == "rsam":
            assert group["sam_fused"]["generator"] is not None
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": checkpoint}, buffer)  # serialized now
    run_steps(model, opt, problem, range(split, total))
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    final_state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, opt2 = make_resumable(name, base, backend, device, seed=99, rsam_seed=1234)  # all differs
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    run_steps(model2, opt2, problem, range(split, total))
    for p, want in zip(model2.parameters(), uninterrupted):
        assert torch.equal(p.detach(), want), f"{name}/{backend}: the resumed run differs"
    for p, want in zip(model2.parameters(), final_state):
        assert set(opt2.state[p]) == set(want)
        for key, value in want.items():
            assert torch.equal(opt2.state[p][key], value), f"{name}/{backend}: state {key} differs"


# ---------------------------------------------------------------------------- 4. errors
def small_params(device="cpu"):
    weights = init_weights(SMALL_SHAPES, 0)
    return [w.to(device).requires_grad_() for g in weights for w in g]


def test_rsam_first_step_needs_noise_step(backend, device):
    params = small_params(device)
    opt = RSAM(params, lr=0.1, backend=backend)
    Problem(SMALL_SHAPES, 0).set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="noise_step"):
        opt.first_step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    opt.noise_step()
    with pytest.raises(RuntimeError, match="noise_step"):
        opt.noise_step()  # twice in a row


@pytest.mark.parametrize("cls", [SAM, VaSSO, LookSAM, GSAM])
def test_noise_step_belongs_to_rsam(cls, device):
    params = small_params(device)
    opt = cls(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="RSAM"):
        opt.noise_step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_unknown_variant_option_is_refused(device):
    params = small_params(device)
    with pytest.raises(TypeError, match="bogus"):
        SAM(params, variant="vasso", variant_options={"bogus": 1}, lr=0.1)
    with pytest.raises(TypeError, match="theta"):
        SAM(params, variant="sam", variant_options={"theta": 0.5}, lr=0.1)
    with pytest.raises(TypeError, match="bogus"):  # class keywords it does not know reach SGD
        VaSSO(params, bogus=1, lr=0.1)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: VaSSO(p, theta=1.5, lr=0.1),
        lambda p: VaSSO(p, theta=-0.1, lr=0.1),
        lambda p: FSAM(p, lam=1.2, lr=0.1),
        lambda p: FSAM(p, sigma=-1.0, lr=0.1),
        lambda p: LookSAM(p, k=0, lr=0.1),
        lambda p: LookSAM(p, k=2.5, lr=0.1),
        lambda p: LookSAM(p, alpha=-0.1, lr=0.1),
        lambda p: IntervalSAM(p, k=0, lr=0.1),
        lambda p: IntervalSAM(p, k=-3, lr=0.1),
        lambda p: GSAM(p, alpha=-1.0, lr=0.1),
        lambda p: RSAM(p, noise_std=-0.1, lr=0.1),
        lambda p: RSAM(p, lam=-1.0, lr=0.1),
        lambda p: SAM(p, variant="vasso", variant_options={"theta": 2.0}, lr=0.1),
    ],
    ids=lambda f: "",
)
def test_invalid_option_values_are_refused(make, device):
    with pytest.raises(ValueError):
        make(small_params(device))


@pytest.mark.parametrize("cls", [GSAM, LookSAM])
def test_descent_variants_need_a_fusable_base(cls, backend, device):
    """GSAM and LookSAM change the descent gradient, which is fused into SGD/Adam/AdamW/Lion only:
    RMSprop is refused when the optimizer is built, and so is a group added later."""
    params = small_params(device)
    with pytest.raises(ValueError, match=r"torch\.optim\.SGD, .*AdamW and sam_fused\.Lion only"):
        cls(params, torch.optim.RMSprop, lr=0.01, backend=backend)
    opt = cls(params[:2], torch.optim.SGD, lr=0.01, backend=backend)
    with pytest.raises(ValueError, match=r"param group 1"):
        opt.add_param_group({"params": params[2:], "differentiable": True})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1


@pytest.mark.parametrize("cls", [SAM, VaSSO])
def test_step_after_a_second_pass_skip_perturbs_again(cls, backend, device):
    """A skip found in the second pass must not leak into the next step: its first pass
    perturbs to w + rho g / ||g|| (float64 formula) as usual."""
    params = small_params(device)
    opt = cls(params, torch.optim.SGD, rho=0.3, lr=0.05, backend=backend)
    problem = Problem(SMALL_SHAPES, 5)
    problem.set_grads(params, 0)
    opt.first_step()
    problem.set_grads(params, 0)
    params[1].grad[2] = float("nan")
    opt.second_step()
    assert int(opt.skipped_steps) == 1
    before = [p.detach().double().clone() for p in params]
    problem.set_grads(params, 1)
    grads = [p.grad.double().clone() for p in params]
    opt.first_step()
    norm = gnorm(grads)  # VaSSO's first update: d = g, so both expect rho g / ||g||
    for p, w, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach().double(), w + 0.3 * g / norm, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [GSAM, LookSAM])
def test_refused_base_leaves_weights_unperturbed(cls, backend, device):
    """The refusal must not leave the model at w + eps (and the optimizer stuck mid-step)."""
    params = small_params(device)
    before = [p.detach().clone() for p in params]
    problem = Problem(SMALL_SHAPES, 0)
    with pytest.raises(ValueError, match="changes the descent gradient"):
        opt = cls(params, torch.optim.RMSprop, lr=0.01, backend=backend)
        problem.set_grads(params, 0)
        if opt.first_step(zero_grad=True):
            problem.set_grads(params, 0)
            opt.second_step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b), "the refused step left the weights perturbed"


def snapshot(opt, params):
    from sam_fused import status as S

    state = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params]
    return [p.detach().clone() for p in params], state, float(opt._engine.status[S.GV2])


def assert_same(opt, params, snap, what):
    from sam_fused import status as S

    weights, state, gv2 = snap
    for p, w in zip(params, weights):
        assert torch.equal(p.detach(), w), f"{what}: a skipped step changed a parameter"
    for p, st in zip(params, state):
        now = {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)}
        assert set(now) == set(st), f"{what}: the state keys changed"
        for k, v in st.items():
            assert torch.equal(now[k], v), f"{what}: a skipped step changed state {k}"
    assert float(opt._engine.status[S.GV2]) == gv2, f"{what}: ||g_v||^2 changed"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in numpy
@pytest.mark.parametrize(
    "name, bad_pass, backend",
    [
        (n, p, b)
        for n, p in [(n, p) for n in ("vasso", "fsam", "looksam") for p in ("first", "second")]
        + [("looksam", "reuse")]
        for b in backends_for(n)
    ],
)
def test_nonfinite_gradient_skips_variant_state(name, bad_pass, backend, device):
    """A NaN/inf in either pass (or in LookSAM's one-pass reuse step) skips the whole step:
    weights, base state and the variant's persistent state stay bitwise as they were."""
    cls, options, persistent = RESUME[name]
    params = small_params(device)
    opt = cls(params, torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9, backend=backend, **options)
    problem = Problem(SMALL_SHAPES, 2)
    # LookSAM, k = 3: steps 0 and 3 are full. Reach a full step (3) or a reuse step (4).
    warmup = 4 if bad_pass == "reuse" else 3 if name == "looksam" else 2
    for step in range(warmup):
        problem.set_grads(params, step)
        if opt.first_step():
            problem.set_grads(params, step)
            opt.second_step()
    for key in persistent:
        assert key in opt.state[params[0]]
    snap = snapshot(opt, params)
    skipped = int(opt.skipped_steps)
    problem.set_grads(params, warmup)
    if bad_pass in ("first", "reuse"):
        params[3].grad[5] = float("nan")
    perturbed = opt.first_step()
    assert perturbed is (bad_pass != "reuse")
    if bad_pass == "first":  # nothing moved already after the first pass (no revert needed)
        assert_same(opt, params, snap, f"{name}/first, before second_step")
    if perturbed:
        problem.set_grads(params, warmup)
        if bad_pass == "second":
            params[4].grad[1, 0, 1, 1] = float("inf")
        opt.second_step()
    assert_same(opt, params, snap, f"{name}/{bad_pass}")
    assert int(opt.skipped_steps) == skipped + 1
    for step in range(warmup + 1, warmup + 3):  # training goes on
        problem.set_grads(params, step)
        if opt.first_step():
            problem.set_grads(params, step)
            opt.second_step()
    assert int(opt.skipped_steps) == skipped + 1
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(opt.state[p][k]).all() for p in params for k in persistent)


@pytest.mark.parametrize(
    "name, backend", [(n, b) for n in ("vasso", "fsam") for b in backends_for(n) if b != "reference"]
)
def test_each_parameter_s_running_state_starts_with_its_own_first_update(name, backend, device):
    """A parameter that takes no part in the first steps (no gradient) starts its running state
    (VaSSO's d, F-SAM's m) at its own first update, from its own count: the same weights and
    state as the reference, step by step."""
    cls, options, (key,) = RESUME[name]
    problem = Problem(SMALL_SHAPES, 6)
    runs = []
    for which in ("reference", backend):
        params = small_params(device)
        opt = cls(params, torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9, backend=which, **options)
        for step in range(4):
            for pass_ in (1, 2):
                problem.set_grads(params, step)
                if step < 2:  # parameter 1 joins at step 2, parameter 3 at step 1
                    params[1].grad = None
                if step < 1:
                    params[3].grad = None
                opt.first_step() if pass_ == 1 else opt.second_step()
        runs.append(([p.detach().clone() for p in params], [opt.state[p][key].clone() for p in params]))
    (ref_w, ref_s), (got_w, got_s) = runs
    for i, (a, b, sa, sb) in enumerate(zip(ref_w, got_w, ref_s, got_s)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name} param {i}")
        torch.testing.assert_close(sb, sa, rtol=1e-5, atol=1e-6, msg=f"{name} param {i}: {key}")


def test_skipped_first_step_keeps_vasso_first_step_rule(backend, device):
    """A skipped first step leaves d untouched, so the next step still starts with d = g."""
    problem = Problem(SMALL_SHAPES, 4)
    params = small_params(device)
    opt = VaSSO(params, rho=0.2, lr=0.05, theta=0.4, backend=backend)
    problem.set_grads(params, 0)
    params[0].grad[0] = float("nan")
    opt.first_step()
    problem.set_grads(params, 0)
    opt.second_step()
    assert int(opt.skipped_steps) == 1
    g = problem.grad64([p.detach().double() for p in params], 1)
    problem.set_grads(params, 1)
    opt.first_step()
    problem.set_grads(params, 1)
    opt.second_step()
    for p, gi in zip(params, g):
        torch.testing.assert_close(opt.state[p]["vasso_d"].double(), gi, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- 5. closures
@pytest.mark.parametrize("name", ["rsam", "looksam", "interval"])
def test_closure_equals_manual_loop(name, backend, device):
    case = CASES[name]
    problem = Problem(SMALL_SHAPES, 31)
    weights = init_weights(SMALL_SHAPES, 31)
    results = []
    for use_closure in (False, True):
        params, opt = build(case, "sgd", backend, [[w.to(device) for w in g] for g in weights])
        losses, calls = [], []
        for step in range(4):  # LookSAM / interval SAM: full, reuse, reuse, full
            if use_closure:
                count = [0]

                def closure(params=params, count=count, step=step):
                    count[0] += 1
                    loss = problem.loss(params, step)
                    loss.backward()
                    return loss

                losses.append(float(opt.step(closure).detach()))
                opt.zero_grad()
                calls.append(count[0])
            else:
                if name == "rsam":
                    opt.noise_step()
                loss = problem.loss(params, step)
                loss.backward()
                losses.append(float(loss.detach()))
                passes = 1
                if opt.first_step(zero_grad=True):
                    problem.loss(params, step).backward()
                    opt.second_step(zero_grad=True)
                    passes = 2
                calls.append(passes)
        results.append(([p.detach().clone() for p in params], losses, calls))
    (w_manual, l_manual, c_manual), (w_closure, l_closure, c_closure) = results
    expected_calls = [2 if name == "rsam" or step % 3 == 0 else 1 for step in range(4)]
    assert c_manual == expected_calls
    assert c_closure == expected_calls, "the closure must run once on reuse steps, twice otherwise"
    assert l_manual == l_closure
    assert all(torch.equal(a, b) for a, b in zip(w_manual, w_closure))


# ---------------------------------------------------------------------------- 6. defaults
def test_published_defaults():
    p = [torch.zeros(3, requires_grad=True)]
    assert VaSSO(p).variant_options["theta"] == 0.9
    assert VaSSO(p).defaults["rho"] == 0.05
    assert FSAM(p).variant_options == {"sigma": 1.0, "lam": 0.9}
    assert GSAM(p).variant_options == {"alpha": 0.4}
    assert LookSAM(p).variant_options == {"k": 5, "alpha": 0.7}
    assert IntervalSAM(p).variant_options == {"k": 10, "offset": 0}
    assert RSAM(p).variant_options["lam"] == 1.0
    asam = ASAM(p)
    assert asam.defaults["rho"] == 0.5 and asam.defaults["eta"] == 0.01 and asam.defaults["adaptive"]
    assert USAM(p).variant.normalized is False
    assert GCSAM(p).variant.centralize


@pytest.mark.parametrize("backend", backends_for("interval"))
def test_interval_offset_gives_composers_schedule(backend, device):
    """Default: SAM on steps 1, k+1, ... (the first of each window); offset=k-1: Composer's k, 2k, ..."""
    for offset, expected in (
        (0, [True, False, False, True, False, False, True]),
        (2, [False, False, True] * 2 + [False]),
    ):
        params = small_params(device)
        opt = IntervalSAM(params, torch.optim.SGD, rho=0.1, k=3, offset=offset, lr=0.01, backend=backend)
        problem = Problem(SMALL_SHAPES, 3)
        got = []
        for step in range(7):
            problem.set_grads(params, step)
            perturbed = opt.first_step(zero_grad=True)
            if perturbed:
                problem.set_grads(params, step)
                opt.second_step(zero_grad=True)
            got.append(perturbed)
        assert got == expected, f"offset={offset}: {got}"
    with pytest.raises(ValueError, match="offset"):
        IntervalSAM(small_params(device), k=3, offset=3, lr=0.01)


@pytest.mark.parametrize("backend", backends_for("rsam"))
def test_rsam_default_noise_is_the_groups_rho_over_root_d(backend, device):
    """noise_std=None: per group, std = that group's rho / sqrt(d), d = every scalar parameter
    of the optimizer (also those without a gradient): E||delta||^2 = rho^2 for one rho."""
    big = [
        torch.zeros(20000, device=device, requires_grad=True),
        torch.zeros(30000, device=device, requires_grad=True),
    ]
    frozen = torch.zeros(10000, device=device, requires_grad=True)  # counts in d, takes no part
    opt = RSAM(
        [{"params": [big[0], frozen], "rho": 0.1}, {"params": [big[1]], "rho": 0.4}], lr=0.1, backend=backend
    )
    opt.noise_step()
    d = 60000
    for p, rho in ((big[0], 0.1), (big[1], 0.4)):
        std = float(p.detach().double().std())
        assert std == pytest.approx(rho / d**0.5, rel=0.03), (rho, std)
    opt.abort_step()
    assert all(float(p.detach().abs().max()) == 0 for p in (*big, frozen))
