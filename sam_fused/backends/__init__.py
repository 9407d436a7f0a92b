"""Backends: objects that run the SAM operations over one bucket of parameters.

Every backend provides the same operations (see :class:`ReferenceBackend`, the
specification): ``partial_slots``, ``centralize``, ``noise``, ``ascent_stats``, ``perturb``,
``descent_stats``, ``restore``, ``update``, ``state_sumsq`` and ``advance_steps``, and the
attribute ``unscales_in_place`` (whether GradScaler's factor is applied to the gradient
buffers themselves, so that nothing downstream applies it again).

* ``reference``: pure PyTorch, parameter by parameter; any device and dtype.
* ``triton``: fused kernels over flat buffers; CUDA tensors (or CPU tensors when
  ``TRITON_INTERPRET=1``), float32/bfloat16/float16.
* ``cpp`` / ``cuda``: the same fused operations as compiled C++/OpenMP (CPU tensors) and
  CUDA kernels (CUDA tensors), float32/bfloat16/float16; built by setup.py or on first use
  (``sam_fused/_extension.py``). They run the variants with the gradient as ascent
  direction and a plain descent (SAM, ASAM, USAM, GCSAM, interval SAM).
"""

from __future__ import annotations

import torch

from .._extension import BackendInfo
from ..variants import Variant
from .cpp import CppBackend, CudaBackend
from .reference import ReferenceBackend
from .triton import TritonBackend, interpreting, triton_available

__all__ = [
    "BackendInfo",
    "CppBackend",
    "CudaBackend",
    "ReferenceBackend",
    "TritonBackend",
    "available_backends",
    "cpp_supports",
    "make_backend",
    "triton_supports",
]

_INSTANCES: dict[str, object] = {}


def triton_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton backend can run a bucket on ``device`` with ``dtype``."""
    on_device = device.type == "cuda" or (device.type == "cpu" and interpreting())
    return on_device and dtype in TritonBackend.dtypes and triton_available()


def cpp_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the C++ CPU backend can run a bucket (builds the extension on first call)."""
    return CppBackend.supports(device, dtype)


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
        "reference": BackendInfo(True, "plain PyTorch; any device and dtype"),
        "triton": triton_info,
        "cpp": CppBackend.info(),
        "cuda": CudaBackend.info(),
    }


def _make_compiled(name: str, device: torch.device, dtype: torch.dtype, variant: Variant | None):
    cls = CppBackend if name == "cpp" else CudaBackend
    if variant is not None and not cls.supports_variant(variant):
        raise ValueError(
            f"the {name} backend has no kernels for variant {variant.name!r} (it runs SAM, ASAM, "
            "USAM, GCSAM and interval SAM); use backend='auto', 'triton' or 'reference'"
        )
    if dtype not in cls.dtypes:
        raise ValueError(
            f"the {name} backend handles float32, bfloat16 and float16, not {dtype}; use "
            "backend='auto' to run such parameters on the reference backend"
        )
    if device.type != cls.device_type:
        raise ValueError(
            f"the {name} backend needs {cls.device_type.upper()} tensors (parameters are on {device}); "
            f"use backend={'cuda' if name == 'cpp' else 'cpp'!r} or 'auto'"
        )
    info = cls.info()
    if not info:
        raise RuntimeError(f"backend={name!r} was requested but it is unavailable: {info.detail}")
    if name not in _INSTANCES:
        _INSTANCES[name] = cls()
    return _INSTANCES[name]


def make_backend(name: str, device: torch.device, dtype: torch.dtype, variant: Variant | None = None):
    """The backend ``name`` for a bucket (of ``variant``), or a clear error if it cannot run it."""
    if name in ("cpp", "cuda"):
        return _make_compiled(name, device, dtype, variant)
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but triton is not installed")
        if dtype not in TritonBackend.dtypes:
            raise ValueError(
                f"the triton backend handles float32, bfloat16 and float16, not {dtype}; "
                "use backend='auto' to run such parameters on the reference backend"
            )
        if not triton_supports(device, dtype):
            raise ValueError(
                f"the triton backend needs CUDA tensors (parameters are on {device}); set "
                "TRITON_INTERPRET=1 to run its kernels on the CPU through the interpreter"
            )
    if name not in _INSTANCES:
        _INSTANCES[name] = TritonBackend() if name == "triton" else ReferenceBackend()
    return _INSTANCES[name]
