"""Shared fixtures: the test device and the backend parametrization.

``SAM_FUSED_TEST_DEVICE`` picks the device (default ``cpu``; ``cuda`` on a GPU machine).
On the CPU the Triton backend runs its kernels through the Triton interpreter, which must
be switched on before triton is first imported, hence the environment line at the top.
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("SAM_FUSED_TEST_DEVICE", "cpu")
if DEVICE != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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

TRITON_SKIP_REASON = f"triton cannot be imported here (environment limitation: {TRITON_ERROR})"
NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason=TRITON_SKIP_REASON)

BACKENDS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason=TRITON_SKIP_REASON)),
]


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
