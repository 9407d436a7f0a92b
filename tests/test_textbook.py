"""SAM against an independent float64 textbook implementation.

The textbook below is written in this file from ``docs/variants.md`` and the docstring of
``sam_fused.variants`` (it does not import the reference backend, which is under test
too): ONE global norm of ``u = T * g`` over every parameter with a gradient in every
group, ``eps = rho * T * u / (||u|| + 1e-12)`` (``rho * T * u`` for USAM), with
``T = |w| + eta`` in adaptive groups and 1 elsewhere; the restore is the backup itself,
and the base update is ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` as PyTorch documents it.

Both sides are driven by the same smooth random loss
``L(w) = sum(c * sin(w) + a * w**2 / 2)``: the optimizer gets its gradients from autograd
on its own (perturbed) parameters, the textbook from the analytic gradient
``c * cos(w) + a * w`` at its own float64 weights, so the second-pass gradient really
depends on ``w + eps`` and a wrong perturbation changes the result.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from sam_fused import SAM

F64 = torch.float64
SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW

# ---------------------------------------------------------------------------- helpers

MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of ``dtype`` numbers at ``|x|`` (float64 in, float64 out)."""
    magnitude = x.abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - MANTISSA_BITS[dtype])


def rounded(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to ``dtype`` (to nearest), back in float64."""
    return x.to(dtype).to(F64)


def as64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=F64)


def assert_within(actual: Tensor, expected: Tensor, tol: Tensor, what: str) -> None:
    """Elementwise ``|actual - expected| <= tol``; NaN anywhere fails."""
    actual, expected = as64(actual), as64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.numel() == 0:
        return
    tol = torch.broadcast_to(tol, expected.shape)
    err = (actual - expected).abs()
    ok = err <= tol  # False for NaN
    if not bool(ok.all()):
        excess = torch.where(ok, torch.zeros_like(err), torch.nan_to_num(err - tol, nan=math.inf))
        k = int(excess.flatten().argmax())
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.numel()} elements out of tolerance; worst at flat "
            f"index {k}: got {actual.flatten()[k].item()!r}, expected {expected.flatten()[k].item()!r}, "
            f"tolerance {tol.flatten()[k].item():.3g}"
        )


def bits(t: Tensor) -> Tensor:
    """The raw bits of a tensor, for bitwise comparisons (-0.0 != 0.0, NaN == same NaN)."""
    int_type = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().cpu().clone().contiguous().view(int_type)


# ---------------------------------------------------------------------------- the problem


class Problem:
    """A fixed random smooth loss ``sum(c * sin(w) + a * w**2 / 2)`` over several tensors.

    ``specs`` is a list of ``(shape, transposed)``; a transposed 2-d parameter is a leaf with
    column-major strides (as a model may hold after ``.t()``).
    """

    def __init__(self, specs: list[tuple[tuple[int, ...], bool]], seed: int, device: str) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.device = device
        self.w0, self.c, self.a = [], [], []
        for shape, transposed in specs:
            if transposed:
                w = torch.randn(shape[::-1], generator=gen, dtype=F64).t()
            else:
                w = torch.randn(shape, generator=gen, dtype=F64)
            self.w0.append(w)
            self.c.append(2 * torch.randn(shape, generator=gen, dtype=F64))
            self.a.append(torch.rand(shape, generator=gen, dtype=F64) + 0.5)
        self.c_dev = [c.to(device) for c in self.c]
        self.a_dev = [a.to(device) for a in self.a]

    def __len__(self) -> int:
        return len(self.w0)

    def make_params(self, dtypes: torch.dtype | list[torch.dtype]) -> list[torch.nn.Parameter]:
        if isinstance(dtypes, torch.dtype):
            dtypes = [dtypes] * len(self)
        return [
            torch.nn.Parameter(w.to(device=self.device, dtype=dt))
            for w, dt in zip(self.w0, dtypes, strict=True)
        ]

    def backward(self, params: list[Tensor], which: list[int] | None = None) -> None:
        """Autograd on the real parameters (computed in float64; the gradient is cast back)."""
        which = range(len(params)) if which is None else which
        loss = 0
        for i in which:
            w = params[i].double()
            loss = loss + (self.c_dev[i] * torch.sin(w) + 0.5 * self.a_dev[i] * w * w).sum()
        loss.backward()

    def grads(self, weights: list[Tensor], dtypes: list[torch.dtype], which=None) -> list[Tensor | None]:
        """The analytic gradient at float64 ``weights``, rounded to each parameter's dtype.

        Rounding models what the optimizer receives: the gradient of a bf16 parameter is a
        bf16 tensor. Entries outside ``which`` are None (no gradient).
        """
        which = set(range(len(weights)) if which is None else which)
        out: list[Tensor | None] = []
        for i, (w, dt) in enumerate(zip(weights, dtypes, strict=True)):
            out.append(rounded(self.c[i] * torch.cos(w) + self.a[i] * w, dt) if i in which else None)
        return out


# ---------------------------------------------------------------------------- the textbook

SGD_DEFAULTS = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
TORCH_DEFAULTS = {SGD: SGD_DEFAULTS, Adam: ADAM_DEFAULTS, AdamW: {**ADAM_DEFAULTS, "weight_decay": 1e-2}}


class Textbook:
    """SAM in float64, parameter by parameter, straight from the formulas.

    ``groups`` hold parameter *indices*; gradients are passed in as lists (None: no grad).
    """

    def __init__(
        self,
        weights: list[Tensor],
        groups: list[dict],
        base: type,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        variant: str = "sam",
        norm_eps: float = 1e-12,
        **base_kwargs,
    ) -> None:
        self.w = [as64(w).clone() for w in weights]
        defaults = {**TORCH_DEFAULTS[base], "rho": rho, "adaptive": adaptive, "eta": eta, **base_kwargs}
        self.groups = [{**defaults, **g} for g in groups]
        self.base = base
        self.normalized = {"sam": True, "usam": False}[variant]
        self.norm_eps = norm_eps
        self.state: list[dict] = [{} for _ in weights]
        self.backup: dict[int, Tensor] = {}

    def first_step(self, grads: list[Tensor | None]) -> dict[int, Tensor]:
        parts = []
        for group in self.groups:
            for i in group["params"]:
                g = grads[i]
                if g is None:
                    continue
                t = self.w[i].abs() + group["eta"] if group["adaptive"] else torch.ones_like(g)
                parts.append((group, i, t, t * g))
        norm = math.sqrt(sum(float((u * u).sum()) for *_, u in parts))
        eps = {}
        for group, i, t, u in parts:
            e = group["rho"] * t * u
            if self.normalized:
                e = e / (norm + self.norm_eps)
            self.backup[i] = self.w[i].clone()
            self.w[i] = self.w[i] + e
            eps[i] = e
        return eps

    def second_step(self, grads: list[Tensor | None]) -> None:
        for i, b in self.backup.items():
            self.w[i] = b
        self.backup = {}
        for group in self.groups:
            for i in group["params"]:
                if grads[i] is not None:
                    if self.base is SGD:
                        self._sgd(i, grads[i], group)
                    else:
                        self._adam(i, grads[i], group)

    def _sgd(self, i: int, g: Tensor, group: dict) -> None:
        w, st = self.w[i], self.state[i]
        if group["maximize"]:
            g = -g
        g = g + group["weight_decay"] * w
        if group["momentum"] != 0:
            buf = st.get("momentum_buffer")
            buf = g.clone() if buf is None else group["momentum"] * buf + (1 - group["dampening"]) * g
            st["momentum_buffer"] = buf
            g = g + group["momentum"] * buf if group["nesterov"] else buf
        self.w[i] = w - group["lr"] * g

    def _adam(self, i: int, g: Tensor, group: dict) -> None:
        w, st = self.w[i], self.state[i]
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        if group["maximize"]:
            g = -g
        if self.base is AdamW:
            w = w * (1 - lr * wd)
        else:
            g = g + wd * w
        st["step"] = t = st.get("step", 0) + 1
        m = beta1 * st.get("exp_avg", torch.zeros_like(w)) + (1 - beta1) * g
        v = beta2 * st.get("exp_avg_sq", torch.zeros_like(w)) + (1 - beta2) * g * g
        st["exp_avg"], st["exp_avg_sq"] = m, v
        if group["amsgrad"]:
            v = torch.maximum(st.get("max_exp_avg_sq", torch.zeros_like(w)), v)
            st["max_exp_avg_sq"] = v
        denom = v.sqrt() / math.sqrt(1 - beta2**t) + group["eps"]
        self.w[i] = w - lr / (1 - beta1**t) * m / denom


# ---------------------------------------------------------------------------- configurations

# group 0 takes the constructor's options, group 1 is empty, group 2 overrides some
SPECS = [((), False), ((4097,), False), ((7,), False), ((33, 65), False), ((33, 65), True), ((1,), False)]
GROUP_INDICES = [[0, 1, 2], [], [3, 4, 5]]
EMPTY_GROUP = {"lr": 0.7, "rho": 0.9}

VARIANTS = {  # name: (constructor options, group-2 overrides)
    "sam": (dict(variant="sam", adaptive=False), {}),
    "asam": (dict(variant="sam", adaptive=True, eta=0.0), {}),
    "asam_eta": (dict(variant="sam", adaptive=True, eta=0.01), {}),
    "usam": (dict(variant="usam"), {}),
    "usam_asam": (dict(variant="usam", adaptive=True, eta=0.01, rho=0.02), {"rho": 0.01}),
    "mixed_adaptive": (dict(variant="sam", adaptive=False), {"adaptive": True, "eta": 0.01, "rho": 1.0}),
}

BASES = {  # name: (class, constructor options, group-2 overrides)
    "sgd": (SGD, dict(lr=0.05), dict(lr=0.02, rho=0.3)),
    "sgd_momentum_wd": (
        SGD,
        dict(lr=0.05, momentum=0.9, weight_decay=5e-3),
        dict(lr=0.02, weight_decay=0.05, rho=0.3),
    ),
    "sgd_nesterov": (SGD, dict(lr=0.05, momentum=0.8, nesterov=True), dict(lr=0.1, weight_decay=1e-2)),
    "sgd_dampening_maximize": (
        SGD,
        dict(lr=0.03, momentum=0.7, dampening=0.3, maximize=True),
        dict(lr=0.01, weight_decay=1e-2, rho=0.3),
    ),
    "adamw": (AdamW, dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.05), dict(lr=0.02, weight_decay=0.3)),
    "adam_amsgrad": (
        Adam,
        dict(lr=0.01, eps=1e-6, amsgrad=True, weight_decay=1e-3),
        dict(lr=0.005, betas=(0.5, 0.9), rho=0.3),
    ),
}


def build(problem, dtypes, variant, base, backend, group_indices=GROUP_INDICES, rho=0.1):
    """The SAM optimizer on fresh parameters and the textbook on float64 copies of them."""
    variant_kw, variant_group = VARIANTS[variant]
    cls, base_kw, base_group = BASES[base]
    options = {"rho": rho, **variant_kw}
    overrides = [{}, EMPTY_GROUP, {**base_group, **variant_group}]
    params = problem.make_params(dtypes)
    textbook = Textbook(
        [p.detach() for p in params],
        [{"params": list(idx), **ov} for idx, ov in zip(group_indices, overrides, strict=True)],
        cls,
        **options,
        **base_kw,
    )
    groups = [
        {"params": [params[i] for i in idx], **ov} for idx, ov in zip(group_indices, overrides, strict=True)
    ]
    opt = SAM(groups, cls, backend=backend, **options, **base_kw)
    assert len(opt.param_groups) == len(groups)  # the empty group is kept
    return params, opt, textbook


def all_float64(dtypes) -> bool:
    return all(dt == torch.float64 for dt in dtypes)


def check_perturbation(params, before, textbook, eps_tb, dtypes, step):
    """After first_step: each parameter sits at ``w + eps`` (textbook eps), to rounding."""
    for i, p in enumerate(params):
        dt = dtypes[i]
        now = as64(p)
        if i not in eps_tb:
            assert torch.equal(bits(p.detach()), bits(before[i].to(dt))), f"param {i} moved without grad"
            continue
        if dt in (torch.float32, torch.float64):
            # the eps actually applied, exactly, against the textbook eps; the rounding of
            # w + eps to the dtype costs at most one ulp of the larger of the two. The
            # relative part is per tensor: after a few steps the two trajectories differ by
            # rounding, which moves the gradient (and USAM's eps with it) by that much
            actual = now - before[i]
            rtol = 1e-5 if dt == torch.float32 else 1e-11
            if dt == torch.float64 and not all_float64(dtypes):
                # the norm is shared, and the float32 buckets' share of it is accumulated
                # in float32 (docs/variants.md): float64 eps is then good to ~1e-7
                rtol = 1e-6
            scale = eps_tb[i].abs().max() if eps_tb[i].numel() else 0.0
            tol = ulp(torch.maximum(before[i].abs(), now.abs()), dt) + rtol * scale + 1e-30
            assert_within(actual, eps_tb[i], tol, f"step {step}: eps of param {i} ({dt})")
        else:
            # one step from identical weights: the perturbed weight is w + eps rounded
            expected = rounded(before[i] + eps_tb[i], dt)
            assert_within(now, expected, ulp(expected, dt), f"step {step}: perturbed param {i} ({dt})")


def check_weights(params, start, textbook, dtypes, step):
    """After second_step: the weights equal the textbook's, to the dtype's rounding."""
    for i, p in enumerate(params):
        dt = dtypes[i]
        expected = textbook.w[i]
        if dt == torch.float32:
            tol = 1e-5 * expected.abs() + 1e-6
        elif dt == torch.float64 and all_float64(dtypes):
            tol = 1e-12 * expected.abs() + 1e-14
        elif dt == torch.float64:
            # eps good to ~1e-7 only (see check_perturbation); it reaches the weights
            # through the second-pass gradient, times lr
            tol = 1e-9 * expected.abs() + 1e-10
        else:
            # one ulp at the larger of the old and new weight: rounding the result (half an
            # ulp) plus the float32 math of the update on the rounded gradient
            expected = rounded(expected, dt)
            tol = ulp(torch.maximum(expected.abs(), start[i].abs()), dt)
        assert_within(as64(p), expected, tol, f"step {step}: param {i} ({dt}) after second_step")


def run_against_textbook(device, backend, dtypes, variant, base, steps, specs=SPECS, seed=0):
    problem = Problem(specs, seed, device)
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(problem)
    params, opt, textbook = build(problem, dtypes, variant, base, backend)
    low_precision = any(dt not in (torch.float32, torch.float64) for dt in dtypes)
    assert steps == 1 or not low_precision, "low-precision runs compare one step"
    start = [as64(p).clone() for p in params]
    for step in range(steps):
        before = [as64(p).clone() for p in params]
        problem.backward(params)
        eps_tb = textbook.first_step(problem.grads(textbook.w, dtypes))
        opt.first_step(zero_grad=True)
        check_perturbation(params, before, textbook, eps_tb, dtypes, step)
        problem.backward(params)
        if low_precision:
            # the perturbation was checked above; the update is checked on its own, fed with
            # the gradient at the weights the optimizer actually perturbed to. (At the
            # textbook's unrounded w + eps, the rounding of w + eps to bf16 moves the
            # gradient by up to L * ulp(w + eps), far more than an ulp of a small weight.)
            grads = problem.grads([as64(p) for p in params], dtypes)
        else:
            grads = problem.grads(textbook.w, dtypes)
        textbook.second_step(grads)
        opt.second_step(zero_grad=True)
        check_weights(params, before, textbook, dtypes, step)
    moved = max(float((as64(p) - s).abs().max()) for p, s in zip(params, start, strict=True))
    assert moved > 1e-3, "the weights did not move: the test would not see a wrong update"
    return params, opt, textbook


# ---------------------------------------------------------------------------- the matrix

MAIN_VARIANTS = ["sam", "asam", "asam_eta", "usam"]


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("variant", MAIN_VARIANTS)
def test_float32_matches_textbook(device, backend, variant, base):
    run_against_textbook(device, backend, torch.float32, variant, base, steps=4)


@pytest.mark.parametrize("base", ["sgd_momentum_wd", "adam_amsgrad"])
@pytest.mark.parametrize("variant", ["usam_asam", "mixed_adaptive"])
def test_float32_more_variants_match_textbook(device, backend, variant, base):
    run_against_textbook(device, backend, torch.float32, variant, base, steps=3)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("variant", MAIN_VARIANTS)
def test_float64_matches_textbook(device, variant, base):
    # the triton backend refuses float64 (backend='auto' routes it to the reference)
    run_against_textbook(device, "reference", torch.float64, variant, base, steps=4)


@pytest.mark.parametrize("base", ["sgd_nesterov", "adamw"])
def test_float64_beside_float32_with_auto_backend(device, base):
    """backend='auto' takes float64 too (on the reference; on CUDA the float32 group then
    runs on Triton beside it), with the global norm over both."""
    dtypes = [torch.float64] * 3 + [torch.float32] * 3
    run_against_textbook(device, "auto", dtypes, "asam_eta", base, steps=3)


@pytest.mark.parametrize("base", ["sgd_momentum_wd", "adamw"])
@pytest.mark.parametrize("variant", ["sam", "asam_eta", "usam"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_one_step_matches_rounded_textbook(device, backend, dtype, variant, base):
    run_against_textbook(device, backend, dtype, variant, base, steps=1)


@pytest.mark.parametrize("base", ["sgd_nesterov", "adam_amsgrad"])
def test_mixed_dtypes_share_one_global_norm(device, backend, base):
    """A float32 group and a bf16 group (with an fp16 tensor in it): one norm over all."""
    dtypes = [torch.float32] * 3 + [torch.bfloat16, torch.float16, torch.bfloat16]
    _, opt, _ = run_against_textbook(device, backend, dtypes, "asam_eta", base, steps=1)
    assert len(opt.backends) == 3  # one bucket per (group, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["sgd_momentum_wd", "adamw"])
def test_one_million_elements(device, backend, base):
    specs = [
        ((1_000_003,), False),
        ((7,), False),
        ((3,), False),
        ((33, 65), True),
        ((5,), False),
        ((1,), False),
    ]
    run_against_textbook(device, backend, torch.float32, "asam_eta", base, steps=2, specs=specs, seed=3)


# ---------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("base", ["sgd_momentum_wd", "adamw"])
def test_parameters_without_gradient(device, backend, base):
    """No gradient: the parameter does not move, is not backed up, keeps no state, and
    stays out of the norm; the others follow the textbook."""
    problem = Problem(SPECS, 1, device)
    dtypes = [torch.float32] * len(problem)
    params, opt, textbook = build(problem, dtypes, "asam_eta", base, backend)
    frozen = [0, 4]  # one per non-empty group
    which = [i for i in range(len(params)) if i not in frozen]
    for step in range(3):
        before = [as64(p).clone() for p in params]
        problem.backward(params, which)
        eps_tb = textbook.first_step(problem.grads(textbook.w, dtypes, which))
        opt.first_step(zero_grad=True)
        check_perturbation(params, before, textbook, eps_tb, dtypes, step)
        # not backed up: second_step must not write these parameters at all, so an edit
        # made between the passes survives (a restore from a backup would undo it)
        with torch.no_grad():
            for i in frozen:
                params[i].add_(0.25)
                before[i] = as64(params[i]).clone()
                textbook.w[i] = before[i].clone()
        problem.backward(params, which)
        textbook.second_step(problem.grads(textbook.w, dtypes, which))
        opt.second_step(zero_grad=True)
        check_weights(params, before, textbook, dtypes, step)
        for i in frozen:
            assert params[i].grad is None
            assert torch.equal(as64(params[i]), before[i]), f"param {i} without gradient was written"
            assert not opt.state.get(params[i]), f"param {i} without gradient got optimizer state"


@pytest.mark.parametrize("base", ["sgd_momentum_wd", "adamw"])
def test_gradients_set_to_none_between_steps(device, backend, base):
    """Gradients dropped (model.zero_grad(), p.grad = None, zero_grad(set_to_none=True))
    and parameters joining or leaving between the passes: still the textbook numbers."""
    problem = Problem(SPECS, 2, device)
    dtypes = [torch.float32] * len(problem)
    params, opt, textbook = build(problem, dtypes, "sam", base, backend)
    model = torch.nn.Module()
    model.weights = torch.nn.ParameterList(params)
    everything = list(range(len(params)))
    # (pass-1 participants, pass-2 participants, how gradients are cleared between passes)
    schedule = [
        (everything, everything, "sam"),
        ([0, 1, 3, 5], [0, 1, 2, 3, 5], "none"),  # 2 joins in pass 2; 4 sits out
        ([1, 2, 4], [2, 4], "model"),  # 1 leaves after pass 1: restored, not updated
        (everything, everything, "sam"),
        ([0, 2, 3, 4, 5], [0, 2, 3, 4, 5], "sam"),
    ]
    for step, (first, second, clear) in enumerate(schedule):
        model.zero_grad()  # nn.Module: sets every .grad to None
        before = [as64(p).clone() for p in params]
        problem.backward(params, first)
        eps_tb = textbook.first_step(problem.grads(textbook.w, dtypes, first))
        if clear == "sam":
            opt.first_step(zero_grad=True)  # zeroed in place: pass 2 accumulates into them
        else:
            opt.first_step()
            if clear == "none":
                for p in params:
                    p.grad = None
            else:
                opt.zero_grad(set_to_none=True)
        check_perturbation(params, before, textbook, eps_tb, dtypes, step)
        problem.backward(params, second)
        if clear == "sam":
            second = sorted(set(first) | set(second))  # zeroed grads still take part
        textbook.second_step(problem.grads(textbook.w, dtypes, second))
        opt.second_step()
        check_weights(params, before, textbook, dtypes, step)
    # parameters whose update counts differ (Adam's bias correction is per parameter)
    if base == "adamw":
        steps = [int(opt.state[p]["step"]) for p in params]
        assert steps == [textbook.state[i]["step"] for i in range(len(params))]
        assert len(set(steps)) > 1


@pytest.mark.parametrize("variant", ["sam", "asam", "usam"])
def test_zero_gradient_gives_zero_perturbation(device, backend, variant):
    problem = Problem(SPECS, 4, device)
    dtypes = [torch.float32] * len(problem)
    params, opt, textbook = build(problem, dtypes, variant, "sgd_momentum_wd", backend)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    eps_tb = textbook.first_step([torch.zeros_like(w) for w in textbook.w])
    assert all(float(e.abs().max()) == 0 for e in eps_tb.values() if e.numel())
    opt.first_step(zero_grad=True)
    for i, p in enumerate(params):
        assert torch.equal(bits(p), bits(before[i])), f"a zero gradient moved param {i}"
    problem.backward(params)
    textbook.second_step(problem.grads(textbook.w, dtypes))
    opt.second_step(zero_grad=True)
    for p in params:
        assert torch.isfinite(p.detach()).all()
        assert torch.isfinite(opt.state[p]["momentum_buffer"]).all()
    check_weights(params, [as64(b) for b in before], textbook, dtypes, 0)


def test_deterministic_norm(device, backend):
    """The same inputs twice give bitwise the same perturbed weights (no float atomics)."""
    specs = [((70_001,), False), ((3,), False), ((129, 257), True), ((1,), False)]
    results = []
    for _ in range(2):
        problem = Problem(specs, 5, device)
        params = problem.make_params(torch.float32)
        opt = SAM(
            [{"params": params[:2]}, {"params": params[2:], "rho": 0.2}],
            SGD,
            rho=0.05,
            adaptive=True,
            eta=0.01,
            lr=0.1,
            backend=backend,
        )
        problem.backward(params)
        opt.first_step()
        results.append([bits(p) for p in params])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert torch.equal(a, b), f"param {i}: two identical first steps differ"
    assert any(not torch.equal(a, bits(w.float())) for a, w in zip(results[0], problem.w0, strict=True))
