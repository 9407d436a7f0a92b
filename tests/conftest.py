"""Shared fixtures: the test device and the backends each test runs on.

``SAM_FUSED_TEST_DEVICE`` picks the device (default ``cpu``; ``cuda`` on a GPU machine).
On the CPU the Triton backend runs its kernels through the Triton interpreter, which must
be switched on before triton is first imported, hence the environment line at the top;
and the ``cuda`` backend runs its own source built as host C++ against an emulation of
the CUDA runtime (``tests/emulated_cuda/``), installed for the tests that ask for it.

``BACKENDS`` (reference, foreach, triton) parametrize the general suites. ``FUSED_BACKENDS``
are every backend the reference checks (triton, foreach and the compiled ones),
``ALL_BACKENDS`` adds the reference; :func:`backends_for` keeps those whose declared
capabilities accept a variant and dtype, so a table of cases runs on every backend that
says it can run it. ``COMPILED`` are the compiled ones alone.
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("SAM_FUSED_TEST_DEVICE", "cpu")
if DEVICE != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import sam_fused.backends as backends_module  # noqa: E402
from sam_fused._extension import NO_BUILD_ENV  # noqa: E402
from sam_fused.variants import VARIANTS, Variant  # noqa: E402

try:
    import triton  # noqa: F401

    HAS_TRITON = True
    TRITON_ERROR = ""
except ImportError as exc:  # e.g. triton missing, or numpy missing for the interpreter
    HAS_TRITON = False
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"
    if os.environ.get("SAM_FUSED_REQUIRE_TRITON") == "1":
        raise RuntimeError(
            f"SAM_FUSED_REQUIRE_TRITON=1 but triton cannot be imported ({TRITON_ERROR}); "
            "the Triton kernels would go untested"
        ) from exc


def _interpreter_rounds_bfloat16_to_nearest_even() -> None:
    """The Triton interpreter converts float32 to bfloat16 by truncation (and its "rtne"
    mode rounds half up without carrying into the exponent), and flushes bfloat16
    subnormals to zero on the way back; GPUs round to nearest even and widen exactly, as
    torch does. Tests compare kernels with torch bit for bit, so the interpreter gets the
    hardware's conversions here. (float16 goes through numpy, which already does both.)"""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(data, input_dtype, output_dtype, rounding_mode):
        rtz = rounding_mode is not None and rounding_mode != interpreter._ir.ROUNDING_MODE.RTNE
        if input_dtype.primitive_bitwidth == 32 and output_dtype.name == "bf16" and not rtz:
            bits = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.float32))
            rounded[nan] = 0x7FC0
            return rounded.reshape(np.shape(data))
        if input_dtype.name == "bf16" and output_dtype.primitive_bitwidth == 32:  # exact: the upper half
            bits = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint16).astype(np.uint32)
            return (bits << 16).reshape(np.shape(data))
        return original(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert


if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_bfloat16_to_nearest_even()

TRITON_SKIP_REASON = f"triton cannot be imported here (environment limitation: {TRITON_ERROR})"
NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason=TRITON_SKIP_REASON)
BUILDS = os.environ.get(NO_BUILD_ENV, "0") in ("", "0")

BACKENDS = [
    "reference",
    "foreach",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason=TRITON_SKIP_REASON)),
]


def _compiled() -> dict[str, type]:
    """The compiled backends this process runs: cpp on the CPU, cuda (emulated on the CPU)."""
    found: dict[str, type] = {}
    if DEVICE == "cuda":
        if backends_module.CudaBackend.info():
            found["cuda"] = backends_module.CudaBackend
        return found
    if backends_module.CppBackend.info():
        found["cpp"] = backends_module.CppBackend
    from emulated_cuda_backend import EmulatedCudaBackend

    if EmulatedCudaBackend.info():
        found["cuda"] = EmulatedCudaBackend
    return found


COMPILED = _compiled()  # builds the extensions on first use (cached across runs)
FUSED_BACKENDS = (["triton"] if HAS_TRITON else []) + ["foreach"] + list(COMPILED)
ALL_BACKENDS = ["reference", *FUSED_BACKENDS]
_CLASSES = {
    "reference": backends_module.ReferenceBackend,
    "foreach": backends_module.ForeachBackend,
    "triton": backends_module.TritonBackend,
    **COMPILED,
}


def supports(name: str, variant: str | Variant = "sam", dtype: torch.dtype = torch.float32) -> bool:
    """Whether backend ``name`` declares it runs ``variant`` with ``dtype`` on the test device."""
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    return _CLASSES[name].capabilities.refusal(torch.device(DEVICE), dtype, variant) is None


def runs_strided(name: str) -> bool:
    """Whether backend ``name`` declares it runs parameters with gaps in their memory."""
    return _CLASSES[name].capabilities.strided


def backends_for(
    variant: str | Variant = "sam", dtype: torch.dtype = torch.float32, fused_only: bool = False
):
    """The backends (pytest params) that declare support for ``variant`` and ``dtype``."""
    names = FUSED_BACKENDS if fused_only else ALL_BACKENDS
    return [name for name in names if supports(name, variant, dtype)]


# "<backend>-table": that backend over parameters that are offset views of larger storages
# (as FSDP2's shards are): their addresses are not 16-byte aligned, so the kernels take
# their unaligned path
TABLE_SUFFIX = "-table"


def table_backends_for(variant: str | Variant = "sam", dtype: torch.dtype = torch.float32) -> list[str]:
    """``"<backend>-table"`` for each fused backend that runs ``variant``."""
    return [name + TABLE_SUFFIX for name in backends_for(variant, dtype, fused_only=True)]


def split_backend(name: str) -> tuple[str, bool]:
    """``("triton", True)`` for ``"triton-table"``; ``(name, False)`` otherwise."""
    return name.removesuffix(TABLE_SUFFIX), name.endswith(TABLE_SUFFIX)


def in_place_parameter(value: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """A parameter holding ``value`` as a slice of a larger storage (offset by one element, so
    its address is not 16-byte aligned), on any device: as FSDP2's shards are, whose storage
    FSDP2 owns."""
    storage = torch.zeros(value.numel() + 1, dtype=value.dtype, device=value.device)
    view = storage[1:].view(value.shape)
    view.copy_(value)
    return torch.nn.Parameter(view, requires_grad=requires_grad)


def backend_instance(name: str):
    """The backend object ``name`` as the optimizer gets it in a test (the emulated cuda one on the CPU)."""
    cls = _CLASSES[name]
    if name == "cuda" and DEVICE != "cuda":
        instance = backends_module._INSTANCES.get("cuda")
        return instance if isinstance(instance, cls) else cls()
    return backends_module.get_backend(name)


@pytest.fixture(autouse=True)
def _emulated_cuda(request, monkeypatch):
    """A test parametrized with backend/fused "cuda" (or "cuda-table") on the CPU gets the
    emulated library wherever the optimizer asks for backend="cuda"."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    named = (params.get("backend"), params.get("fused"))
    if DEVICE != "cuda" and "cuda" in (split_backend(n)[0] for n in named if isinstance(n, str)):
        if "cuda" not in COMPILED:
            if BUILDS:
                pytest.fail("the emulated CUDA library did not build")
            pytest.skip(f"{NO_BUILD_ENV} is set: nothing is compiled")
        monkeypatch.setitem(backends_module._INSTANCES, "cuda", backend_instance("cuda"))


@pytest.fixture
def device() -> str:
    """The device every test builds its tensors on (``SAM_FUSED_TEST_DEVICE``)."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("SAM_FUSED_TEST_DEVICE=cuda but torch sees no CUDA device")
    return DEVICE


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each SAM backend; triton is skipped only when it cannot be imported."""
    return request.param


# SAM_FUSED_RECORD_LAUNCHES=<file>: note every Triton kernel specialization the suite runs
# through the interpreter, for tests/compile_kernels.py to compile for a real GPU target
_RECORD_PATH = os.environ.get("SAM_FUSED_RECORD_LAUNCHES")
_RECORDER = None


def pytest_configure(config) -> None:
    global _RECORDER
    if _RECORD_PATH and HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        from launch_recorder import LaunchRecorder

        _RECORDER = LaunchRecorder()
        _RECORDER.install()


def pytest_sessionfinish(session, exitstatus) -> None:
    if _RECORDER is not None:
        _RECORDER.uninstall()
        _RECORDER.write(_RECORD_PATH)
