"""Property tests: random shapes (0- and 1-element tensors included), group splits, dtypes.

* the Triton backend agrees with the reference backend;
* ``first_step`` then ``second_step`` with ``lr=0`` gives the weights back bit for bit;
* normalized SAM moves the weights by exactly ``rho`` (per group, in the weighted sense
  below), measured in float64 from the parameters themselves.
"""

from __future__ import annotations

import math

import torch
from _helpers import copy_run_state
from conftest import NEEDS_TRITON
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sam_fused import SAM

F64 = torch.float64
SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
LOW = (torch.bfloat16, torch.float16)

PROPERTY = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# sizes around the flat layout's 16-element alignment and the kernels' 4096-element blocks
SIZES = st.one_of(st.sampled_from([0, 1, 2, 3, 15, 16, 17, 31, 33]), st.integers(0, 70), st.just(4097))
SHAPES = st.lists(SIZES, min_size=0, max_size=3).map(tuple).filter(lambda s: math.prod(s) <= 20_000)

BASES = {
    "sgd": (SGD, dict(lr=0.1)),
    "sgd_momentum": (SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    "sgd_nesterov_maximize": (SGD, dict(lr=0.05, momentum=0.5, nesterov=True, maximize=True)),
    "adamw": (AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam_amsgrad": (Adam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
}
SAM_OPTIONS = {
    "sam": dict(variant="sam", adaptive=False),
    "asam": dict(variant="sam", adaptive=True, eta=0.0),
    "asam_eta": dict(variant="sam", adaptive=True, eta=0.01),
    "usam": dict(variant="usam", adaptive=False),
}


@st.composite
def problems(draw, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """Parameter shapes and dtypes, their split into groups (some possibly empty) with
    per-group rho and lr, and a seed for the weights and gradients."""
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=6))
    n_groups = draw(st.integers(1, 3))
    return dict(
        shapes=shapes,
        dtypes=[draw(st.sampled_from(dtypes)) for _ in shapes],
        group_of=[draw(st.integers(0, n_groups - 1)) for _ in shapes],
        rhos=[draw(st.sampled_from([0.01, 0.05, 0.3, 1.0])) for _ in range(n_groups)],
        lrs=[draw(st.sampled_from([0.01, 0.1, 0.5])) for _ in range(n_groups)],
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_params(problem, device):
    gen = torch.Generator().manual_seed(problem["seed"])
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=dt))
        for s, dt in zip(problem["shapes"], problem["dtypes"], strict=True)
    ]


def make_grads(problem, device, seed_offset):
    gen = torch.Generator().manual_seed(problem["seed"] + 7919 * seed_offset)
    return [
        torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=dt)
        for s, dt in zip(problem["shapes"], problem["dtypes"], strict=True)
    ]


def groups_of(problem, params, lr_scale=1.0, rho_scale=1.0):
    groups = [
        {"params": [], "rho": rho * rho_scale, "lr": lr * lr_scale}
        for rho, lr in zip(problem["rhos"], problem["lrs"], strict=True)
    ]
    for p, g in zip(params, problem["group_of"], strict=True):
        groups[g]["params"].append(p)
    return groups


def set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    magnitude = x.abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - MANTISSA_BITS[dtype])


def assert_agree(actual, expected, what, terms):
    """The two backends agree to rounding.

    float32: relative 1e-6 (they sum the global norm in different orders); bf16 and fp16:
    one ulp (the Triton interpreter truncates float32 -> bfloat16 where the GPU rounds to
    nearest). Plus float32 rounding of ``terms``, the magnitude of what was summed (an
    update ``w - lr * d`` or a running average can cancel to almost nothing, and two
    float32 evaluations of it then differ by far more than an ulp of the result).
    """
    a, b = actual.detach().to("cpu", F64), expected.detach().to("cpu", F64)
    if actual.dtype == torch.float32:
        tol = 1e-6 * b.abs() + 1e-7
    else:
        tol = ulp(torch.maximum(a.abs(), b.abs()), actual.dtype)
    tol = tol + 4 * 2.0**-24 * terms
    bad = (a - b).abs() > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ: {a[bad][:3]} vs {b[bad][:3]}"
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    int_type = {4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()]
    return t.detach().cpu().clone().contiguous().view(int_type)


# ---------------------------------------------------------------------------- properties


@NEEDS_TRITON
@PROPERTY
@given(problem=problems(), base=st.sampled_from(sorted(BASES)), variant=st.sampled_from(sorted(SAM_OPTIONS)))
def test_triton_agrees_with_reference(device, problem, base, variant):
    """Two steps on the same inputs. Before the second, the Triton side is set to the
    reference's weights and state (in place), so each step starts from identical inputs
    (otherwise one-ulp bf16 differences in the state grow into many ulps of small weights)."""
    cls, options = BASES[base]
    params = [make_params(problem, device) for _ in range(2)]
    opts = [
        SAM(groups_of(problem, ps), cls, backend=backend, **SAM_OPTIONS[variant], **options)
        for ps, backend in zip(params, ("reference", "triton"), strict=True)
    ]
    for step in range(2):
        if step:
            copy_run_state((params[0], opts[0]), (params[1], opts[1]))
        grads = make_grads(problem, device, 2 * step), make_grads(problem, device, 2 * step + 1)
        start = [p.detach().to("cpu", F64).clone() for p in params[0]]
        perturbed = []
        for ps, opt in zip(params, opts, strict=True):
            set_grads(ps, grads[0])
            opt.first_step(zero_grad=True)
            perturbed.append([p.detach().clone() for p in ps])
            set_grads(ps, grads[1])
            opt.second_step(zero_grad=True)
        for i, (pr, pt) in enumerate(zip(*params, strict=True)):
            w0 = start[i]
            moved = perturbed[0][i].to("cpu", F64)
            assert_agree(
                perturbed[1][i], moved, f"step {step}: perturbed param {i}", w0.abs() + (moved - w0).abs()
            )
            new = pr.detach().to("cpu", F64)
            assert_agree(pt, pr, f"step {step}: param {i}", w0.abs() + (new - w0).abs())
            sr, st_ = opts[0].state[pr], opts[1].state[pt]
            assert set(sr) == set(st_), f"step {step}: param {i} state keys {set(sr)} != {set(st_)}"
            for key, value in sr.items():
                if key == "step":
                    assert float(value) == float(st_[key]) == step + 1
                else:
                    # a running average: the terms are bounded by the tensor's own scale
                    # and the gradient's (squared for the second moments)
                    g = grads[1][i].to("cpu", F64).abs()
                    scale = float(value.abs().max()) if value.numel() else 0.0
                    terms = scale + (g * g if "sq" in key else g)
                    assert_agree(st_[key], value, f"step {step}: param {i} state {key}", terms)


@PROPERTY
@given(problem=problems(), base=st.sampled_from(sorted(BASES)), variant=st.sampled_from(sorted(SAM_OPTIONS)))
def test_zero_learning_rate_restores_bitwise(device, backend, problem, base, variant):
    """``w <- backup`` is exact, and an update with lr = 0 moves nothing."""
    cls, options = BASES[base]
    params = make_params(problem, device)
    before = [bits(p) for p in params]
    # rho scaled up so that the perturbation survives rounding to bf16 (the restore must
    # have something to undo)
    groups = groups_of(problem, params, lr_scale=0.0, rho_scale=3.0)
    opt = SAM(groups, cls, backend=backend, **SAM_OPTIONS[variant], **options)
    moved = False
    for step in range(2):
        set_grads(params, make_grads(problem, device, 2 * step))
        opt.first_step(zero_grad=True)
        moved = moved or any(not torch.equal(bits(p), b) for p, b in zip(params, before, strict=True))
        set_grads(params, make_grads(problem, device, 2 * step + 1))
        opt.second_step(zero_grad=True)
        for i, (p, b) in enumerate(zip(params, before, strict=True)):
            assert torch.equal(bits(p), b), f"step {step}: param {i} ({p.dtype}) not restored bit for bit"
    if sum(p.numel() for p in params) >= 8:
        assert moved, "first_step did not perturb anything: the restore was not exercised"


@PROPERTY
@given(
    problem=problems(dtypes=(torch.float32,)),
    eta=st.sampled_from([None, 0.01, 0.5]),
)
def test_perturbation_has_norm_rho(device, backend, problem, eta):
    """``||w_perturbed - w|| = rho`` for SAM; with several groups, each scaled by its own rho:
    ``sum_g ||eps_g / rho_g||^2 = 1``. For ASAM (``eta`` given) the same holds for
    ``eps / T`` with ``T = |w| + eta``. Measured in float64 from the parameters; the bound
    is the rounding of ``w + eps`` to float32 plus float32 arithmetic."""
    params = make_params(problem, device)
    assert all(p.dtype == torch.float32 for p in params)
    before = [p.detach().to("cpu", F64).clone() for p in params]
    adaptive = eta is not None
    opt = SAM(groups_of(problem, params), SGD, adaptive=adaptive, eta=eta or 0.0, backend=backend)
    set_grads(params, make_grads(problem, device, 0))
    opt.first_step()
    total, bound = 0.0, 0.0
    for p, w, g in zip(params, before, problem["group_of"], strict=True):
        rho = problem["rhos"][g]
        after = p.detach().to("cpu", F64)
        t = w.abs() + eta if adaptive else torch.ones_like(w)
        total += float((((after - w) / t) ** 2).sum()) / rho**2
        rounding = ulp(torch.maximum(after.abs(), w.abs()), torch.float32) / 2
        bound += float(((rounding / t) ** 2).sum()) / rho**2
    if sum(p.numel() for p in params) == 0:
        assert total == 0.0
        return
    measured = math.sqrt(total)
    assert abs(measured - 1.0) <= math.sqrt(bound) + 1e-5, (
        f"weighted ||eps|| / rho = {measured!r}, expected 1 within {math.sqrt(bound) + 1e-5:.3g}"
    )
