"""Backends: objects that run the SAM operations over one bucket of parameters.

Every backend implements the :class:`~sam_fused.backends.protocol.Backend` operations
(``reference.py`` is their specification) and declares what it runs in its
:class:`~sam_fused.backends.protocol.Capabilities`; :func:`choose_backend` is the one
place that decides which backend a bucket gets.

* ``reference``: pure PyTorch, parameter by parameter; any device and dtype. The readable
  specification and the tests' oracle: ``auto`` never picks it.
* ``foreach``: the reference's PyTorch math over the buckets' flat buffers, the parameters
  read and written with ``torch._foreach_*``; any device, dtype, variant and base update,
  strided parameters included. ``auto``'s choice wherever no compiled backend runs a bucket.
* ``triton``: fused multi-tensor kernels (one launch per operation per bucket); CUDA
  tensors (or CPU tensors when ``TRITON_INTERPRET=1``), float32/bfloat16/float16.
* ``cpp`` / ``cuda``: the same fused operations as compiled C++/OpenMP (CPU tensors) and
  CUDA kernels (CUDA tensors); built by setup.py or on first use (``sam_fused/_extension.py``).
  What they run is in their capabilities (``cpp.py``).
"""

from __future__ import annotations

import os

import torch

from .._extension import BackendInfo
from ..variants import Variant
from .cpp import CppBackend, CudaBackend
from .foreach import ForeachBackend
from .protocol import Backend, Capabilities
from .reference import ReferenceBackend
from .triton import TritonBackend, interpreting, triton_available

__all__ = [
    "BACKEND_ENV",
    "BACKEND_NAMES",
    "Backend",
    "BackendInfo",
    "Capabilities",
    "CppBackend",
    "CudaBackend",
    "ForeachBackend",
    "ReferenceBackend",
    "TritonBackend",
    "available_backends",
    "choose_backend",
    "get_backend",
]

BACKEND_ENV = "SAM_FUSED_BACKEND"
BACKEND_NAMES = ("auto", "triton", "reference", "foreach", "cpp", "cuda")
_CLASSES = {
    "reference": ReferenceBackend,
    "foreach": ForeachBackend,
    "triton": TritonBackend,
    "cpp": CppBackend,
    "cuda": CudaBackend,
}
# auto's compiled backend per device type, tried before foreach
_COMPILED = {"cuda": "triton", "cpu": "cpp"}
_INSTANCES: dict[str, Backend] = {}


def available_backends() -> dict[str, BackendInfo]:
    """Which backends can run in this process, each with the reason.

    Each value is truthy when the backend is available; ``.detail`` says how it was found
    (prebuilt or JIT-built extension) or why not. Asking about ``cpp`` or ``cuda`` loads
    the extension, compiling it on the first call in a fresh environment.
    """
    if not triton_available():
        triton_info = BackendInfo(False, "triton is not installed")
    elif torch.cuda.is_available():
        triton_info = BackendInfo(True, "CUDA tensors")
    elif interpreting():
        triton_info = BackendInfo(True, "CPU tensors through the Triton interpreter (TRITON_INTERPRET=1)")
    else:
        triton_info = BackendInfo(False, "no CUDA device (TRITON_INTERPRET=1 runs it on the CPU)")
    return {
        "reference": BackendInfo(True, "plain PyTorch, one parameter at a time; any device and dtype"),
        "foreach": BackendInfo(True, "PyTorch over flat buffers and torch._foreach_*; any device and dtype"),
        "triton": triton_info,
        "cpp": CppBackend.info(),
        "cuda": CudaBackend.info(),
    }


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (one instance per process), or why it cannot run here."""
    backend = _INSTANCES.get(name)
    if backend is None:
        if name == "reference":
            backend = ReferenceBackend()
        elif name == "foreach":
            backend = ForeachBackend()
        elif name == "triton":
            if not triton_available():
                raise RuntimeError("backend='triton' was requested but triton is not installed")
            backend = TritonBackend()
        elif name in ("cpp", "cuda"):
            info = (CppBackend if name == "cpp" else CudaBackend).info()
            if not info:
                raise RuntimeError(f"backend={name!r} was requested but it is unavailable: {info.detail}")
            backend = CppBackend() if name == "cpp" else CudaBackend()
        else:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")
        _INSTANCES[name] = backend
    return backend


def _auto(device: torch.device, dtype: torch.dtype, variant: Variant, strided: str | None) -> Backend:
    """The compiled backend of the device type (triton for CUDA tensors, cpp for CPU ones)
    where it is here and its capabilities take the bucket; foreach everywhere else (float64,
    a variant or device it does not run, strided parameters, no compiler). Never the
    reference: that is the specification, not a fallback."""
    name = _COMPILED.get(device.type)
    if name is not None and strided is None and _usable(name):
        backend = get_backend(name)
        if backend.capabilities.refusal(device, dtype, variant) is None:
            return backend
    return get_backend("foreach")


def _usable(name: str) -> bool:
    if name == "triton":
        return triton_available()
    return bool(_CLASSES[name].info())


def choose_backend(
    request: str, device: torch.device, dtype: torch.dtype, variant: Variant, strided: str | None = None
) -> Backend:
    """The backend for a bucket of ``dtype`` on ``device`` running ``variant``.

    ``request`` is the optimizer's ``backend=`` argument; ``"auto"`` may be replaced by the
    ``SAM_FUSED_BACKEND`` environment variable. ``strided`` says why some parameter of the
    bucket is too strided for the multi-tensor kernels (None: all are dense). An explicit
    request that cannot run the bucket is a clear error, raised when the optimizer is built.
    """
    name = request
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if name not in BACKEND_NAMES:
            raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKEND_NAMES)}, got {name!r}")
    if name == "auto":
        return _auto(device, dtype, variant, strided)
    # what the backend declares is checked before it is loaded (or built)
    capabilities = (_INSTANCES.get(name) or _CLASSES[name]).capabilities
    reason = capabilities.refusal(device, dtype, variant)
    if reason is not None and name == "triton" and device.type == "cpu":
        reason += "; set TRITON_INTERPRET=1 to run its kernels on the CPU through the interpreter"
    if reason is None and strided is not None and not capabilities.strided:
        reason = f"its multi-tensor kernels need dense tensors, and a parameter is not: {strided}"
    if reason is None:
        return get_backend(name)
    raise ValueError(
        f"the {name} backend cannot run these parameters ({str(dtype).removeprefix('torch.')} on "
        f"{device}, variant {variant.name!r}): {reason}. Use backend='auto' (it picks a backend per "
        "bucket) or backend='foreach' (any device, dtype and variant)."
    )
