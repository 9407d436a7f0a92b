"""What is particular to the foreach backend (``sam_fused/backends/foreach.py``).

The shared tables (``test_backend_ops``, ``test_variants``, ``test_textbook``, ...) run
foreach as it runs on the test device: on the CPU it reads the step's values (skip flag,
update counts, norm) on the host. Here it also runs as it does on a GPU ("device" mode:
every decision stays on the device, ``torch.where`` and per-element counts), and the
checks are:

* every variant with every fused base, in float32, float64 and bfloat16, in both modes,
  equals the reference backend step by step, through left-out parameters, a skipped step
  and clipping; float64 to float64 rounding (float32 math would be 1e-7 off);
* strided parameters (a column slice with gaps, a transpose, channels_last) train in place,
  the memory between a slice's elements untouched;
* the norm's float32 row sums fall back to float64 squares wherever they could lose
  anything (huge, tiny, non-finite gradients), and do not depend on the thread count;
* ``auto`` picks foreach wherever no compiled backend runs the bucket, and never the
  reference;
* in device mode a step reads nothing on the host (no ``item``, no ``tolist``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from _helpers import copy_run_state
from conftest import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

import sam_fused.backends as backends_module
from sam_fused import SAM, Lion
from sam_fused import status as S
from sam_fused.backends import CppBackend, ForeachBackend, choose_backend
from sam_fused.backends.triton import triton_available
from sam_fused.variants import VARIANTS

SHAPES = [(7,), (33, 5), (4097,), (1,), (3, 3, 3, 3), (5, 2)]
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3, amsgrad=True)),
    "lion": (Lion, dict(lr=1e-3, weight_decay=0.1)),
}
VARIANT_OPTIONS = {"looksam": {"k": 2}, "interval": {"k": 2}, "rsam": {"seed": 3}}
CASES = [*VARIANTS, "asam"]
TOL = {  # (rtol, atol) of one step from identical inputs
    torch.float32: (2e-6, 1e-7),
    torch.float64: (1e-12, 1e-14),
    torch.bfloat16: (2 * 2.0**-8, 2.0**-8),
}


@pytest.fixture(params=["host", "device"])
def mode(request, monkeypatch) -> str:
    """The foreach instance SAM gets: values read on the host, or every decision on the device."""
    host_types = (DEVICE,) if request.param == "host" else ()
    monkeypatch.setitem(backends_module._INSTANCES, "foreach", ForeachBackend(host_types))
    return request.param


def build(name: str, base: str, backend: str, dtype: torch.dtype, **kw):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=DEVICE)) for s in SHAPES]
    cls, base_kw = BASES[base]
    variant = "sam" if name == "asam" else name
    groups = [{"params": params[:4]}, {"params": params[4:], "rho": 0.1, "weight_decay": 0.0}]
    if name == "asam":
        groups[1].update(adaptive=True, eta=0.01)
    options = VARIANT_OPTIONS.get(name, {})
    opt = SAM(
        groups, cls, rho=0.05, backend=backend, variant=variant, variant_options=options, **base_kw, **kw
    )
    return params, opt


def feed(params, seed: int, dtype, left_out=(), poison=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if poison == i:
            g.view(-1)[0] = float("nan")
        p.grad = None if i in left_out else g.to(device=DEVICE, dtype=dtype)


# step: (left out in pass 1, left out in pass 2, parameter poisoned in pass 2)
SCRIPT = [((), (), None), ((1,), (1,), None), ((), (), 2), ((0,), (), None), ((), (3,), None), ((), (), None)]


def run_step(params, opt, step: int, dtype) -> None:
    first, second, poison = SCRIPT[step]
    if opt.variant.perturbs_before_pass:
        opt.noise_step()
    feed(params, 10 * step, dtype, first)
    if opt.first_step():
        feed(params, 10 * step + 1, dtype, second, poison)
        opt.second_step()


def assert_same_run(got, want, dtype, what: str) -> None:
    (got_params, got_opt), (want_params, want_opt) = got, want
    rtol, atol = TOL[dtype]
    for i, (p, q) in enumerate(zip(got_params, want_params)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol, msg=f"{what}: weight {i}")
        assert set(got_opt.state[p]) == set(want_opt.state[q]), f"{what}: state keys of {i}"
        for key, value in want_opt.state[q].items():
            torch.testing.assert_close(
                got_opt.state[p][key], value, rtol=rtol, atol=atol, msg=f"{what}: {key} of {i}"
            )
    assert got_opt.skipped_steps.item() == want_opt.skipped_steps.item()


TABLE = [
    pytest.param(name, base, dtype, clip, id=f"{name}-{base}-{str(dtype)[6:]}{'-clip' if clip else ''}")
    for name in CASES
    for base in BASES
    for dtype, clip in (
        (torch.float32, False),
        (torch.float32, True),
        (torch.float64, False),
        (torch.bfloat16, False),
    )
    if not (clip and name == "looksam")  # LookSAM refuses max_grad_norm
]


@pytest.mark.parametrize("name,base,dtype,clip", TABLE)
def test_every_variant_and_base_equals_the_reference(mode, name, base, dtype, clip):
    """Step by step from identical inputs (the foreach run is re-synced to the reference's
    after every step), so that each step is held to one step's rounding."""
    kw = {"max_grad_norm": 0.5} if clip else {}
    ref = build(name, base, "reference", dtype, **kw)
    got = build(name, base, "foreach", dtype, **kw)
    assert got[1].backends == ["foreach", "foreach"]
    start = [p.detach().clone() for p in ref[0]]
    for step in range(len(SCRIPT)):
        for params, opt in (ref, got):
            run_step(params, opt, step, dtype)
        assert_same_run(got, ref, dtype, f"{mode} step {step}")
        copy_run_state(ref, got)
    assert ref[1].skipped_steps.item() == 1  # the poisoned step was skipped
    assert any(not torch.equal(p.detach(), w) for p, w in zip(ref[0], start))


def test_float64_is_computed_in_float64(mode):
    """A float64 run equals the same run made on float32 copies only to float32 rounding,
    and the reference to float64 rounding: the math is not narrowed anywhere."""
    runs = {}
    for backend, dtype in (
        ("foreach", torch.float64),
        ("reference", torch.float64),
        ("foreach", torch.float32),
    ):
        params, opt = build("vasso", "adamw", backend, dtype)
        for step in range(3):
            run_step(params, opt, step, dtype)
        runs[backend, dtype] = torch.cat([p.detach().double().flatten() for p in params])
    assert opt.backends == ["foreach", "foreach"]
    f64, ref64, f32 = (
        runs["foreach", torch.float64],
        runs["reference", torch.float64],
        runs["foreach", torch.float32],
    )
    torch.testing.assert_close(f64, ref64, rtol=1e-12, atol=1e-14)
    assert (f64 - f32).abs().max() > 1e-9  # float32 would not meet the bound above


@pytest.mark.skipif(DEVICE != "cpu", reason="on the CPU the update takes torch.optim's scalar arguments")
@pytest.mark.parametrize(
    "base,kw",
    [
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
        (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
        (torch.optim.AdamW, dict(lr=1e-2, betas=(0.3, 0.9), maximize=True)),
    ],
    ids=["adamw", "amsgrad", "maximize"],
)
def test_on_the_cpu_adam_is_torch_optims_bit_for_bit(base, kw):
    """With rho = 0 a SAM step is its base step: foreach's Adam/AdamW (in host mode) takes
    torch.optim's single-tensor operations with its scalars, so the bits are torch's."""
    torch.manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = SAM(params, base, rho=0.0, backend="foreach", **kw)
    torch_opt = base(twins, foreach=False, **kw)
    for step in range(4):
        feed(params, 2 * step, torch.float32)
        opt.first_step()
        feed(params, 2 * step + 1, torch.float32)
        for p, q in zip(params, twins):
            q.grad = p.grad.clone()
        opt.second_step()
        torch_opt.step()
    for p, q in zip(params, twins):
        assert torch.equal(p.detach(), q.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], torch_opt.state[q][key])


# ---------------------------------------------------------------------- strided parameters
def strided_parameters(seed: int) -> tuple[torch.Tensor, list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    big = torch.randn(6, 10, generator=gen).to(DEVICE)
    conv = torch.randn(4, 3, 3, 3, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    params = [
        torch.nn.Parameter(big[:, 2:7]),  # a column slice: gaps between its rows
        torch.nn.Parameter(torch.randn(3, 6, generator=gen).to(DEVICE).t()),  # dense, not contiguous
        torch.nn.Parameter(conv),  # dense, permuted
        torch.nn.Parameter(torch.randn(5, generator=gen).to(DEVICE)),
    ]
    return big, params


@pytest.mark.parametrize("name,base", [("sam", "sgd"), ("asam", "adamw"), ("vasso", "sgd"), ("gsam", "lion")])
def test_strided_parameters_train_in_place(mode, name, base):
    big, params = strided_parameters(1)
    outside = big[:, [0, 1, 7, 8, 9]].clone()
    addresses = [p.data_ptr() for p in params]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]  # contiguous, on the reference
    cls, kw = BASES[base]
    options = {"adaptive": True, "eta": 0.01} if name == "asam" else {}
    variant = "sam" if name == "asam" else name
    # auto: no multi-tensor kernel walks memory with gaps (the dense ones go elsewhere)
    assert SAM(params, cls, variant=variant, **options, **kw).backends[0] == "foreach"
    opt = SAM(params, cls, backend="foreach", variant=variant, **options, **kw)
    ref = SAM(copies, cls, backend="reference", variant=variant, **options, **kw)
    for step in range(3):
        for ps, o in ((params, opt), (copies, ref)):
            feed(ps, step, torch.float32)
            o.first_step()
            feed(ps, step + 100, torch.float32)
            o.second_step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert [p.data_ptr() for p in params] == addresses  # still where they were
    assert torch.equal(big[:, 2:7], params[0].detach())  # the slice trained inside big
    assert torch.equal(big[:, [0, 1, 7, 8, 9]], outside)  # and nothing between its rows moved
    assert params[2].is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------- the norm
@pytest.mark.parametrize("scale", [1.0, 1e30, 1e37, 1e-25, "mixed"])
@pytest.mark.parametrize("size", [1, 7, 4097, 3 * 4096 + 5])
def test_norm_matches_float64_at_every_scale(mode, scale, size):
    """``status[SUMSQ]`` against the float64 sum of squares of the gradients as stored."""
    gen = torch.Generator().manual_seed(size)
    g = torch.randn(size, generator=gen, dtype=torch.float64)
    if scale == "mixed":  # squares below float32's range next to ordinary ones
        g[: size // 2] *= 1e-25
    else:
        g *= scale
    param = torch.nn.Parameter(torch.zeros(size, device=DEVICE))
    opt = SAM([param], torch.optim.SGD, lr=0.0, backend="foreach")
    param.grad = g.to(device=DEVICE, dtype=torch.float32)
    opt.first_step()
    want = (param.grad.double().cpu() ** 2).sum()
    assert torch.isfinite(want) and want > 0
    torch.testing.assert_close(opt._engine.status[S.SUMSQ].cpu(), want, rtol=1e-6, atol=0)
    assert opt._engine.status[S.BAD1].item() == 0


def test_nonfinite_gradients_are_counted_exactly(mode):
    param = torch.nn.Parameter(torch.zeros(3 * 4096 + 5, device=DEVICE))
    opt = SAM([param], torch.optim.SGD, lr=0.1, backend="foreach")
    g = torch.ones(param.shape)
    g[[3, 5000, 9000]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    param.grad = g.to(DEVICE)
    opt.first_step()
    assert opt._engine.status[S.BAD1].item() == 3
    assert torch.equal(param.detach(), torch.zeros_like(param))  # skipped: not perturbed


def test_norm_does_not_depend_on_the_thread_count(mode):
    param = torch.nn.Parameter(torch.zeros(1_000_003, device=DEVICE))
    opt = SAM([param], torch.optim.SGD, lr=0.0, backend="foreach")
    param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    threads = torch.get_num_threads()
    norms = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            opt.first_step()
            norms.append(opt._engine.status[S.SUMSQ].item())
            opt.second_step()
    finally:
        torch.set_num_threads(threads)
    assert norms[0] == norms[1] == norms[2]


# ---------------------------------------------------------------------- auto
def _compiled_runs(device: str, dtype: torch.dtype, name: str) -> str | None:
    """The compiled backend auto should take for these, from its declared capabilities."""
    variant = VARIANTS[name]
    if device == "cuda" and triton_available():
        backend = backends_module.get_backend("triton")
    elif device == "cpu" and CppBackend.info():
        backend = backends_module.get_backend("cpp")
    else:
        return None
    return (
        backend.name if backend.capabilities.refusal(torch.device(device), dtype, variant) is None else None
    )


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("device", ["cpu", "cuda", "mps", "xpu"])
def test_auto_picks_a_compiled_backend_or_foreach_never_the_reference(monkeypatch, device, dtype, name):
    monkeypatch.delenv(backends_module.BACKEND_ENV, raising=False)
    chosen = choose_backend("auto", torch.device(device), dtype, VARIANTS[name]).name
    assert chosen == (_compiled_runs(device, dtype, name) or "foreach")
    strided = choose_backend("auto", torch.device(device), dtype, VARIANTS[name], strided="a column slice")
    assert strided.name == "foreach"


def test_auto_runs_float64_beside_float32_on_a_fused_backend(monkeypatch):
    """float64 takes the C++ library on the CPU (math in double) and foreach elsewhere;
    never the reference."""
    monkeypatch.delenv(backends_module.BACKEND_ENV, raising=False)
    params = [
        torch.nn.Parameter(torch.randn(3, device=DEVICE, dtype=dt)) for dt in (torch.float64, torch.float32)
    ]
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    cpp_here = DEVICE == "cpu" and bool(backends_module.available_backends()["cpp"])
    assert opt.backends[0] == ("cpp" if cpp_here else "foreach") and "reference" not in opt.backends
    assert backends_module.available_backends()["foreach"]


# ---------------------------------------------------------------------- no host reads
_READS = {"item", "_local_scalar_dense", "is_nonzero", "equal", "allclose"}


class _CountReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("base", ["sgd", "adamw", "lion"])
def test_device_mode_reads_nothing_on_the_host(monkeypatch, name, base):
    """Counted under a dispatch mode (item, _local_scalar_dense, ...) and by patching
    Tensor.tolist, over two steady-state steps of each variant (LookSAM and interval SAM:
    a full and a one-pass step); host mode, the CPU default, reads its values (checked too,
    so the counter is seen to work). On CUDA the sync debug mode checks the same."""
    tolist, tolists = torch.Tensor.tolist, []

    def counted_tolist(t: torch.Tensor):
        tolists.append(1)
        return tolist(t)

    counts = {}
    for label, host_types in (("device", ()), ("host", (DEVICE,))):
        monkeypatch.setitem(backends_module._INSTANCES, "foreach", ForeachBackend(host_types))
        clip = {} if name == "looksam" else {"max_grad_norm": 1.0}
        params, opt = build(name, base, "foreach", torch.float32, **clip)
        run_step(params, opt, 0, torch.float32)  # plans and buffers are made on the first step
        tolists.clear()
        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        sync_debug = torch.cuda.set_sync_debug_mode if DEVICE == "cuda" else None
        with _CountReads() as counter, contextlib.ExitStack() as stack:
            if sync_debug is not None and label == "device":
                sync_debug("error")
                stack.callback(sync_debug, "default")
            for step in (4, 5):
                run_step(params, opt, step, torch.float32)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        counts[label] = len(counter.reads) + len(tolists)
    assert counts["device"] == 0
    assert counts["host"] > 0
