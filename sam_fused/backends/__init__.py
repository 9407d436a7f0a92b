"""Backends: objects that run the SAM operations over one bucket of parameters.

Every backend provides the same operations (see :class:`ReferenceBackend`, the
specification): ``partial_slots``, ``ascent_stats``, ``perturb``, ``count_nonfinite``,
``restore``, ``update`` and ``advance_steps``.

* ``reference``: pure PyTorch, parameter by parameter; any device and dtype.
* ``triton``: fused kernels over flat buffers; CUDA tensors (or CPU tensors when
  ``TRITON_INTERPRET=1``), float32/bfloat16/float16.
"""

from __future__ import annotations

import torch

from .reference import ReferenceBackend
from .triton import TritonBackend, interpreting, triton_available

__all__ = ["ReferenceBackend", "TritonBackend", "make_backend", "triton_supports"]

_INSTANCES: dict[str, object] = {}


def triton_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton backend can run a bucket on ``device`` with ``dtype``."""
    on_device = device.type == "cuda" or (device.type == "cpu" and interpreting())
    return on_device and dtype in TritonBackend.dtypes and triton_available()


def make_backend(name: str, device: torch.device, dtype: torch.dtype):
    """The backend ``name`` for a bucket, or a clear error if it cannot run it."""
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
