"""The CUDA backend run on the CPU: ``csrc/sam_fused_cuda.cu`` built as host C++.

``tests/emulated_cuda/cuda_emulation.h`` stands in for the CUDA runtime (see its header
comment: one fiber per CUDA thread, blocks in turn, barriers and warp shuffles honoured),
so the CUDA extension's own host code and kernels run over CPU tensors. The library is
JIT-built once per machine (torch's extensions cache) and registers its operations as
``torch.ops.sam_fused_cuda_emulated``; :class:`EmulatedCudaBackend` is the ``cuda``
backend's Python class pointed at them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sam_fused._extension import CPU_CFLAGS, _Extension
from sam_fused.backends import CudaBackend

HERE = Path(__file__).resolve().parent / "emulated_cuda"
NAME = "sam_fused_cuda_emulated"

# Built from tests/ on first use (never prebuilt; no CUDA needed), with the CPU extension's
# float flags (no FMA contraction) but without OpenMP: the emulation is single-threaded.
_EXTENSION = _Extension(
    "cuda-emulated",
    f"{NAME}_prebuilt_never",
    NAME,
    NAME,
    [f"{NAME}.cpp"],
    source_dir=HERE,
    cflags=[f for f in CPU_CFLAGS if f != "-fopenmp"],
)


class EmulatedCudaBackend(CudaBackend):
    """The ``cuda`` backend's operations and Python code, its kernels emulated on CPU tensors."""

    name = "cuda"  # the cuda backend as users name it; only the library differs
    device_type = "cpu"
    capabilities = replace(
        CudaBackend.capabilities, device_types={"cpu"}
    )  # the emulated kernels read host memory

    @classmethod
    def extension(cls) -> _Extension:
        return _EXTENSION
