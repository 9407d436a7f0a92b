"""The compiled backends as extensions: built where they should be, chosen where they should
be, refused with a reason elsewhere, and deterministic across thread counts.

Their numbers against the reference are ``test_backend_ops.py`` (each operation) and
``test_variants.py`` (whole runs of every variant a backend declares).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDS, COMPILED, DEVICE, backend_instance

from sam_fused import GSAM, SAM, Lion, available_backends
from sam_fused._extension import ABI_VERSION, NO_BUILD_ENV, _Extension
from sam_fused.backends import CppBackend
from sam_fused.backends.cpp import fused_bases
from sam_fused.base_updates import REGISTRY
from sam_fused.tables import CHUNK
from sam_fused.variants import VARIANTS, Ascent, Descent

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
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    params = [torch.nn.Parameter(torch.randn(3, dtype=dt)) for dt in dtypes]
    assert SAM(params, lr=0.1).backends == ["cpp"] * 4  # float64 too: math in double
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
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_runs_on_the_compiled_backends(device, backend, variant):
    """The compiled libraries have every variant's rules: asked for, or under auto on the CPU."""
    model = torch.nn.Linear(7, 3).to(device)
    opt = SAM(model.parameters(), torch.optim.SGD, variant=variant, backend=backend, lr=0.1)
    assert opt.backends == [backend]
    if DEVICE == "cpu" and backend == "cpp":
        assert SAM(model.parameters(), torch.optim.SGD, variant=variant, lr=0.1).backends == ["cpp"]


@pytest.mark.parametrize("backend", list(COMPILED))
def test_the_libraries_report_their_functors_under_python_s_numbers(backend):
    """What a loaded library runs is its own report (functors()): every ascent and descent rule
    under variants.Ascent / Descent's numbers, and every registered base under its spec's
    kernel number; the backend's fused bases are that report's."""
    instance = backend_instance(backend)
    report = set(instance.ops.functors())
    expected = {f"ascent:{r.name}={int(r)}" for r in Ascent} | {f"descent:{r.name}={int(r)}" for r in Descent}
    specs = set(REGISTRY.values())
    expected |= {f"base:{spec.name.upper()}={spec.kernel}" for spec in specs}
    assert report == expected
    assert instance.capabilities.updates == {spec.name for spec in specs} == {"sgd", "adam", "lion"}


def test_fused_bases_come_from_the_library_s_report(monkeypatch):
    """A library without a base's functor (an older build, or a base registered since) does not
    fuse it: its groups take the generic path, and a variant that needs the fused update is
    refused by name. A number under another name fuses nothing."""
    report = ["ascent:GRAD=0", "descent:PLAIN=0", "base:SGD=0", "base:ADAM=1"]
    assert fused_bases(report) == {"sgd", "adam"}
    assert fused_bases(["base:SGD=0", "base:LION=1"]) == {"sgd"}  # Lion is number 2
    if "cpp" not in COMPILED or DEVICE != "cpu":
        return
    instance = backend_instance("cpp")
    monkeypatch.setattr(instance, "capabilities", replace(instance.capabilities, updates=fused_bases(report)))
    model = torch.nn.Linear(7, 3)
    opt = SAM(model.parameters(), Lion, lr=1e-3, backend="cpp")
    assert opt.backends == ["cpp"]
    model(torch.randn(4, 7)).sum().backward()
    opt.first_step()
    model(torch.randn(4, 7)).sum().backward()
    opt.second_step()  # restore, then Lion's own step()
    with pytest.raises(ValueError, match=r"sam_fused\.Lion only.*cpp backend does not fuse it"):
        GSAM(model.parameters(), Lion, lr=1e-3, backend="cpp")


@pytest.mark.skipif(DEVICE == "cuda" or "cuda" not in COMPILED, reason="the emulated library runs on the CPU")
def test_the_emulated_library_is_the_cuda_source():
    """Built from csrc/sam_fused_cuda.cu (the CUDA slot size, not the CPU one), and used by
    backend='cuda' in the tests that ask for it."""
    abi, chunk, max_slots = torch.ops.sam_fused_cuda_emulated.constants()
    assert (abi, chunk, max_slots) == (ABI_VERSION, CHUNK, -1)  # one partial per chunk row
    assert int(torch.ops.sam_fused_cpu.constants()[1]) != chunk
    assert backend_instance("cuda").ops is torch.ops.sam_fused_cuda_emulated


def test_the_cuda_library_cuts_tensors_into_the_chunks_of_the_python_side():
    """A CUDA table launch's block covers kCudaTableChunk elements of a chunk row that
    sam_fused/tables.py made CHUNK elements long: the two numbers must be one."""
    header = (ROOT / "csrc" / "sam_fused_common.h").read_text()
    found = re.search(r"constexpr\s+int64_t\s+kCudaTableChunk\s*=\s*(\d+)\s*;", header)
    assert found is not None
    assert int(found.group(1)) == CHUNK


@pytest.mark.skipif(DEVICE == "cuda" or "cuda" not in COMPILED, reason="the emulated library runs on the CPU")
def test_the_cuda_library_runs_a_table_launch_in_one_launch():
    """The operations' schemas are shared with the CPU library; a table launch's role
    arguments are address tables (one int64 per tensor), its runs the chunk table of
    sam_fused/tables.py, and `like` names the element type. One launch restores every tensor,
    whatever their number; a malformed launch is refused by name, with nothing written."""
    ops = torch.ops.sam_fused_cuda_emulated
    sizes = [1, 1025, 7, 2048]
    gen = torch.Generator().manual_seed(0)
    params = [torch.zeros(n) for n in sizes]
    backups = [torch.randn(n, generator=gen) for n in sizes]

    def addresses(tensors):
        return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)

    rows = [(slot, start, n, slot) for slot, n in enumerate(sizes) for start in range(0, n, CHUNK)]
    chunks = torch.tensor(rows, dtype=torch.int64)
    assert chunks.shape == (6, 4)
    bad_launches = {
        "chunk table": (addresses(params), addresses(backups), torch.tensor([[0, 1, 0]]), params[0]),
        "of 4 addresses": (addresses(params), addresses(backups[:3]), chunks, params[0]),
        "float32, bfloat16 and float16": (addresses(params), addresses(backups), chunks, chunks),
    }
    for message, args in bad_launches.items():
        with pytest.raises(RuntimeError, match=message):
            ops.copy(*args, None)
    assert all(not p.any() for p in params)  # nothing written
    before = ops.emulated_launches()
    ops.copy(addresses(params), addresses(backups), chunks, params[0], None)
    assert ops.emulated_launches() - before == 1
    assert all(torch.equal(p, b) for p, b in zip(params, backups))


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
def test_float64_beside_float32_on_the_cpu_library():
    """A float64 group beside a float32 one, both on the C++ library (math in double for the
    first): one float64 status, and the reference's results."""
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
    assert opt.backends == ["cpp", "cpp"] and opt._engine.status.dtype == torch.float64
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
