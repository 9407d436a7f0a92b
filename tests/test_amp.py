"""Mixed precision and clipping: GradScaler, bf16, ``max_grad_norm``.

The independent computations:

* GradScaler: with a power-of-two scale and float32 math, ``scale * g`` and its unscaled
  value are exact, so a scaled run must equal the same run without a scaler bit for bit.
  An overflow must leave parameters and every piece of state bitwise unchanged and make
  ``scaler.update()`` back off (the scale halves).
* Clipping: torch's own ``torch.nn.utils.clip_grad_norm_`` applied to the second-pass
  gradient before an unclipped ``second_step``, and a float64 simulation for GSAM, whose
  clipped descent gradient is ``g_p - alpha g_perp``, not ``g_p``.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from _helpers import classification_batch, cross_entropy_of, mlp
from conftest import BACKENDS, DEVICE

from sam_fused import GSAM, SAM, IntervalSAM, LookSAM, VaSSO

# the compiled CPU backend unscales and clips with in-place passes instead of in-kernel
ALL_BACKENDS = BACKENDS + (["cpp"] if DEVICE == "cpu" else [])


def _name(b) -> str:
    return b.values[0] if hasattr(b, "values") else b


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request) -> str:
    return request.param


def make_model(seed: int, device: str, dtype=torch.float32) -> torch.nn.Module:
    return mlp([7, 33, 3], seed=seed, device=device, dtype=dtype, init_std=0.5)


def batch(step: int, device: str, n: int = 17):
    return classification_batch(1000 + step, n, 7, 3, device)


loss_of = cross_entropy_of


def snapshot(model, opt) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        for v in opt.state[p].values():
            if torch.is_tensor(v):
                out.append(v.detach().clone())
    return out


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}: tensor {i} differs (max {(x - y).abs().max().item():.3g})"


def plain_step(model, opt, x, y, poison: tuple[int, int] | None = None) -> None:
    """One SAM step without a scaler; ``poison = (pass, param index)`` puts an inf there."""
    loss_of(model, x, y).backward()
    if poison and poison[0] == 1:
        list(model.parameters())[poison[1]].grad.view(-1)[0] = math.inf
    if opt.first_step(zero_grad=True):
        loss_of(model, x, y).backward()
        if poison and poison[0] == 2:
            list(model.parameters())[poison[1]].grad.view(-1)[0] = math.inf
        opt.second_step(zero_grad=True)


def scaled_step(model, opt, scaler, x, y, recipe: str, poison: tuple[int, int] | None = None) -> None:
    """One SAM step with a GradScaler, by one of the documented recipes."""
    scaler.scale(loss_of(model, x, y)).backward()
    if poison and poison[0] == 1:
        list(model.parameters())[poison[1]].grad.view(-1)[0] = math.inf
    if opt.first_step(zero_grad=True, grad_scaler=scaler):
        scaler.scale(loss_of(model, x, y)).backward()
        if poison and poison[0] == 2:
            list(model.parameters())[poison[1]].grad.view(-1)[0] = math.inf
        if recipe == "scaler.step":
            scaler.step(opt)
        elif recipe == "unscale_+scaler.step":  # the user's own unscale (e.g. to log norms)
            scaler.unscale_(opt)
            scaler.step(opt)
        else:
            opt.second_step(grad_scaler=scaler)
        opt.zero_grad()
    scaler.update()


RECIPES = ["second_step", "scaler.step", "unscale_+scaler.step"]
SCALED_CASES = [
    (SAM, dict(momentum=0.9, weight_decay=1e-3)),
    (VaSSO, dict(theta=0.4)),
    (GSAM, dict(alpha=0.3)),
    (LookSAM, dict(k=2, alpha=0.5)),
    (IntervalSAM, dict(k=2)),
]


def build(cls, model, backend, base=torch.optim.SGD, **kw):
    return cls(model.parameters(), base, rho=0.1, lr=0.05, backend=backend, **kw)


# ---------------------------------------------------------------------- GradScaler
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(
    "base", [torch.optim.SGD, torch.optim.AdamW, torch.optim.RMSprop], ids=["sgd", "adamw", "rmsprop"]
)
def test_scaled_run_equals_unscaled_run(any_backend, device, recipe, base):
    """RMSprop is not fused: its own step reads p.grad, unscaled in place beforehand."""
    kw = {
        torch.optim.SGD: dict(momentum=0.9, weight_decay=1e-3),
        torch.optim.AdamW: dict(weight_decay=0.01),
        torch.optim.RMSprop: dict(momentum=0.5),
    }[base]
    ref_model, model = make_model(0, device), make_model(0, device)
    ref_opt = build(SAM, ref_model, any_backend, base, **kw)
    opt = build(SAM, model, any_backend, base, **kw)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=2)
    for step in range(4):  # the scale grows twice on the way: the factor is read each step
        x, y = batch(step, device)
        plain_step(ref_model, ref_opt, x, y)
        scaled_step(model, opt, scaler, x, y, recipe)
    assert scaler.get_scale() == 2.0**14
    assert_bitwise(snapshot(model, opt), snapshot(ref_model, ref_opt), f"{recipe}/{any_backend}")


# the compiled CPU backend takes SAM and interval SAM (whose one-pass steps it unscales too)
VARIANT_CASES = [
    pytest.param(_name(b), cls, kw, id=f"{_name(b)}-{cls.__name__}", marks=getattr(b, "marks", ()))
    for b in ALL_BACKENDS
    for cls, kw in SCALED_CASES
    if _name(b) != "cpp" or cls in (SAM, IntervalSAM)
]


@pytest.mark.parametrize("backend,cls,kw", VARIANT_CASES)
def test_scaled_variants_equal_unscaled(backend, device, cls, kw):
    """Unscaling reaches every use of a gradient: VaSSO's EMA, GSAM's stored first gradient,
    LookSAM's g_v and its one-pass steps, interval SAM's plain steps."""
    ref_model, model = make_model(1, device), make_model(1, device)
    ref_opt, opt = build(cls, ref_model, backend, **kw), build(cls, model, backend, **kw)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    for step in range(5):
        x, y = batch(step, device)
        plain_step(ref_model, ref_opt, x, y)
        scaled_step(model, opt, scaler, x, y, "second_step")
    assert_bitwise(snapshot(model, opt), snapshot(ref_model, ref_opt), cls.__name__)


def test_scaled_one_pass_steps_through_an_unfused_base(any_backend, device):
    """Interval SAM's plain steps with RMSprop: the first-pass gradient reaches the base's
    own step unscaled exactly once, whichever backend unscaled it."""
    ref_model, model = make_model(13, device), make_model(13, device)
    ref_opt = build(IntervalSAM, ref_model, any_backend, torch.optim.RMSprop, k=2)
    opt = build(IntervalSAM, model, any_backend, torch.optim.RMSprop, k=2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    for step in range(4):
        x, y = batch(step, device)
        plain_step(ref_model, ref_opt, x, y)
        scaled_step(model, opt, scaler, x, y, "scaler.step")
    assert_bitwise(snapshot(model, opt), snapshot(ref_model, ref_opt), "interval SAM + RMSprop")


# the cpp backend runs SAM (VaSSO and GSAM have no compiled kernels: auto sends them elsewhere)
OVERFLOW_CASES = [
    pytest.param(_name(b), cls, kw, id=f"{_name(b)}-{cls.__name__}", marks=getattr(b, "marks", ()))
    for b in ALL_BACKENDS
    for cls, kw in SCALED_CASES[:3]
    if _name(b) != "cpp" or cls is SAM
]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("bad_pass", [1, 2])
@pytest.mark.parametrize("name,cls,kw", OVERFLOW_CASES)
def test_overflow_skips_the_step_and_backs_off(device, recipe, bad_pass, name, cls, kw):
    model = make_model(2, device)
    opt = build(cls, model, name, **kw)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
    for step in range(2):
        scaled_step(model, opt, scaler, *batch(step, device), recipe)
    before, skipped = snapshot(model, opt), int(opt.skipped_steps)
    scale = scaler.get_scale()
    scaled_step(model, opt, scaler, *batch(2, device), recipe, poison=(bad_pass, 2))
    assert_bitwise(snapshot(model, opt), before, f"overflow in pass {bad_pass}")
    assert scaler.get_scale() == scale * 0.5, "the scaler must back off after an overflow in either pass"
    assert int(opt.skipped_steps) == skipped + 1
    scaled_step(model, opt, scaler, *batch(3, device), recipe)  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize("lookahead", ["LookSAM", "IntervalSAM"])
def test_overflow_on_a_one_pass_step_backs_off(backend, device, lookahead):
    cls = LookSAM if lookahead == "LookSAM" else IntervalSAM
    model = make_model(3, device)
    opt = build(cls, model, backend, k=2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
    scaled_step(model, opt, scaler, *batch(0, device), "second_step")  # step 0: two passes
    assert not opt.perturbs_this_step
    before, scale = snapshot(model, opt), scaler.get_scale()
    scaled_step(model, opt, scaler, *batch(1, device), "second_step", poison=(1, 0))
    assert_bitwise(snapshot(model, opt), before, "one-pass overflow")
    assert scaler.get_scale() == scale * 0.5


@pytest.mark.parametrize("lookahead", ["LookSAM", "IntervalSAM"])
def test_a_framework_may_finish_a_one_pass_step_with_scaler_step(backend, device, lookahead):
    """Frameworks call scaler.step(opt) (or opt.step()) after every step. After a one-pass
    first_step() that call finishes nothing more, and an overflow of the one pass still
    reaches scaler.update() (scaler.step re-checks only the zeroed gradients)."""
    cls = LookSAM if lookahead == "LookSAM" else IntervalSAM
    model = make_model(3, device)
    opt = build(cls, model, backend, k=2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
    scaled_step(model, opt, scaler, *batch(0, device), "second_step")  # step 0: two passes
    for poison in (None, (1, 0)):
        x, y = batch(1, device)
        before, scale = snapshot(model, opt), scaler.get_scale()
        scaler.scale(loss_of(model, x, y)).backward()
        if poison is not None:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        assert opt.first_step(zero_grad=True, grad_scaler=scaler) is False
        after = snapshot(model, opt)
        assert scaler.step(opt) is None  # accepted, and nothing more happens
        assert_bitwise(snapshot(model, opt), after, "scaler.step after a one-pass step")
        scaler.update()
        if poison is None:
            assert scaler.get_scale() == scale
            with pytest.raises(RuntimeError, match="closure"):  # finished once, not twice
                opt.step()
            scaled_step(model, opt, scaler, *batch(2, device), "second_step")  # step 2: two passes
        else:
            assert_bitwise(snapshot(model, opt), before, "one-pass overflow")
            assert scaler.get_scale() == scale * 0.5


def test_overflow_without_skip_nonfinite_still_skips(backend, device):
    """Under a scaler an overflow is expected, not a bug: the check is on regardless."""
    model = make_model(4, device)
    opt = build(SAM, model, backend, skip_nonfinite=False)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
    before = snapshot(model, opt)
    scaled_step(model, opt, scaler, *batch(0, device), "second_step", poison=(2, 1))
    assert_bitwise(snapshot(model, opt), before, "skip_nonfinite=False under a scaler")


def test_scaler_misuse_is_refused_before_anything_changes(backend, device):
    model = make_model(5, device)
    opt = build(SAM, model, backend)
    scaler = torch.amp.GradScaler(device)
    x, y = batch(0, device)
    scaler.scale(loss_of(model, x, y)).backward()
    scaler.unscale_(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="unscale_"):
        opt.first_step(grad_scaler=scaler)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert not opt.perturbed
    # scaler.step() on an optimizer whose first step ignored the scaler
    opt2 = build(SAM, make_model(5, device), backend)
    scaler2 = torch.amp.GradScaler(device)
    model2 = next(iter(opt2.param_groups))["params"]
    for p in model2:
        p.grad = torch.ones_like(p)
    opt2.first_step()
    scaler2.scale(torch.ones((), device=device))  # gives the scaler its scale
    with pytest.raises(RuntimeError, match="grad_scaler"):
        scaler2.step(opt2)
    with pytest.raises(TypeError, match="GradScaler"):
        opt2.second_step(grad_scaler=object())


def test_disabled_scaler_is_plain_sam(backend, device):
    ref_model, model = make_model(6, device), make_model(6, device)
    ref_opt, opt = build(SAM, ref_model, backend), build(SAM, model, backend)
    scaler = torch.amp.GradScaler(device, enabled=False)
    for step in range(2):
        x, y = batch(step, device)
        plain_step(ref_model, ref_opt, x, y)
        scaled_step(model, opt, scaler, x, y, "scaler.step")
    assert_bitwise(snapshot(model, opt), snapshot(ref_model, ref_opt), "disabled scaler")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_trains_and_matches_the_reference(backend, device, dtype):
    """fp16/bf16 autocast over float32 weights: the fused backend follows the reference
    backend (same forward, same scaler) to float32 rounding, and the loss goes down."""
    runs = {}
    for name in ("reference", backend):
        model = make_model(7, device)
        opt = build(SAM, model, name, momentum=0.9)
        scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
        losses = []
        for step in range(8):
            x, y = batch(step % 2, device)
            with torch.autocast(device, dtype=dtype):
                loss = loss_of(model, x, y)
            losses.append(loss.item())
            scaler.scale(loss).backward()
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            with torch.autocast(device, dtype=dtype):
                scaler.scale(loss_of(model, x, y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        runs[name] = ([p.detach().clone() for p in model.parameters()], losses)
    for a, b in zip(runs[backend][0], runs["reference"][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    losses = runs[backend][1]
    assert losses[-1] < losses[0]


def test_bf16_parameters_restore_exactly(any_backend, device):
    """bf16 storage, float32 math: with lr = 0 a whole step gives back the weights bit for bit."""
    model = make_model(8, device, torch.bfloat16)
    opt = build(SAM, model, any_backend)
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0, device)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert_bitwise([p.detach() for p in model.parameters()], before, "bf16 restore")


# ---------------------------------------------------------------------- clipping
def clip_by_torch_step(model, opt, x, y, max_norm: float) -> None:
    """The independent recipe: torch's clip_grad_norm_ on g_p, then an unclipped step."""
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize(
    "base,kw",
    [
        (torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-3)),
        (torch.optim.AdamW, dict(weight_decay=0.01)),
        (torch.optim.RMSprop, dict()),  # not fused: the base step reads clipped p.grad
    ],
    ids=["sgd", "adamw", "rmsprop"],
)
@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clips", "no-op"])
def test_clipping_matches_clip_grad_norm(any_backend, device, base, kw, max_norm):
    ref_model, model = make_model(9, device), make_model(9, device)
    ref_opt = build(SAM, ref_model, any_backend, base, **kw)
    opt = build(SAM, model, any_backend, base, max_grad_norm=max_norm, **kw)
    for step in range(3):
        x, y = batch(step, device)
        clip_by_torch_step(ref_model, ref_opt, x, y, max_norm)
        plain_step(model, opt, x, y)
    # SAM sums the squares for the clip factor in float64, clip_grad_norm_ in float32: the
    # factors can differ in their last bit. SGD and AdamW carry that as it is; RMSprop's
    # g / (sqrt(v) + eps), with v ~ g^2 on the first steps, is ill-conditioned for the few
    # elements whose |g| is near eps, and magnifies it there.
    rtol, atol = (1e-4, 1e-5) if base is torch.optim.RMSprop else (2e-6, 1e-7)
    for a, b in zip(snapshot(model, opt), snapshot(ref_model, ref_opt)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    if max_norm == 0.05:  # the clipping mattered: an unclipped run ends elsewhere
        free_model = make_model(9, device)
        free_opt = build(SAM, free_model, any_backend, base, **kw)
        for step in range(3):
            plain_step(free_model, free_opt, *batch(step, device))
        far = max((a - b).abs().max().item() for a, b in zip(model.parameters(), free_model.parameters()))
        assert far > 1e-3


def test_clipping_with_a_scaler_equals_clipping_without(any_backend, device):
    ref_model, model = make_model(10, device), make_model(10, device)
    ref_opt = build(SAM, ref_model, any_backend, max_grad_norm=0.1, momentum=0.9)
    opt = build(SAM, model, any_backend, max_grad_norm=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    for step in range(3):
        x, y = batch(step, device)
        plain_step(ref_model, ref_opt, x, y)
        scaled_step(model, opt, scaler, x, y, "scaler.step")
    assert_bitwise(snapshot(model, opt), snapshot(ref_model, ref_opt), "clip under a scaler")


def test_gsam_clips_its_own_descent_gradient(backend, device):
    """Float64 simulation: d = g_p - alpha (g - (<g, g_p> / ||g_p||^2) g_p), then
    d <- d * min(1, c / (||d|| + 1e-6)), then plain SGD; rho-normalized SAM ascent."""
    rho, lr, alpha, max_norm = 0.1, 0.05, 0.3, 0.02
    model = make_model(11, device)
    sim = [p.detach().double().cpu().clone() for p in model.parameters()]
    sim_model = make_model(11, "cpu", torch.float64)
    opt = GSAM(model.parameters(), rho=rho, lr=lr, alpha=alpha, max_grad_norm=max_norm, backend=backend)

    def grads_at(ws, x, y):
        with torch.no_grad():
            for p, w in zip(sim_model.parameters(), ws):
                p.copy_(w)
        sim_model.zero_grad()
        loss_of(sim_model, x.double().cpu(), y.cpu()).backward()
        return [p.grad.clone() for p in sim_model.parameters()]

    for step in range(3):
        x, y = batch(step, device)
        g = grads_at(sim, x, y)
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        gp = grads_at([w + rho * t / (norm + 1e-12) for w, t in zip(sim, g)], x, y)
        dot = sum((a * b).sum() for a, b in zip(g, gp))
        gp2 = sum((b * b).sum() for b in gp)
        d = [b - alpha * (a - dot / gp2 * b) for a, b in zip(g, gp)]
        dnorm = torch.sqrt(sum((t * t).sum() for t in d))
        coef = min(1.0, max_norm / (dnorm.item() + 1e-6))
        assert coef < 0.5  # the clip is active
        sim = [w - lr * coef * t for w, t in zip(sim, d)]
        plain_step(model, opt, x, y)
    for p, w in zip(model.parameters(), sim):
        torch.testing.assert_close(p.detach().double().cpu(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "1.0"])
def test_invalid_max_grad_norm_is_refused(device, bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        SAM(make_model(0, device).parameters(), lr=0.1, max_grad_norm=bad)


def test_looksam_refuses_clipping(device):
    with pytest.raises(ValueError, match="LookSAM"):
        LookSAM(make_model(0, device).parameters(), lr=0.1, max_grad_norm=1.0)


# ---------------------------------------------------------------------- resume
def test_resume_with_scaler_and_clipping_is_bit_exact(any_backend, device):
    def fresh():
        model = make_model(12, device)
        opt = build(SAM, model, any_backend, max_grad_norm=0.2, momentum=0.9)
        return model, opt, torch.amp.GradScaler(device, init_scale=2.0**9, growth_interval=3)

    model, opt, scaler = fresh()
    for step in range(6):
        poison = (1, 0) if step == 2 else None  # one skipped step on the way
        scaled_step(model, opt, scaler, *batch(step, device), "scaler.step", poison=poison)
    want = [*snapshot(model, opt), torch.tensor(scaler.get_scale())]

    model, opt, scaler = fresh()
    for step in range(3):
        poison = (1, 0) if step == 2 else None
        scaled_step(model, opt, scaler, *batch(step, device), "scaler.step", poison=poison)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model, opt, scaler = fresh()
    model.load_state_dict(copy.deepcopy(ckpt["model"]))
    opt.load_state_dict(ckpt["opt"])
    scaler.load_state_dict(ckpt["scaler"])
    for step in range(3, 6):
        scaled_step(model, opt, scaler, *batch(step, device), "scaler.step")
    got = [*snapshot(model, opt), torch.tensor(scaler.get_scale())]
    assert_bitwise(got, want, "resume")
