"""Every fused backend's operations against the reference backend, one operation at a time.

Each test runs for every fused backend this process has (``triton`` through the
interpreter, ``cpp``, and ``cuda``: on the CPU its own source built against the CUDA
emulation, on a GPU the real kernels). Each operation is called the way the step engine
calls it, on a bucket of the fused backend (and, as ``<backend>-table``, on one whose
parameters are offset views of larger storages, at unaligned addresses) and on a reference
bucket holding the same numbers, and the results are compared:

* float32 within a few ulps (the norm is summed in another order; the perturbation scales
  ``u`` once instead of dividing every element), bfloat16/float16 within one ulp of the
  storage dtype, and what must be exact (backups, restores, skipped steps, counts) bitwise;
* the norm statistics bitwise equal over repeated runs.

Whole training runs per (variant, base) case are ``test_variants.py``'s table, run on every
backend that declares support; the compiled extensions' build is ``test_extension.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from conftest import DEVICE, FUSED_BACKENDS, backend_instance, in_place_parameter

from sam_fused import status as S
from sam_fused.base_updates import AdamSpec, SGDSpec
from sam_fused.context import StepContext
from sam_fused.layout import Bucket
from sam_fused.lion import LionSpec
from sam_fused.tables import CHUNK
from sam_fused.variants import VARIANTS, Descent, Variant

# each fused backend over parameters of their own, and over offset views of larger storages
# (FSDP2's shards are such views; their addresses are not 16-byte aligned), as "<backend>-table"
TABLE = "-table"
FUSED_CASES = list(FUSED_BACKENDS) + [name + TABLE for name in FUSED_BACKENDS]
FUSED = [pytest.param(name, id=name) for name in FUSED_CASES]


def backend_of(case: str) -> str:
    return case.removesuffix(TABLE)


def parameter(case: str, value: torch.Tensor) -> torch.nn.Parameter:
    """A parameter holding ``value`` as ``case`` lays it out: an offset view for "-table"."""
    return in_place_parameter(value) if case.endswith(TABLE) else torch.nn.Parameter(value.clone())


def interpreted(case: str) -> bool:
    """Whether the case runs through the (slow) Triton interpreter."""
    return backend_of(case) == "triton" and DEVICE == "cpu"


DTYPES = [
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="f16"),
]
SIZES = {"1": [1], "7": [7], "4097": [4097], "mixed": [1, 7, 4097, 5, 165, 33], "1M": [1_000_003]}
SIZE_PARAMS = [pytest.param(v, id=k, marks=[pytest.mark.slow] if k == "1M" else []) for k, v in SIZES.items()]
SMALL_SIZE_PARAMS = [p for p in SIZE_PARAMS if p.id != "1M"]


def with_sizes(size_params: list) -> list:
    """(fused backend, sizes) pairs; the Triton interpreter takes no ~1M-element case (too slow
    there; test_textbook runs one through the whole optimizer)."""
    return [
        pytest.param(name, p.values[0], id=f"{p.id}-{name}", marks=p.marks)
        for name in FUSED_CASES
        for p in size_params
        if not (interpreted(name) and p.id.startswith("1M"))
    ]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, steps: int = 1) -> None:
    """float32: a few ulps; bfloat16/float16: about one ulp (at unit scale) per step taken."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=4e-6 * steps, atol=1e-7 * steps)
    else:
        ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        torch.testing.assert_close(actual, expected, rtol=2 * ulp * steps, atol=ulp * steps)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that NaNs and signed zeros compare exactly."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


# ---------------------------------------------------------------------- harness
@dataclass
class Side:
    """One bucket with its backend and status, as the optimizer has them (``unscale``/``clip``:
    its steps' gradients are read times status[INV_SCALE1/2] / status[CLIP])."""

    bucket: Bucket
    status: torch.Tensor
    unscale: bool = False
    clip: bool = False

    @property
    def backend(self):
        return self.bucket.backend

    @property
    def params(self) -> list[torch.Tensor]:
        return self.bucket.params

    def ctx(self, variant: Variant, check: bool = True, norm_eps: float = 1e-12) -> StepContext:
        return StepContext(variant, {}, norm_eps, check, self.status, self.unscale, self.clip)

    def state_of(self, name: str, i: int) -> torch.Tensor:
        return self.bucket.state_tensor(name, i)

    def backup_of(self, i: int) -> torch.Tensor:
        return self.bucket.state_tensor("backup", i)


def placed(value: torch.Tensor, offset: int) -> torch.nn.Parameter:
    """A parameter holding ``value`` ``offset`` elements into a larger storage: where a table
    launch addresses it in place, an offset that is not a multiple of 16 bytes misaligns it."""
    storage = torch.zeros(value.numel() + offset, dtype=value.dtype, device=value.device)
    view = storage[offset:]
    view.copy_(value)
    return torch.nn.Parameter(view)


class Pair:
    """The same parameters and gradients in a reference bucket and a fused one (``offsets``:
    each parameter that many elements into a storage of its own, see ``placed``)."""

    def __init__(
        self,
        fused: str,
        sizes: list[int],
        dtype: torch.dtype,
        device: str,
        seed: int = 0,
        offsets: list[int] | None = None,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        values = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
        self.dtype, self.device, self.sizes = dtype, torch.device(device), sizes
        self.sides = {}
        for name in ("reference", fused):
            values_here = [v.to(device=device, dtype=dtype) for v in values]
            if offsets is None:
                params = [parameter(name, v) for v in values_here]
            else:
                params = [placed(v, k) for v, k in zip(values_here, offsets)]
            bucket = Bucket(params, 0, backend_instance(backend_of(name)))
            self.sides[name] = Side(bucket, torch.zeros(S.SIZE, dtype=torch.float64, device=device))
        self.ref, self.fused = self.sides["reference"], self.sides[fused]

    def set_grads(self, seed: int, scale: float = 1.0, poison: float | None = None, skip: tuple = ()) -> None:
        """New gradients (the same on both sides); ``poison`` goes into one entry."""
        gen = torch.Generator().manual_seed(seed)
        grads = [torch.randn(n, generator=gen, dtype=torch.float64) * scale for n in self.sizes]
        if poison is not None:
            grads[-1][len(grads[-1]) // 2] = poison
        for side in self.sides.values():
            for i, (p, g) in enumerate(zip(side.params, grads)):
                p.grad = None if i in skip else g.to(device=self.device, dtype=self.dtype)

    def compare_params(self, steps: int = 1) -> None:
        for a, b in zip(self.fused.params, self.ref.params):
            assert_close(a.detach(), b.detach(), self.dtype, steps)


def stats_into(sides: list[tuple[Side, dict]], variant: Variant) -> list:
    """The engine's norm pass over several buckets sharing one partials buffer."""
    plans = [side.bucket.plan() for side, _ in sides]
    slots = [side.backend.partial_slots(side.bucket, plan) for (side, _), plan in zip(sides, plans)]
    status = sides[0][0].status
    partials = torch.zeros(4, sum(slots), dtype=status.dtype, device=status.device)
    offset = 0
    for (side, group), plan, n in zip(sides, plans, slots):
        side.backend.ascent_stats(
            side.bucket, plan, group, side.ctx(variant), partials[:, offset : offset + n]
        )
        offset += n
    torch.sum(partials[:2], dim=1, out=status[S.FIRST_PASS])
    return plans


def first_step(side: Side, group: dict, variant: Variant, check: bool = True, norm_eps: float = 1e-12):
    plan = stats_into([(side, group)], variant)[0]
    side.backend.perturb(side.bucket, plan, group, side.ctx(variant, check, norm_eps))
    return plan


def second_step(side: Side, perturbed, spec, check: bool = True) -> None:
    plan = side.bucket.plan()
    ctx = side.ctx(VARIANTS["sam"], check)
    if check:
        n = side.backend.partial_slots(side.bucket, plan)
        partials = torch.full((4, n), float("nan"), dtype=torch.float64, device=side.status.device)
        side.backend.descent_stats(side.bucket, plan, ctx, partials)
        torch.sum(partials, dim=1, out=side.status[S.SECOND_PASS])
    side.backend.update(side.bucket, perturbed, plan, spec, ctx, Descent.PLAIN)
    side.backend.advance_steps(side.bucket, plan, ctx, True, bool(spec.state_names()), False)


def group(rho: float = 0.05, adaptive: bool = False, eta: float = 0.0) -> dict:
    return {"rho": rho, "adaptive": adaptive, "eta": eta}


SGD = SGDSpec(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, maximize=False)
ADAMW = AdamSpec(
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.05,
    amsgrad=False,
    maximize=False,
    decoupled=True,
)


# ---------------------------------------------------------------------- ascent statistics
@pytest.mark.parametrize("fused,sizes", with_sizes(SIZE_PARAMS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_ascent_stats(fused, device, sizes, dtype, adaptive):
    pair = Pair(fused, sizes, dtype, device)
    pair.set_grads(1)
    g = group(adaptive=adaptive, eta=0.01)
    for side in pair.sides.values():
        stats_into([(side, g)], VARIANTS["sam"])
    ref, out = pair.ref.status, pair.fused.status
    torch.testing.assert_close(out[0], ref[0], rtol=2e-6, atol=0)
    assert out[1].item() == ref[1].item() == 0


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("sizes", SMALL_SIZE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_counts(fused, device, sizes, dtype, poison):
    pair = Pair(fused, sizes, dtype, device)
    pair.set_grads(2, poison=poison)
    for side in pair.sides.values():
        stats_into([(side, group())], VARIANTS["sam"])
        plan = side.bucket.plan()
        slots = side.backend.partial_slots(side.bucket, plan)
        partials = torch.full((4, slots), float("nan"), dtype=torch.float64, device=device)
        side.backend.descent_stats(side.bucket, plan, side.ctx(VARIANTS["sam"]), partials)
        side.status[S.SECOND_PASS] = partials.sum(dim=1)
    for side in (pair.fused, pair.ref):
        assert [side.status[S.BAD1].item(), side.status[S.BAD2].item()] == [1.0, 1.0]
        assert side.status[S.DOT : S.G2 + 1].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ascent_stats_over_several_groups_is_one_norm(fused, device, dtype):
    """Two buckets (groups), one adaptive, share one partials buffer and one norm."""
    pairs = [Pair(fused, [4097, 7], dtype, device, seed=1), Pair(fused, [1, 165], dtype, device, seed=2)]
    groups = [group(adaptive=True, eta=0.01), group(rho=0.1)]
    for k, pair in enumerate(pairs):
        pair.set_grads(10 + k)
    for name in ("reference", fused):  # status: the first bucket's, as the optimizer's one
        stats_into([(pair.sides[name], g) for pair, g in zip(pairs, groups)], VARIANTS["sam"])
    torch.testing.assert_close(pairs[0].fused.status[0], pairs[0].ref.status[0], rtol=2e-6, atol=0)


# ---------------------------------------------------------------------- perturbation and restore
@pytest.mark.parametrize("fused,sizes", with_sizes(SIZE_PARAMS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "variant,adaptive,eta",
    [("sam", False, 0.0), ("sam", True, 0.0), ("sam", True, 0.01), ("usam", False, 0.0)],
)
def test_perturb_and_restore(fused, device, sizes, dtype, variant, adaptive, eta):
    pair = Pair(fused, sizes, dtype, device)
    pair.set_grads(3, scale=0.1)
    original = [p.detach().clone() for p in pair.ref.params]
    g = group(rho=0.5 if adaptive else 0.05, adaptive=adaptive, eta=eta)
    plans = {name: first_step(side, g, VARIANTS[variant]) for name, side in pair.sides.items()}
    pair.compare_params()
    moved = any(not torch.equal(p.detach(), w) for p, w in zip(pair.fused.params, original))
    assert moved or dtype != torch.float32
    for i, w in enumerate(original):  # the backup is the weights, bit for bit
        assert torch.equal(bits(pair.fused.backup_of(i)), bits(w))
    for name, side in pair.sides.items():
        side.backend.restore(side.bucket, plans[name])
    for side in pair.sides.values():
        for p, w in zip(side.params, original):
            assert torch.equal(bits(p), bits(w))


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_with_zero_gradient_is_zero(fused, device, dtype):
    pair = Pair(fused, [4097, 7], dtype, device)
    pair.set_grads(4, scale=0.0)
    before = [p.detach().clone() for p in pair.fused.params]
    first_step(pair.fused, group(), VARIANTS["sam"])
    for p, w in zip(pair.fused.params, before):
        assert torch.equal(bits(p), bits(w))


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("sizes", SMALL_SIZE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_skips_on_a_nonfinite_first_gradient(fused, device, sizes, dtype):
    pair = Pair(fused, sizes, dtype, device)
    pair.set_grads(5, poison=float("nan"))
    before = [p.detach().clone() for p in pair.fused.params]
    first_step(pair.fused, group(adaptive=True), VARIANTS["sam"])
    for i, (p, w) in enumerate(zip(pair.fused.params, before)):
        assert torch.equal(bits(p), bits(w))
        assert torch.equal(bits(pair.fused.backup_of(i)), bits(w))


# ---------------------------------------------------------------------- base updates
SGD_CASES = {
    "plain": replace(SGD, momentum=0.0, weight_decay=0.0),
    "wd": replace(SGD, momentum=0.0),
    "momentum": SGD,
    "dampening": replace(SGD, dampening=0.3),
    "nesterov": replace(SGD, nesterov=True),
    "maximize": replace(SGD, maximize=True, nesterov=True),
}
ADAM_CASES = {
    "adamw": ADAMW,
    "adam-l2": replace(ADAMW, decoupled=False, weight_decay=1e-2),
    "adam-no-wd": replace(ADAMW, weight_decay=0.0),
    "amsgrad": replace(ADAMW, amsgrad=True),
    "maximize": replace(ADAMW, maximize=True),
    "beta1-small": replace(ADAMW, beta1=0.3, beta2=0.9),  # the other branch of torch.lerp
}
LION = LionSpec(lr=2e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)
LION_CASES = {
    "lion": LION,
    "lion-no-wd": replace(LION, weight_decay=0.0),
    "lion-maximize": replace(LION, maximize=True, beta1=0.95, beta2=0.98),
}
UPDATE_CASES = (
    [pytest.param(s, id=f"sgd-{k}") for k, s in SGD_CASES.items()]
    + [pytest.param(s, id=k) for k, s in ADAM_CASES.items()]
    + [pytest.param(s, id=k) for k, s in LION_CASES.items()]
)
# every update case at the small sizes; the ~1M size (slow) for the three main ones
SIZED_UPDATE_CASES = [
    pytest.param(v, case.values[0], id=f"{k}-{case.id}")
    for k, v in SIZES.items()
    if k != "1M"
    for case in UPDATE_CASES
] + [
    pytest.param(SIZES["1M"], case.values[0], id=f"1M-{case.id}", marks=pytest.mark.slow)
    for case in UPDATE_CASES
    if case.id in ("sgd-momentum", "adamw", "amsgrad")
]


UPDATE_TABLE = [
    pytest.param(name, *case.values, id=f"{case.id}-{name}", marks=case.marks)
    for name in FUSED_CASES
    for case in SIZED_UPDATE_CASES
    if not (interpreted(name) and case.id.startswith("1M"))
    and backend_instance(backend_of(name)).capabilities.fuses(case.values[1])
]


def run_steps(pair: Pair, spec, steps: int, g: dict, check: bool = True) -> None:
    for step in range(steps):
        pair.set_grads(100 + step)
        perturbed = {name: first_step(side, g, VARIANTS["sam"], check) for name, side in pair.sides.items()}
        pair.set_grads(200 + step)
        for name, side in pair.sides.items():
            second_step(side, perturbed[name], spec, check)


@pytest.mark.parametrize("fused,sizes,spec", UPDATE_TABLE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_update(fused, device, sizes, dtype, spec):
    """Three SAM steps (the first-update rule, then the running state) on both backends."""
    pair = Pair(fused, sizes, dtype, device)
    run_steps(pair, spec, 3, group(adaptive=True, eta=0.01))
    pair.compare_params(steps=3)
    for name in spec.state_names():
        for i in range(len(sizes)):
            assert_close(pair.fused.state_of(name, i), pair.ref.state_of(name, i), dtype, steps=3)
    assert torch.equal(pair.fused.bucket.steps, pair.ref.bucket.steps)
    counted = 3.0 if spec.state_names() else 0.0  # counts move only for updates that keep state
    assert pair.fused.bucket.steps.tolist() == [counted] * len(sizes)


@pytest.mark.skipif(
    DEVICE != "cpu", reason="nvcc contracts a*b+c into FMAs: on a GPU the kernels round differently"
)
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [pytest.param(s, id=k) for k, s in SGD_CASES.items()])
def test_sgd_update_is_bitwise_the_reference_on_the_cpu(fused, dtype, spec):
    """SGD's float math has the reference's order and no FMA (-ffp-contract=off for the
    compiled sources, numpy for the interpreter), and the bfloat16/float16 conversions are
    torch's bit for bit: so the CPU results are identical."""
    # past the C++ backend's 32 Ki-element blocks, and several of Triton's 4096-element ones
    pair = Pair(fused, SIZES["mixed"] + [3 * 4096 + 5 if interpreted(fused) else 65536 + 3], dtype, "cpu")
    run_steps(pair, spec, 3, group())
    for a, b in zip(pair.fused.params, pair.ref.params):
        assert torch.equal(bits(a), bits(b))
    for name in spec.state_names():
        for i in range(len(pair.sizes)):
            assert torch.equal(bits(pair.fused.state_of(name, i)), bits(pair.ref.state_of(name, i)))


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_every_low_precision_value_survives_the_float32_round_trip(fused, device, dtype):
    """All 2^16 bit patterns through an update that changes nothing (lr = 0): the kernels'
    conversions to float32 and back are exact, infinities and signed zeros included."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(device)
    param = parameter(fused, patterns)
    param.grad = torch.ones_like(param)
    bucket = Bucket([param], 0, backend_instance(backend_of(fused)))
    plan = bucket.plan()
    spec = replace(SGD, lr=0.0, momentum=0.0, weight_decay=0.0)
    bucket.state_tensor("backup", 0).copy_(param.detach())  # the update reads w from the backup
    status = torch.zeros(S.SIZE, dtype=torch.float64, device=device)
    ctx = StepContext(VARIANTS["sam"], {}, 1e-12, False, status)
    bucket.backend.update(bucket, plan, plan, spec, ctx, Descent.PLAIN)
    out, expected = param.detach().cpu(), patterns.cpu()
    finite = ~torch.isnan(expected)
    assert torch.equal(bits(out[finite]), bits(expected[finite]))
    assert torch.isnan(out[~finite]).all()


# each fused backend with each update case it declares it fuses (capabilities.fuses)
FUSED_UPDATES = [
    pytest.param(name, case.values[0], id=f"{case.id}-{name}")
    for name in FUSED_CASES
    for case in UPDATE_CASES
    if backend_instance(backend_of(name)).capabilities.fuses(case.values[0])
]


@pytest.mark.parametrize("fused,spec", FUSED_UPDATES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_without_the_nonfinite_check(fused, device, dtype, spec):
    pair = Pair(fused, SIZES["mixed"], dtype, device)
    run_steps(pair, spec, 2, group(), check=False)
    pair.compare_params(steps=2)


@pytest.mark.parametrize("fused,spec", FUSED_UPDATES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass_", [1, 2])
def test_nonfinite_gradient_skips_the_whole_step(fused, device, dtype, spec, pass_):
    """A NaN in either pass: params, state and step counts bitwise unchanged; one skip counted."""
    pair = Pair(fused, SIZES["mixed"], dtype, device)
    run_steps(pair, spec, 1, group())
    side = pair.fused
    names = spec.state_names()
    snap = [bits(p) for p in side.params] + [
        bits(side.state_of(n, i)) for n in names for i in range(len(side.params))
    ]
    steps = side.bucket.steps.clone()
    pair.set_grads(7, poison=float("nan") if pass_ == 1 else None)
    perturbed = first_step(side, group(), VARIANTS["sam"])
    pair.set_grads(8, poison=float("nan") if pass_ == 2 else None)
    second_step(side, perturbed, spec)
    after = [bits(p) for p in side.params] + [
        bits(side.state_of(n, i)) for n in names for i in range(len(side.params))
    ]
    assert all(torch.equal(a, b) for a, b in zip(after, snap))
    assert torch.equal(side.bucket.steps, steps)
    assert side.status[S.SKIPPED].item() == 1.0


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("spec", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_update_after_a_separate_restore(fused, device, spec):
    """A parameter without a second-pass gradient: restore its run, then update the others."""
    pair = Pair(fused, [7, 4097, 33, 5], torch.float32, device)
    pair.set_grads(1)
    perturbed = {name: first_step(side, group(), VARIANTS["sam"]) for name, side in pair.sides.items()}
    original_skipped = pair.ref.bucket.state_tensor("backup", 1).clone()
    pair.set_grads(2, skip=(1,))
    for name, side in pair.sides.items():
        second_step(side, perturbed[name], spec)
    pair.compare_params()
    assert torch.equal(pair.fused.params[1].detach(), original_skipped)  # restored, not updated
    assert pair.fused.bucket.steps.tolist() == [1.0, 0.0, 1.0, 1.0] == pair.ref.bucket.steps.tolist()


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("size", [4 * 256 * 8 * 3 + 4, 8 * 256 * 8 * 2 + 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_runs_longer_than_the_grid(fused, device, size, dtype):
    """Runs longer than one grid: the emulated CUDA backend has one SM, so its elementwise
    grid is 8 blocks of 256 threads and these runs (16-byte packs) take several turns of the
    grid-stride loop; Triton's grids and the C++ blocks are cut differently and checked too."""
    pair = Pair(fused, [size, 8], dtype, device)
    original = [p.detach().clone() for p in pair.fused.params]
    run_steps(pair, replace(ADAMW, amsgrad=True), 2, group())
    pair.compare_params(steps=2)
    if dtype == torch.float32:  # a step of 1e-3 moves every float32 weight
        assert all((p.detach() != w).all() for p, w in zip(pair.fused.params, original))


# ---------------------------------------------------------------------- determinism
@pytest.mark.parametrize("fused", FUSED)
def test_norm_is_bitwise_reproducible(fused, device):
    sizes = [100_003, 4097, 7] if interpreted(fused) else [1_000_003, 4097, 7]
    pair = Pair(fused, sizes, torch.float32, device)
    pair.set_grads(9)
    side = pair.fused
    plan = side.bucket.plan()
    n = side.backend.partial_slots(side.bucket, plan)
    # several partials, so that their order could matter (foreach sums its rows in a fixed
    # order itself, into one partial)
    assert n > 2 or backend_of(fused) == "foreach"
    results = []
    for _ in range(3):
        partials = torch.full((4, n), float("nan"), dtype=torch.float64, device=device)
        side.backend.ascent_stats(
            side.bucket, plan, group(adaptive=True), side.ctx(VARIANTS["sam"]), partials
        )
        results.append(bits(partials[:2]))
    assert all(torch.equal(r, results[0]) for r in results)


# ---------------------------------------------------------------------- table launches
# The compiled backends' table launches, beyond the parity table above: parameters at
# unaligned addresses against parameters of their own, chunk edges, per-tensor update counts,
# mixed alignment, one launch per operation. The CUDA library cuts each tensor into
# CHUNK-element rows of the chunk table (sam_fused/tables.py), one thread block each; the
# C++ library into its own slots.
TABLE_CASES = [name for name in FUSED_CASES if name.endswith(TABLE) and not interpreted(name)]
COMPILED_TABLES = [pytest.param(name, id=name) for name in ("cpp", "cuda") if name in FUSED_BACKENDS]


def table_slots(backend: str, sizes: list[int]) -> int:
    """The partial sums of a table launch: the C++ library's slots per tensor (one per 64 Ki
    elements, at least one), the CUDA library's chunk rows (none for an empty tensor)."""
    if backend == "cpp":
        return sum(max(1, -(-n // 65536)) for n in sizes)
    return sum(-(-n // CHUNK) for n in sizes)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU library, or the CUDA one emulated on the CPU")
@pytest.mark.parametrize("backend", COMPILED_TABLES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [SGD, ADAM_CASES["amsgrad"]], ids=["sgd", "amsgrad"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_offset_views_run_bitwise_like_parameters_of_their_own(backend, dtype, spec, adaptive):
    """Each library walks every tensor from its own address, aligned or not, with the same
    element math: given the same status, the perturbation, the restore and the update write the
    same bits over parameters with storages of their own (aligned: 16-byte packs on CUDA) and
    over offset views of larger storages (unaligned: element by element). The norm statistics
    agree to rounding: a block's packs and single elements add up in different orders."""
    sizes = [1, 7, 0, 4097, 70_001, 33, 1023, 1025]  # an empty tensor; 70_001 > one 64 Ki slot
    gen = torch.Generator().manual_seed(3)
    values = [torch.randn(n, generator=gen) for n in sizes]
    instance = backend_instance(backend)
    buckets = [
        Bucket([make(v.to(dtype)) for v in values], 0, instance)
        for make in (lambda v: torch.nn.Parameter(v.clone()), in_place_parameter)
    ]
    sides = [Side(bucket, torch.zeros(S.SIZE, dtype=torch.float64)) for bucket in buckets]
    flat, table = sides  # parameters of their own; offset views
    g = group(adaptive=adaptive, eta=0.01 if adaptive else 0.0)
    variant = VARIANTS["sam"]

    def set_grads(seed: int) -> None:
        grads = [torch.randn(n, generator=torch.Generator().manual_seed(seed + n)) for n in sizes]
        for side in sides:
            for p, grad in zip(side.params, grads):
                p.grad = grad.to(dtype)

    def assert_same_bits(names: tuple[str, ...]) -> None:
        for i in range(len(sizes)):
            assert torch.equal(bits(flat.params[i]), bits(table.params[i])), f"param {i}"
            for name in names:
                assert torch.equal(bits(flat.state_of(name, i)), bits(table.state_of(name, i))), f"{name} {i}"

    for step in range(3):
        set_grads(100 * step)
        plans = [stats_into([(side, g)], variant)[0] for side in sides]
        assert instance.partial_slots(table.bucket, plans[1]) == table_slots(backend, sizes)
        torch.testing.assert_close(table.status, flat.status, rtol=1e-6, atol=0)
        table.status.copy_(flat.status)  # the same norm, so the same perturbation
        for side, plan in zip(sides, plans):
            side.backend.perturb(side.bucket, plan, g, side.ctx(variant))
        assert_same_bits(())
        for i in range(len(sizes)):
            assert torch.equal(bits(flat.backup_of(i)), bits(table.backup_of(i)))
        set_grads(100 * step + 50)
        for side, plan in zip(sides, plans):
            ctx = side.ctx(variant)
            slots = side.backend.partial_slots(side.bucket, plan)
            partials = torch.full((4, slots), float("nan"), dtype=torch.float64)
            side.backend.descent_stats(side.bucket, plan, ctx, partials)
            torch.sum(partials, dim=1, out=side.status[S.SECOND_PASS])
        torch.testing.assert_close(table.status, flat.status, rtol=1e-6, atol=0)
        table.status.copy_(flat.status)
        for side, plan in zip(sides, plans):
            ctx = side.ctx(variant)
            side.backend.update(side.bucket, plan, plan, spec, ctx, Descent.PLAIN)
            side.backend.advance_steps(side.bucket, plan, ctx, True, True, False)
        assert_same_bits(spec.state_names())


# one and two chunks and their edges, an empty tensor, and many tiny tensors (a block each)
CHUNK_EDGES = [1023, 1024, 1025, 0, 1, 7, 2048, 4097] + [1, 2, 3, 5] * 16
TABLE_UPDATE_CASES = [
    pytest.param(SGD_CASES[k], id=f"sgd-{k}") for k in ("momentum", "nesterov", "maximize", "wd")
] + [pytest.param(ADAM_CASES[k], id=k) for k in ("adamw", "adam-l2", "amsgrad", "maximize")]


@pytest.mark.parametrize("fused", TABLE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", TABLE_UPDATE_CASES)
def test_table_launch_at_chunk_edges(fused, device, dtype, spec):
    """Three SAM steps over tensors that end just before, at and after a chunk's edge, with an
    empty one and 64 tiny ones, against the reference: the norm, every weight, every state."""
    pair = Pair(fused, CHUNK_EDGES, dtype, device, seed=4)
    run_steps(pair, spec, 3, group(adaptive=True, eta=0.01))
    torch.testing.assert_close(pair.fused.status[S.SUMSQ], pair.ref.status[S.SUMSQ], rtol=2e-6, atol=0)
    pair.compare_params(steps=3)
    for name in spec.state_names():
        for i in range(len(CHUNK_EDGES)):
            assert_close(pair.fused.state_of(name, i), pair.ref.state_of(name, i), dtype, steps=3)
    counted = 3.0 if spec.state_names() else 0.0  # counts move only for updates that keep state
    assert pair.fused.bucket.steps.tolist() == [counted] * len(CHUNK_EDGES)


@pytest.mark.parametrize("fused", TABLE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [SGD, ADAM_CASES["amsgrad"]], ids=["sgd", "amsgrad"])
def test_table_launch_reads_each_tensor_s_own_update_count(fused, device, dtype, spec):
    """Tensors whose update counts differ in one launch: some take no part in a step (no
    gradient), so they are left out of its plan, and a chunk row's tensor slot (its place in
    the role tables) differs from its count index (its place in the bucket). SGD's first-step
    rule and Adam's bias corrections read each tensor's own count."""
    sizes = [5, 1030, 7, 600, 2049, 3]
    pair = Pair(fused, sizes, dtype, device, seed=5)
    g = group()
    for step, skip in enumerate([(1, 3), (0,), (), (2, 5)]):
        pair.set_grads(300 + step, skip=skip)
        perturbed = {name: first_step(side, g, VARIANTS["sam"]) for name, side in pair.sides.items()}
        pair.set_grads(400 + step, skip=skip)
        for name, side in pair.sides.items():
            second_step(side, perturbed[name], spec)
        pair.compare_params(steps=step + 1)
        for name in spec.state_names():
            for i in range(len(sizes)):
                assert_close(pair.fused.state_of(name, i), pair.ref.state_of(name, i), dtype, steps=step + 1)
        assert torch.equal(pair.fused.bucket.steps, pair.ref.bucket.steps)
    assert pair.fused.bucket.steps.tolist() == [3.0, 3.0, 3.0, 3.0, 4.0, 3.0]


@pytest.mark.parametrize("fused", TABLE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [SGD, ADAM_CASES["amsgrad"]], ids=["sgd", "amsgrad"])
def test_table_launch_mixes_aligned_and_unaligned_tensors(fused, device, dtype, spec):
    """Parameters at element offsets 0, 1, 3, 8 and 16 of their storages: some addresses are
    16-byte aligned (a block loads 16-byte packs), some are not (a block falls back to single
    elements), in one launch; the results are the reference's either way."""
    sizes = [1025, 7, 2051, 33, 4097]
    offsets = [0, 1, 3, 8, 16]
    pair = Pair(fused, sizes, dtype, device, seed=6, offsets=offsets)
    addresses = [p.data_ptr() % 16 for p in pair.fused.params]
    assert 0 in addresses and any(addresses), addresses  # both kinds are in the launch
    run_steps(pair, spec, 2, group(adaptive=True, eta=0.01))
    pair.compare_params(steps=2)
    for name in spec.state_names():
        for i in range(len(sizes)):
            assert_close(pair.fused.state_of(name, i), pair.ref.state_of(name, i), dtype, steps=2)


@pytest.mark.parametrize("fused", TABLE_CASES)
def test_table_launch_of_no_tensor_changes_nothing(fused, device):
    """A bucket none of whose parameters has a gradient: the plan is empty, the statistics
    have no partial sum, and the perturbation, restore and update leave everything as it was."""
    pair = Pair(fused, [7, 1025], torch.float32, device)
    pair.set_grads(1, skip=(0, 1))
    side = pair.fused
    before = [bits(p) for p in side.params]
    plan = side.bucket.plan()
    assert plan.empty and side.backend.partial_slots(side.bucket, plan) == 0
    perturbed = first_step(side, group(), VARIANTS["sam"])
    side.backend.restore(side.bucket, perturbed)
    second_step(side, perturbed, ADAM_CASES["amsgrad"])
    assert all(torch.equal(bits(p), b) for p, b in zip(side.params, before))
    assert side.bucket.steps.tolist() == [0.0, 0.0]


@pytest.mark.skipif(
    DEVICE != "cpu" or "cuda" not in FUSED_BACKENDS, reason="counts the emulated CUDA library's launches"
)
@pytest.mark.parametrize("n_tensors", [3, 300])
def test_cuda_table_bucket_takes_one_launch_per_operation(n_tensors):
    """However many tensors a table bucket holds, each operation of the CUDA library is one
    kernel launch over the chunk table (the emulation counts launches)."""
    sizes = [1 + (37 * i) % 3000 for i in range(n_tensors)]  # tiny to three-chunk tensors
    pair = Pair("cuda" + TABLE, sizes, torch.float32, "cpu", seed=7)
    side = pair.fused
    backend, bucket = side.backend, side.bucket
    counter = torch.ops.sam_fused_cuda_emulated.emulated_launches

    def launches(operation, *args) -> int:
        before = counter()
        operation(bucket, *args)
        return counter() - before

    pair.set_grads(1)
    plan = bucket.plan()
    ctx = side.ctx(VARIANTS["sam"])
    partials = torch.zeros(4, backend.partial_slots(bucket, plan), dtype=torch.float64)
    assert partials.shape[1] == sum(-(-n // CHUNK) for n in sizes) >= n_tensors
    assert launches(backend.ascent_stats, plan, group(adaptive=True), ctx, partials) == 1
    assert launches(backend.perturb, plan, group(adaptive=True), ctx) == 1
    assert launches(backend.restore, plan) == 1
    assert launches(backend.perturb, plan, group(), ctx) == 1
    assert launches(backend.descent_stats, plan, ctx, partials) == 1
    for spec in (SGD, ADAM_CASES["amsgrad"]):
        assert launches(backend.update, plan, plan, spec, ctx, Descent.PLAIN) == 1
    assert launches(backend.advance_steps, plan, ctx, True, True, False) == 1
