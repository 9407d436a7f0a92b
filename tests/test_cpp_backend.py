"""The compiled backends against the reference: every operation, then whole training runs.

On the CPU (the default) this exercises the C++ extension (``backend="cpp"``), JIT-built on
first use; with ``SAM_FUSED_TEST_DEVICE=cuda`` the same tests exercise the CUDA extension
(``backend="cuda"``). Each operation is called the way ``SAM.first_step`` and
``second_step`` call it, on a flat bucket of the compiled backend and on a reference
bucket holding the same numbers, and the results are compared:

* float32 within a few ulps (the norm is summed in another order; the perturbation scales
  ``u`` once instead of dividing every element), bfloat16/float16 within one ulp of the
  storage dtype, and what must be exact (backups, restores, skipped steps, counts) bitwise;
* the norm statistics bitwise equal over repeated runs and across OMP_NUM_THREADS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sam_fused import SAM, available_backends
from sam_fused import status as S
from sam_fused._extension import NO_BUILD_ENV, _Extension
from sam_fused.backends import CppBackend, CudaBackend, make_backend
from sam_fused.backends.reference import StepContext
from sam_fused.base_updates import AdamSpec, SGDSpec
from sam_fused.layout import Bucket
from sam_fused.variants import DESCENT, VARIANTS, Variant

DEVICE = os.environ.get("SAM_FUSED_TEST_DEVICE", "cpu")
COMPILED = "cuda" if DEVICE == "cuda" else "cpp"
INFO = (CudaBackend if COMPILED == "cuda" else CppBackend).info()  # builds on first use
ROOT = Path(__file__).resolve().parent.parent

needs_compiled = pytest.mark.skipif(
    not INFO,
    reason=f"the {COMPILED} backend is unavailable here: {INFO.detail} (environment limitation)",
)

DTYPES = [
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="f16"),
]
SIZES = {
    "1": [1],
    "7": [7],
    "4097": [4097],
    "mixed": [1, 7, 4097, 5, 165, 33],
    "1M": [1_000_003],
}
SIZE_PARAMS = [pytest.param(v, id=k, marks=[pytest.mark.slow] if k == "1M" else []) for k, v in SIZES.items()]
SMALL_SIZE_PARAMS = [p for p in SIZE_PARAMS if p.id != "1M"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, steps: int = 1) -> None:
    """float32: a few ulps; bfloat16/float16: about one ulp (at unit scale) per step taken.

    After several steps a one-ulp difference in a low-precision weight feeds the next
    step's weight decay and moments, so the allowance grows with the steps compared.
    """
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
    """One bucket with its backend, status and per-parameter state, as the optimizer has."""

    bucket: Bucket
    status: torch.Tensor
    state: dict

    @property
    def backend(self):
        return self.bucket.backend

    @property
    def params(self) -> list[torch.Tensor]:
        return self.bucket.params

    def ctx(self, variant: Variant, check: bool = True, norm_eps: float = 1e-12) -> StepContext:
        return StepContext(variant, {}, norm_eps, check, self.status, self.state)

    def state_of(self, name: str, i: int) -> torch.Tensor:
        if self.bucket.fused:
            return self.bucket.state_view(name, i)
        return self.state[self.params[i]][name]


class Pair:
    """The same parameters and gradients in a reference bucket and a compiled one."""

    def __init__(self, sizes: list[int], dtype: torch.dtype, device: str, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        values = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
        self.dtype = dtype
        self.device = torch.device(device)
        self.sizes = sizes
        self.sides = {}
        for name in ("reference", COMPILED):
            params = [torch.nn.Parameter(v.to(device=device, dtype=dtype)) for v in values]
            backend = make_backend(name, self.device, dtype)
            bucket = Bucket(params, 0, fused=name != "reference", backend=backend)
            self.sides[name] = Side(bucket, torch.zeros(S.SIZE, device=device), defaultdict(dict))
        self.ref = self.sides["reference"]
        self.fused = self.sides[COMPILED]

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
    """The optimizer's norm pass over several buckets sharing one partials buffer."""
    plans = [side.bucket.plan() for side, _ in sides]
    slots = [side.backend.partial_slots(side.bucket, plan) for (side, _), plan in zip(sides, plans)]
    status = sides[0][0].status
    partials = torch.zeros(4, sum(slots), device=status.device)
    offset = 0
    for (side, group), plan, n in zip(sides, plans, slots):
        ctx = side.ctx(variant)
        side.backend.ascent_stats(side.bucket, plan, group, ctx, partials[:, offset : offset + n])
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
        partials = torch.full((4, n), float("nan"), device=side.status.device)
        side.backend.descent_stats(side.bucket, plan, ctx, partials)
        torch.sum(partials, dim=1, out=side.status[S.SECOND_PASS])
    side.backend.update(side.bucket, perturbed, plan, spec, ctx, DESCENT.PLAIN)
    side.backend.advance_steps(side.bucket, plan, ctx, count_skip=True)


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


# ---------------------------------------------------------------------- availability
def test_compiled_backend_is_available_where_it_should_be():
    """CI builds the CPU extension: a broken build must fail here, not skip everything."""
    if COMPILED == "cuda":
        if not INFO:
            pytest.skip(f"the cuda backend is unavailable: {INFO.detail} (environment limitation)")
    elif os.environ.get(NO_BUILD_ENV, "0") in ("", "0"):
        assert INFO, f"the C++ CPU extension did not build: {INFO.detail}"
    info = available_backends()
    assert set(info) >= {"reference", "triton", "cpp", "cuda"}
    assert info["reference"] and info[COMPILED] == INFO


@needs_compiled
def test_auto_picks_cpp_for_cpu_tensors_and_names_are_validated():
    if COMPILED != "cpp":
        pytest.skip("the CPU backend's choice is tested on the CPU")
    params = [torch.nn.Parameter(torch.randn(3, dtype=dt)) for dt in (torch.float32, torch.bfloat16)]
    assert SAM(params, lr=0.1).backends == ["cpp", "cpp"]
    assert SAM([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], lr=0.1).backends == ["reference"]
    with pytest.raises(ValueError, match="float64"):
        SAM([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], lr=0.1, backend="cpp")
    with pytest.raises(ValueError, match="CUDA tensors"):
        SAM([torch.nn.Parameter(torch.randn(3))], lr=0.1, backend="cuda")


def test_unavailable_extension_warns_once_and_reports_why(monkeypatch):
    monkeypatch.delenv(NO_BUILD_ENV, raising=False)
    ext = _Extension("cpp", "sam_fused._C_missing", "sam_fused_missing", "sam_fused_missing", ["nope.cpp"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ext.info()
        second = ext.info()
    assert not first and first is second and "sources" in first.detail
    assert len([w for w in caught if "sam_fused" in str(w.message)]) == 1
    assert ext.ops() is None


def test_no_build_falls_back_to_the_reference_without_a_warning():
    code = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("error")
        import torch, sam_fused
        m = torch.nn.Linear(3, 1)
        o = sam_fused.SAM(m.parameters(), lr=0.1)
        m(torch.randn(4, 3)).sum().backward(); o.first_step(True)
        m(torch.randn(4, 3)).sum().backward(); o.second_step()
        print(o.backends, bool(sam_fused.available_backends()["cpp"]))
        """
    )
    env = dict(os.environ, **{NO_BUILD_ENV: "1", "PYTHONPATH": str(ROOT)})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "['reference'] False"


@needs_compiled
@pytest.mark.parametrize("variant", ["vasso", "fsam", "rsam", "gsam", "looksam"])
def test_variants_without_kernels_are_refused_at_construction(device, variant):
    model = torch.nn.Linear(7, 3).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"no kernels for variant {variant!r}"):
        SAM(model.parameters(), torch.optim.SGD, variant=variant, backend=COMPILED, lr=0.1)
    # auto sends them elsewhere (reference on the CPU, Triton on CUDA)
    opt = SAM(model.parameters(), torch.optim.SGD, variant=variant, lr=0.1)
    assert COMPILED not in opt.backends
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@needs_compiled
@pytest.mark.parametrize("variant", ["sam", "usam", "gcsam", "interval"])
def test_auto_runs_gradient_ascent_variants_on_the_compiled_backend(device, variant):
    model = torch.nn.Linear(7, 3).to(device)
    opt = SAM(model.parameters(), torch.optim.SGD, variant=variant, lr=0.1)
    assert opt.backends == [COMPILED]


# ---------------------------------------------------------------------- ascent statistics
@needs_compiled
@pytest.mark.parametrize("sizes", SIZE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_ascent_stats(device, sizes, dtype, adaptive):
    pair = Pair(sizes, dtype, device)
    pair.set_grads(1)
    g = group(adaptive=adaptive, eta=0.01)
    for side in pair.sides.values():
        stats_into([(side, g)], VARIANTS["sam"])
    ref, fused = pair.ref.status, pair.fused.status
    torch.testing.assert_close(fused[0], ref[0], rtol=2e-6, atol=0)
    assert fused[1].item() == ref[1].item() == 0


@needs_compiled
@pytest.mark.parametrize("sizes", SIZE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_counts(device, sizes, dtype, poison):
    pair = Pair(sizes, dtype, device)
    pair.set_grads(2, poison=poison)
    for side in pair.sides.values():
        stats_into([(side, group())], VARIANTS["sam"])
        plan = side.bucket.plan()
        partials = torch.full((4, side.backend.partial_slots(side.bucket, plan)), float("nan"), device=device)
        side.backend.descent_stats(side.bucket, plan, side.ctx(VARIANTS["sam"]), partials)
        side.status[S.SECOND_PASS] = partials.sum(dim=1)
    for side in (pair.fused, pair.ref):
        assert [side.status[S.BAD1].item(), side.status[S.BAD2].item()] == [1.0, 1.0]
        assert side.status[S.DOT : S.G2 + 1].tolist() == [0.0, 0.0, 0.0]


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_ascent_stats_over_several_groups_is_one_norm(device, dtype):
    """Two buckets (groups), one adaptive, share one partials buffer and one norm."""
    pairs = [Pair([4097, 7], dtype, device, seed=1), Pair([1, 165], dtype, device, seed=2)]
    groups = [group(adaptive=True, eta=0.01), group(rho=0.1)]
    for k, pair in enumerate(pairs):
        pair.set_grads(10 + k)
    for name in ("reference", COMPILED):  # status: the first bucket's, as the optimizer's one
        stats_into([(pair.sides[name], g) for pair, g in zip(pairs, groups)], VARIANTS["sam"])
    torch.testing.assert_close(pairs[0].fused.status[0], pairs[0].ref.status[0], rtol=2e-6, atol=0)


# ---------------------------------------------------------------------- perturbation and restore
@needs_compiled
@pytest.mark.parametrize("sizes", SIZE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "variant,adaptive,eta",
    [("sam", False, 0.0), ("sam", True, 0.0), ("sam", True, 0.01), ("usam", False, 0.0)],
)
def test_perturb_and_restore(device, sizes, dtype, variant, adaptive, eta):
    pair = Pair(sizes, dtype, device)
    pair.set_grads(3, scale=0.1)
    original = [p.detach().clone() for p in pair.ref.params]
    g = group(rho=0.5 if adaptive else 0.05, adaptive=adaptive, eta=eta)
    plans = {name: first_step(side, g, VARIANTS[variant]) for name, side in pair.sides.items()}
    pair.compare_params()
    moved = any(not torch.equal(p.detach(), w) for p, w in zip(pair.fused.params, original))
    assert moved or dtype != torch.float32
    for i, w in enumerate(original):  # the backup is the weights, bit for bit
        view = pair.fused.bucket.backup_flat[pair.fused.bucket.offsets[i] :][: w.numel()]
        assert torch.equal(bits(view), bits(w))
    for name, side in pair.sides.items():
        side.backend.restore(side.bucket, plans[name])
    for side in pair.sides.values():
        for p, w in zip(side.params, original):
            assert torch.equal(bits(p), bits(w))


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_with_zero_gradient_is_zero(device, dtype):
    pair = Pair([4097, 7], dtype, device)
    pair.set_grads(4, scale=0.0)
    before = [p.detach().clone() for p in pair.fused.params]
    first_step(pair.fused, group(), VARIANTS["sam"])
    for p, w in zip(pair.fused.params, before):
        assert torch.equal(bits(p), bits(w))


@needs_compiled
@pytest.mark.parametrize("sizes", SMALL_SIZE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_skips_on_a_nonfinite_first_gradient(device, sizes, dtype):
    pair = Pair(sizes, dtype, device)
    pair.set_grads(5, poison=float("nan"))
    before = [p.detach().clone() for p in pair.fused.params]
    first_step(pair.fused, group(adaptive=True), VARIANTS["sam"])
    for i, (p, w) in enumerate(zip(pair.fused.params, before)):
        assert torch.equal(bits(p), bits(w))
        view = pair.fused.bucket.backup_flat[pair.fused.bucket.offsets[i] :][: w.numel()]
        assert torch.equal(bits(view), bits(w))


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
UPDATE_CASES = [pytest.param(s, id=f"sgd-{k}") for k, s in SGD_CASES.items()] + [
    pytest.param(s, id=k) for k, s in ADAM_CASES.items()
]
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


def state_names_for(spec) -> tuple[str, ...]:
    if isinstance(spec, SGDSpec):
        return ("momentum_buffer",) if spec.momentum != 0 else ()
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if spec.amsgrad else ())


def run_steps(pair: Pair, spec, steps: int, g: dict, check: bool = True) -> None:
    for step in range(steps):
        pair.set_grads(100 + step)
        perturbed = {name: first_step(side, g, VARIANTS["sam"], check) for name, side in pair.sides.items()}
        pair.set_grads(200 + step)
        for name, side in pair.sides.items():
            second_step(side, perturbed[name], spec, check)


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes,spec", SIZED_UPDATE_CASES)
def test_update(device, sizes, dtype, spec):
    """Three SAM steps (the first-update rule, then the running state) on both backends."""
    pair = Pair(sizes, dtype, device)
    run_steps(pair, spec, 3, group(adaptive=True, eta=0.01))
    pair.compare_params(steps=3)
    for name in state_names_for(spec):
        for i in range(len(sizes)):
            assert_close(pair.fused.state_of(name, i), pair.ref.state_of(name, i), dtype, steps=3)
    assert torch.equal(pair.fused.bucket.steps, pair.ref.bucket.steps)
    assert pair.fused.bucket.steps.tolist() == [3.0] * len(sizes)


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [pytest.param(s, id=k) for k, s in SGD_CASES.items()])
def test_sgd_update_is_bitwise_the_reference_on_the_cpu(dtype, spec):
    """SGD's float math has the reference's order and no FMA (-ffp-contract=off), and the
    bfloat16/float16 conversions are c10's bit for bit: so the CPU results are identical."""
    if COMPILED != "cpp":
        pytest.skip("nvcc contracts a*b+c into FMAs: the CUDA kernels round differently")
    pair = Pair(SIZES["mixed"] + [65536 + 3], dtype, "cpu")
    run_steps(pair, spec, 3, group())
    for a, b in zip(pair.fused.params, pair.ref.params):
        assert torch.equal(bits(a), bits(b))
    for name in state_names_for(spec):
        for i in range(len(pair.sizes)):
            assert torch.equal(bits(pair.fused.state_of(name, i)), bits(pair.ref.state_of(name, i)))


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_every_low_precision_value_survives_the_float32_round_trip(device, dtype):
    """All 2^16 bit patterns through an update that changes nothing (lr = 0): the kernels'
    conversions to float32 and back are exact, infinities and signed zeros included."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(device)
    param = torch.nn.Parameter(patterns.clone())
    param.grad = torch.ones_like(param)
    bucket = Bucket([param], 0, fused=True, backend=make_backend(COMPILED, torch.device(device), dtype))
    plan = bucket.plan()
    spec = replace(SGD, lr=0.0, momentum=0.0, weight_decay=0.0)
    bucket.backup_buffer().copy_(bucket.param_flat)  # the update reads w from the backup
    ctx = StepContext(VARIANTS["sam"], {}, 1e-12, False, torch.zeros(S.SIZE, device=device), {})
    bucket.backend.update(bucket, plan, plan, spec, ctx, DESCENT.PLAIN)
    out, expected = param.detach().cpu(), patterns.cpu()
    finite = ~torch.isnan(expected)
    assert torch.equal(bits(out[finite]), bits(expected[finite]))
    assert torch.isnan(out[~finite]).all()


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", UPDATE_CASES)
def test_update_without_the_nonfinite_check(device, dtype, spec):
    pair = Pair(SIZES["mixed"], dtype, device)
    run_steps(pair, spec, 2, group(), check=False)
    pair.compare_params(steps=2)


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", UPDATE_CASES)
@pytest.mark.parametrize("pass_", [1, 2])
def test_nonfinite_gradient_skips_the_whole_step(device, dtype, spec, pass_):
    """A NaN in either pass: params, state and step counts bitwise unchanged; one skip counted."""
    pair = Pair(SIZES["mixed"], dtype, device)
    run_steps(pair, spec, 1, group())
    side = pair.fused
    snap = [bits(p) for p in side.params] + [
        bits(side.state_of(n, i)) for n in state_names_for(spec) for i in range(len(side.params))
    ]
    steps = side.bucket.steps.clone()
    pair.set_grads(7, poison=float("nan") if pass_ == 1 else None)
    perturbed = first_step(side, group(), VARIANTS["sam"])
    pair.set_grads(8, poison=float("nan") if pass_ == 2 else None)
    second_step(side, perturbed, spec)
    after = [bits(p) for p in side.params] + [
        bits(side.state_of(n, i)) for n in state_names_for(spec) for i in range(len(side.params))
    ]
    assert all(torch.equal(a, b) for a, b in zip(after, snap))
    assert torch.equal(side.bucket.steps, steps)
    assert side.status[S.SKIPPED].item() == 1.0


@needs_compiled
@pytest.mark.parametrize("spec", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_update_after_a_separate_restore(device, spec):
    """A parameter without a second-pass gradient: restore its run, then update the others."""
    pair = Pair([7, 4097, 33, 5], torch.float32, device)
    pair.set_grads(1)
    perturbed = {name: first_step(side, group(), VARIANTS["sam"]) for name, side in pair.sides.items()}
    original_skipped = pair.ref.bucket.backups[1].clone()
    pair.set_grads(2, skip=(1,))
    for name, side in pair.sides.items():
        second_step(side, perturbed[name], spec)
    pair.compare_params()
    assert torch.equal(pair.fused.params[1].detach(), original_skipped)  # restored, not updated
    assert pair.fused.bucket.steps.tolist() == [1.0, 0.0, 1.0, 1.0] == pair.ref.bucket.steps.tolist()


# ---------------------------------------------------------------------- determinism
@needs_compiled
def test_norm_is_bitwise_reproducible(device):
    pair = Pair([1_000_003, 4097, 7], torch.float32, device)
    pair.set_grads(9)
    side = pair.fused
    plan = side.bucket.plan()
    n = side.backend.partial_slots(side.bucket, plan)
    assert n > 8  # several partials, so that their order could matter
    results = []
    for _ in range(3):
        partials = torch.full((4, n), float("nan"), device=device)
        side.backend.ascent_stats(
            side.bucket, plan, group(adaptive=True), side.ctx(VARIANTS["sam"]), partials
        )
        results.append(bits(partials[:2]))
    assert all(torch.equal(r, results[0]) for r in results)


_THREADS_SCRIPT = """
import hashlib, torch
from collections import defaultdict
from sam_fused.backends import make_backend
from sam_fused.layout import Bucket
from sam_fused import status as S
from sam_fused.backends.reference import StepContext
from sam_fused.variants import DESCENT, VARIANTS
from sam_fused.base_updates import SGDSpec
gen = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (2_000_003, 65536 * 3 + 5, 7)]
for p in params:
    p.grad = torch.randn(p.shape, generator=gen)
bucket = Bucket(params, 0, fused=True, backend=make_backend("cpp", torch.device("cpu"), torch.float32))
be, plan = bucket.backend, bucket.plan()
partials = torch.zeros(4, be.partial_slots(bucket, plan))
g = {"rho": 0.05, "adaptive": True, "eta": 0.01}
status = torch.zeros(S.SIZE)
ctx = StepContext(VARIANTS["sam"], {}, 1e-12, True, status, defaultdict(dict))
be.ascent_stats(bucket, plan, g, ctx, partials)
torch.sum(partials[:2], dim=1, out=status[S.FIRST_PASS])
be.perturb(bucket, plan, g, ctx)
spec = SGDSpec(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, maximize=False)
be.update(bucket, plan, plan, spec, ctx, DESCENT.PLAIN)
digest = hashlib.sha256(partials[:2].numpy().tobytes() + bucket.param_flat.numpy().tobytes()).hexdigest()
print(torch.get_num_threads(), status[0].item().hex(), digest)
"""


@needs_compiled
def test_results_do_not_depend_on_the_thread_count():
    if COMPILED != "cpp":
        pytest.skip("thread counts concern the CPU extension")
    outputs = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(ROOT))
        run = subprocess.run(
            [sys.executable, "-c", _THREADS_SCRIPT], capture_output=True, text=True, env=env, check=True
        )
        count, norm, digest = run.stdout.split()
        assert count == threads
        outputs.append((norm, digest))
    assert outputs[0] == outputs[1]


# ---------------------------------------------------------------------- whole training runs
def make_model(device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(7, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 33),
        torch.nn.Tanh(),
        torch.nn.Linear(33, 1),
    )
    return model.to(device=device, dtype=dtype)


def grouped(model: torch.nn.Module) -> list[dict]:
    """Weights (ASAM, eta) and biases (plain SAM, its own lr) in two groups."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "adaptive": False, "lr": 0.05, "rho": 0.1}]


TRAINING = {
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    "sgd-dampening": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3, amsgrad=True)),
}


# float32 runs of 8 steps: 1e-6 on the CPU; nvcc contracts a*b+c into FMAs, so the CUDA
# kernels round differently from torch's and get a looser bound
TRAIN_TOL = 1e-6 if COMPILED == "cpp" else 1e-5


def train(device, dtype, backend, base, kwargs, variant="sam", steps=8, nan_at=None):
    model = make_model(device, dtype)
    opt = SAM(
        grouped(model), base, rho=0.5, adaptive=True, eta=0.01, variant=variant, backend=backend, **kwargs
    )
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(32, 7, generator=gen).to(device=device, dtype=dtype)
        y = torch.randn(32, 1, generator=gen).to(device=device, dtype=dtype)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if step == nan_at:
            next(model.parameters()).grad[0, 0] = float("nan")
        opt.first_step(zero_grad=True)
        F.mse_loss(model(x), y).backward()
        opt.second_step(zero_grad=True)
        losses.append(loss.item())
    params = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    return opt, params, losses


@needs_compiled
@pytest.mark.parametrize("name", list(TRAINING))
@pytest.mark.parametrize("variant", ["sam", "usam"])
def test_training_matches_the_reference_in_float32(device, name, variant):
    base, kwargs = TRAINING[name]
    opt, fused, fused_losses = train(device, torch.float32, COMPILED, base, kwargs, variant)
    _, ref, ref_losses = train(device, torch.float32, "reference", base, kwargs, variant)
    assert opt.backends == [COMPILED, COMPILED]
    torch.testing.assert_close(fused, ref, rtol=TRAIN_TOL, atol=TRAIN_TOL)
    torch.testing.assert_close(
        torch.tensor(fused_losses), torch.tensor(ref_losses), rtol=TRAIN_TOL, atol=1e-7
    )


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["sgd-nesterov", "adamw"])
def test_training_tracks_the_reference_in_low_precision(device, dtype, name):
    base, kwargs = TRAINING[name]
    _, fused, _ = train(device, dtype, COMPILED, base, kwargs, steps=4)
    _, ref, _ = train(device, dtype, "reference", base, kwargs, steps=4)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(fused, ref, rtol=tol, atol=tol)


@needs_compiled
@pytest.mark.parametrize("name", ["sgd-nesterov", "adamw"])
def test_training_skips_the_same_steps(device, name):
    base, kwargs = TRAINING[name]
    opt, fused, _ = train(device, torch.float32, COMPILED, base, kwargs, steps=5, nan_at=2)
    ref_opt, ref, _ = train(device, torch.float32, "reference", base, kwargs, steps=5, nan_at=2)
    assert opt.skipped_steps.item() == ref_opt.skipped_steps.item() == 1
    torch.testing.assert_close(fused, ref, rtol=TRAIN_TOL, atol=TRAIN_TOL)


@needs_compiled
def test_checkpoint_resume_is_bitwise(device):
    """Resuming a compiled-backend run from state_dict() reproduces it bit for bit."""
    base, kwargs = TRAINING["adamw"]

    def run(split: int | None):
        model = make_model(device, torch.float32)
        opt = SAM(model.parameters(), base, backend=COMPILED, **kwargs)
        for step in range(6):
            if step == split:
                state = opt.state_dict()
                model_state = {k: v.clone() for k, v in model.state_dict().items()}
                model = make_model(device, torch.float32, seed=1)
                model.load_state_dict(model_state)
                opt = SAM(model.parameters(), base, backend=COMPILED, **kwargs)
                opt.load_state_dict(state)
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(16, 7, generator=gen).to(device)
            y = torch.randn(16, 1, generator=gen).to(device)
            F.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.mse_loss(model(x), y).backward()
            opt.second_step(zero_grad=True)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(None), run(3))


@needs_compiled
def test_float64_neighbours_make_the_status_float64():
    """A float64 group (reference) beside a compiled one: partials and status in float64."""
    if COMPILED != "cpp":
        pytest.skip("backend='auto' pairs the reference with cpp on the CPU only")
    base, kwargs = TRAINING["sgd-nesterov"]

    def run(backend: str):
        torch.manual_seed(0)
        wide = torch.nn.Linear(7, 5).double()
        narrow = torch.nn.Linear(5, 1)
        opt = SAM(
            [{"params": wide.parameters()}, {"params": narrow.parameters()}], base, backend=backend, **kwargs
        )

        def loss(x):
            return F.mse_loss(narrow(torch.tanh(wide(x)).float()), x[:, :1].float())

        for step in range(4):
            x = torch.randn(16, 7, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            loss(x).backward()
            opt.first_step(zero_grad=True)
            loss(x).backward()
            opt.second_step(zero_grad=True)
        return opt, torch.cat(
            [p.detach().double().flatten() for p in [*wide.parameters(), *narrow.parameters()]]
        )

    opt, fused = run("auto")
    _, ref = run("reference")
    assert opt.backends == ["reference", "cpp"] and opt._status.dtype == torch.float64
    torch.testing.assert_close(fused, ref, rtol=TRAIN_TOL, atol=TRAIN_TOL)
