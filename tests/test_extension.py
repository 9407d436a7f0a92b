"""The compiled backends as extensions: built where they should be, chosen where they should
be, refused with a reason elsewhere, and deterministic across thread counts.

Their numbers against the reference are ``test_backend_ops.py`` (each operation) and
``test_variants.py`` (whole runs of every variant a backend declares).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDS, COMPILED, DEVICE, backend_instance

from sam_fused import SAM, available_backends
from sam_fused._extension import ABI_VERSION, NO_BUILD_ENV, _Extension
from sam_fused.backends import CppBackend

ROOT = Path(__file__).resolve().parent.parent
COMPILED_HERE = "cuda" if DEVICE == "cuda" else "cpp"
needs_compiled = pytest.mark.skipif(
    COMPILED_HERE not in COMPILED, reason=f"the {COMPILED_HERE} backend is not built here ({NO_BUILD_ENV})"
)


def test_compiled_backends_are_available_where_they_should_be():
    """CI builds the CPU extension and the emulated CUDA one: a broken build must fail here."""
    if DEVICE == "cpu" and BUILDS:
        assert "cpp" in COMPILED, f"the C++ CPU extension did not build: {CppBackend.info().detail}"
        assert "cuda" in COMPILED, "the emulated CUDA library did not build"
    info = available_backends()
    assert set(info) >= {"reference", "triton", "cpp", "cuda"}
    assert info["reference"]


@needs_compiled
def test_auto_picks_cpp_for_cpu_tensors_and_names_are_validated():
    if DEVICE != "cpu":
        pytest.skip("the CPU backend's choice is tested on the CPU")
    params = [torch.nn.Parameter(torch.randn(3, dtype=dt)) for dt in (torch.float32, torch.bfloat16)]
    assert SAM(params, lr=0.1).backends == ["cpp", "cpp"]
    assert SAM([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], lr=0.1).backends == ["foreach"]
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


def test_no_build_falls_back_to_foreach_without_a_warning():
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
    assert out.stdout.strip() == "['foreach'] False"


@pytest.mark.parametrize("backend", list(COMPILED))
@pytest.mark.parametrize("variant", ["vasso", "fsam", "rsam", "gsam", "looksam"])
def test_variants_without_kernels_are_refused_at_construction(device, backend, variant):
    model = torch.nn.Linear(7, 3).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"no kernels for variant {variant!r}"):
        SAM(model.parameters(), torch.optim.SGD, variant=variant, backend=backend, lr=0.1)
    # auto sends them elsewhere (foreach on the CPU, Triton on CUDA)
    opt = SAM(model.parameters(), torch.optim.SGD, variant=variant, lr=0.1)
    assert backend not in opt.backends
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@needs_compiled
@pytest.mark.parametrize("variant", ["sam", "usam", "gcsam", "interval"])
def test_auto_runs_gradient_ascent_variants_on_the_compiled_backend(device, variant):
    if DEVICE == "cuda":
        pytest.skip("backend='auto' picks Triton for CUDA tensors")
    model = torch.nn.Linear(7, 3).to(device)
    opt = SAM(model.parameters(), torch.optim.SGD, variant=variant, lr=0.1)
    assert opt.backends == ["cpp"]


@pytest.mark.skipif(DEVICE == "cuda" or "cuda" not in COMPILED, reason="the emulated library runs on the CPU")
def test_the_emulated_library_is_the_cuda_source():
    """Built from csrc/sam_fused_cuda.cu (the CUDA slot size, not the CPU one), and used by
    backend='cuda' in the tests that ask for it."""
    abi, chunk, max_slots = torch.ops.sam_fused_cuda_emulated.constants()
    assert (abi, chunk, max_slots) == (ABI_VERSION, 4096, 1024)
    assert int(torch.ops.sam_fused_cpu.constants()[1]) != chunk
    assert backend_instance("cuda").ops is torch.ops.sam_fused_cuda_emulated


@pytest.mark.skipif(DEVICE == "cuda" or "cuda" not in COMPILED, reason="the emulated library runs on the CPU")
def test_the_cuda_library_refuses_a_table_launch():
    """The operations' schemas are shared with the CPU library, which also takes address tables;
    the CUDA library runs flat buckets only and refuses one by name instead of reading it."""
    ops = torch.ops.sam_fused_cuda_emulated
    weights = torch.zeros(16)
    addresses = torch.tensor([weights.data_ptr()], dtype=torch.int64)
    runs = torch.tensor([[0, 16, 0]], dtype=torch.int64)
    with pytest.raises(RuntimeError, match="flat buckets only"):
        ops.restore(addresses, addresses, runs, weights)


_THREADS_SCRIPT = """
import hashlib, torch
import torch.nn.functional as F
from sam_fused import SAM
gen = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (2_000_003, 65536 * 3 + 5, 7)]
opt = SAM(params, torch.optim.SGD, rho=0.05, adaptive=True, eta=0.01, lr=0.1, momentum=0.9,
          weight_decay=5e-4, nesterov=True, backend="{backend}")
for p in params:
    p.grad = torch.randn(p.shape, generator=gen)
opt.first_step()
norm = opt._engine.status[0].item()
for p in params:
    p.grad = torch.randn(p.shape, generator=gen)
opt.second_step()
flat = torch.cat([p.detach().flatten() for p in params])
print(torch.get_num_threads(), norm.hex(), hashlib.sha256(flat.numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_compiled)])
def test_results_do_not_depend_on_the_thread_count(backend):
    """The global norm and the step are bitwise the same with 1 and 2 torch threads: the
    compiled backend reduces in fixed slots, the reference in fixed rows (sum_of_squares)."""
    if DEVICE != "cpu":
        pytest.skip("thread counts concern the CPU paths")
    outputs = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(ROOT))
        run = subprocess.run(
            [sys.executable, "-c", _THREADS_SCRIPT.format(backend=backend)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        count, norm, digest = run.stdout.split()
        assert count == threads
        outputs.append((norm, digest))
    assert outputs[0] == outputs[1]


@needs_compiled
def test_float64_neighbours_make_the_status_float64():
    """A float64 group (foreach) beside a compiled one: partials and status in float64."""
    if DEVICE != "cpu":
        pytest.skip("backend='auto' pairs foreach with cpp on the CPU only")

    def run(backend: str):
        torch.manual_seed(0)
        wide = torch.nn.Linear(7, 5).double()
        narrow = torch.nn.Linear(5, 1)
        groups = [{"params": wide.parameters()}, {"params": narrow.parameters()}]
        opt = SAM(
            groups, torch.optim.SGD, backend=backend, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
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
    assert opt.backends == ["foreach", "cpp"] and opt._engine.status.dtype == torch.float64
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
