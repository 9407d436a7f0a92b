"""GradScaler's unscaling and max_grad_norm's clipping inside the fused kernels.

Every fused backend multiplies a gradient by ``status[INV_SCALE1]`` / ``status[INV_SCALE2]``
(and the descent gradient by ``status[CLIP]``) in float32 as it loads it, as the reference
does (``g.float() * inv_scale``), and never writes the gradient buffers. Unscaling in the
storage dtype first (what the compiled backends once did) rounds every float16 gradient
whose true value is below float16's normal range (2^-14) to a subnormal, and those under
2^-25 to zero:

* one operation at a time, against the reference, with a scale that is not a power of two
  and another one per pass, so that a kernel reading the wrong entry, multiplying in
  another order or rounding the unscaled gradient to storage first fails;
* a whole float16 SAM run under a GradScaler on the compiled backends, bit for bit the
  reference's, where the old in-place unscaling provably ends elsewhere;
* max_grad_norm on the compiled backends against the reference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import COMPILED, DEVICE
from test_backend_ops import (
    ADAM_CASES,
    DTYPES,
    FUSED,
    SGD_CASES,
    Pair,
    assert_close,
    bits,
    first_step,
    group,
    second_step,
)

from sam_fused import SAM
from sam_fused import status as S
from sam_fused.variants import VARIANTS

SCALE1, SCALE2, CLIP = 3000.0, 5000.0, 0.37
SIZES = [7, 4097, 33]
ON_THE_CPU = pytest.mark.skipif(
    DEVICE != "cpu", reason="nvcc contracts a*b+c into FMAs: on a GPU the kernels round differently"
)


def read_scaled(pair: Pair, clip: bool = False) -> None:
    """Both sides' steps read their gradients times 1/SCALE1 (first pass) or 1/SCALE2 (second),
    and, with ``clip``, the descent gradient times CLIP."""
    for side in pair.sides.values():
        side.unscale, side.clip = True, clip
        side.status[S.INV_SCALE1] = 1.0 / SCALE1
        side.status[S.INV_SCALE2] = 1.0 / SCALE2
        side.status[S.CLIP] = CLIP


def grads_bits(pair: Pair) -> list[torch.Tensor]:
    return [bits(p.grad) for p in pair.fused.params]


# ---------------------------------------------------------------------- one operation at a time
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_first_pass_unscales_as_it_reads(fused, device, dtype, adaptive):
    pair = Pair(fused, SIZES, dtype, device)
    read_scaled(pair)
    pair.set_grads(1, scale=SCALE1)
    before = grads_bits(pair)
    g = group(rho=0.5 if adaptive else 0.05, adaptive=adaptive, eta=0.01)
    for side in pair.sides.values():
        first_step(side, g, VARIANTS["sam"])
    ref, out = pair.ref.status, pair.fused.status
    torch.testing.assert_close(out[S.SUMSQ], ref[S.SUMSQ], rtol=2e-6, atol=0)
    assert ref[S.SUMSQ].item() < 10 * sum(SIZES)  # of the unscaled g ~ N(0, 1), not SCALE1 * g
    pair.compare_params()
    assert all(torch.equal(a, b) for a, b in zip(grads_bits(pair), before))  # read, never written


@pytest.mark.parametrize("fused", FUSED)
def test_the_nonfinite_count_is_taken_before_unscaling(fused, device):
    """A finite float32 gradient that overflows once multiplied by 1/scale (a scale below 1,
    after back-offs) is not counted: the count is the raw gradient's, as GradScaler's own."""
    pair = Pair(fused, SIZES, torch.float32, device)
    read_scaled(pair)
    pair.set_grads(2)
    for side in pair.sides.values():
        side.params[1].grad[100] = 3e38
        side.status[S.INV_SCALE1] = 4.0
        first_step(side, group(), VARIANTS["sam"])
        assert side.status[S.BAD1].item() == 0.0
        assert side.status[S.SUMSQ].item() == float("inf")


UPDATE_CASES = [pytest.param(s, id=f"sgd-{k}") for k, s in SGD_CASES.items()] + [
    pytest.param(s, id=k) for k, s in ADAM_CASES.items()
]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", UPDATE_CASES)
@pytest.mark.parametrize("clip", [False, True], ids=["unclipped", "clipped"])
def test_update_unscales_and_clips_as_it_reads(fused, device, dtype, spec, clip):
    """Two steps with scaled gradients (another scale per pass) and a fixed clipping
    coefficient. SGD's float math is the reference's, so on the CPU its results are the
    reference's bit for bit: (g * inv_scale) * clip in float32, in that order."""
    pair = Pair(fused, SIZES, dtype, device)
    read_scaled(pair, clip)
    for step in range(2):
        pair.set_grads(100 + step, scale=SCALE1)
        perturbed = {name: first_step(side, group(), VARIANTS["sam"]) for name, side in pair.sides.items()}
        pair.set_grads(200 + step, scale=SCALE2)
        before = grads_bits(pair)
        for name, side in pair.sides.items():
            second_step(side, perturbed[name], spec)
        assert all(torch.equal(a, b) for a, b in zip(grads_bits(pair), before))
    pair.compare_params(steps=2)
    if DEVICE == "cpu" and spec in SGD_CASES.values():
        for a, b in zip(pair.fused.params, pair.ref.params):
            assert torch.equal(bits(a), bits(b))
        for name in spec.state_names():
            for i in range(len(SIZES)):
                assert torch.equal(bits(pair.fused.state_of(name, i)), bits(pair.ref.state_of(name, i)))


# ---------------------------------------------------------------------- float16 under a GradScaler
INIT_SCALE = 2.0**14
SHAPES = [(33, 7), (33,), (5, 3, 3)]


def coefficients(step: int, device: str) -> list[torch.Tensor]:
    """The gradients of the loss below: about 2^-20 (float16 holds them only as subnormals
    once unscaled), one in five about 2^-28 (which float16 rounds to zero)."""
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for shape in SHAPES:
        c = torch.randn(shape, generator=gen) * 2.0**-20
        c.view(-1)[::5] *= 2.0**-8
        out.append(c.to(device))
    return out


def loss_of(params: list[torch.Tensor], coefs: list[torch.Tensor]) -> torch.Tensor:
    # linear in the weights: the second pass's gradient does not depend on the perturbation,
    # whose rounding is each backend's own (the norm is summed in another order), so the
    # whole run can be compared bit for bit
    return sum((p.float() * c).sum() for p, c in zip(params, coefs))


def fp16_params(device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(5)
    return [
        torch.nn.Parameter((torch.randn(s, generator=gen) * 0.01).to(device, torch.float16)) for s in SHAPES
    ]


def build(params, backend: str, **kw) -> SAM:
    # lr: a step of about 1e-3, so that the gradients' low bits reach the float16 weights
    return SAM(params, torch.optim.SGD, rho=0.05, lr=1000.0, momentum=0.9, backend=backend, **kw)


def scaled_run(backend: str, device: str, steps: int = 3, **kw) -> list[torch.Tensor]:
    params = fp16_params(device)
    opt = build(params, backend, **kw)
    scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE)
    for step in range(steps):
        coefs = coefficients(step, device)
        scaler.scale(loss_of(params, coefs)).backward()
        assert opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(loss_of(params, coefs)).backward()
        opt.second_step(zero_grad=True)
        scaler.update()
    assert scaler.get_scale() == INIT_SCALE and opt.skipped_steps == 0
    return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]


def in_place_run(device: str, steps: int = 3) -> list[torch.Tensor]:
    """The old way: the scaled float16 gradients times 1/scale in place, then an unscaled step."""
    params = fp16_params(device)
    opt = build(params, "reference")

    def backward(coefs):
        (loss_of(params, coefs) * INIT_SCALE).backward()
        for p in params:
            p.grad.mul_(1.0 / INIT_SCALE)

    for step in range(steps):
        coefs = coefficients(step, device)
        backward(coefs)
        assert opt.first_step(zero_grad=True)
        backward(coefs)
        opt.second_step(zero_grad=True)
    return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]


def test_the_float16_gradients_lose_bits_when_unscaled_in_float16(device):
    """The premise of the run below: its scaled gradients are normal float16 numbers, and
    most of them unscaled in float16 are rounded, some to zero."""
    inv = 1.0 / INIT_SCALE
    for step in range(3):
        for c in coefficients(step, device):
            g = (c * INIT_SCALE).to(torch.float16)  # what the backward pass leaves in p.grad
            exact, in_place = g.float() * inv, (g * inv).to(torch.float16)
            assert (g != 0).all()
            assert ((in_place == 0) & (g != 0)).any()  # flushed
            assert (in_place.float() != exact).float().mean() > 0.5  # rounded


@ON_THE_CPU
@pytest.mark.parametrize("backend", list(COMPILED))
def test_float16_run_under_a_grad_scaler_is_bitwise_the_reference(backend, device):
    want = scaled_run("reference", device)
    got = scaled_run(backend, device)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(bits(a), bits(b)), f"tensor {i} differs from the reference"
    old = in_place_run(device)  # unscaling in float16 first ends elsewhere
    assert any(not torch.equal(bits(a), bits(b)) for a, b in zip(old[: len(SHAPES)], want[: len(SHAPES)]))


# ---------------------------------------------------------------------- max_grad_norm
def mlp(device: str, dtype: torch.dtype) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.to(device=device, dtype=dtype)


def clipped_run(backend: str, device: str, dtype: torch.dtype, scaled: bool, max_norm: float | None):
    model = mlp(device, dtype)
    kw = {} if max_norm is None else {"max_grad_norm": max_norm}
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=backend, **kw)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, enabled=scaled)
    for step in range(3):
        gen = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(17, 7, generator=gen).to(device, dtype)
        y = torch.randint(0, 3, (17,), generator=gen).to(device)
        scaler.scale(torch.nn.functional.cross_entropy(model(x).float(), y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(torch.nn.functional.cross_entropy(model(x).float(), y)).backward()
        opt.second_step(zero_grad=True)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", list(COMPILED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scaler"])
def test_clipping_matches_the_reference(backend, device, dtype, scaled):
    """The coefficient comes from the norm, summed in each backend's own order: float
    rounding apart, the clipped run is the reference's, and far from the unclipped one."""
    want = clipped_run("reference", device, dtype, scaled, 0.05)
    got = clipped_run(backend, device, dtype, scaled, 0.05)
    for a, b in zip(got, want):
        assert_close(a, b, dtype, steps=3)
    free = clipped_run(backend, device, dtype, scaled, None)
    assert max((a.float() - b.float()).abs().max().item() for a, b in zip(got, free)) > 1e-2
