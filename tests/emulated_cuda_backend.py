"""The CUDA backend run on the CPU: ``csrc/sam_fused_cuda.cu`` built as host C++.

``tests/emulated_cuda/cuda_emulation.h`` stands in for the CUDA runtime (see its header
comment: one fiber per CUDA thread, blocks in turn, barriers and warp shuffles honoured),
so the CUDA extension's own host code and kernels run over CPU tensors. The library is
JIT-built once per machine (torch's extensions cache) and registers its operations as
``torch.ops.sam_fused_cuda_emulated``; :class:`EmulatedCudaBackend` is the ``cuda``
backend's Python class pointed at them.
"""

from __future__ import annotations

from pathlib import Path

from sam_fused._extension import CPU_CFLAGS, CSRC, _Extension, _toolchain_problem
from sam_fused.backends import CudaBackend

HERE = Path(__file__).resolve().parent / "emulated_cuda"
NAME = "sam_fused_cuda_emulated"


class _EmulatedExtension(_Extension):
    """Built from tests/ on first use; no prebuilt module and no CUDA needed."""

    def _precondition(self) -> str | None:
        return None

    def _build(self) -> str | None:
        reason = _toolchain_problem("cpp")
        if reason is not None:
            return self._fail(reason)
        from torch.utils import cpp_extension

        try:
            cpp_extension.load(
                name=NAME,
                sources=[str(HERE / f"{NAME}.cpp")],
                extra_include_paths=[str(CSRC), str(HERE)],
                # the CPU extension's float flags (no FMA contraction), without OpenMP
                extra_cflags=[f for f in CPU_CFLAGS if f != "-fopenmp"],
                is_python_module=True,
                verbose=False,
            )
        except Exception as exc:  # a compiler error: the emulated source does not build
            detail = str(exc).strip().splitlines()
            return self._fail(f"the build failed: {detail[0] if detail else type(exc).__name__}")
        return f"JIT build {NAME} (torch extensions cache)"


_EXTENSION = _EmulatedExtension("cuda-emulated", f"{NAME}_prebuilt_never", NAME, NAME, [])


class EmulatedCudaBackend(CudaBackend):
    """The ``cuda`` backend's operations and Python code, its kernels emulated on CPU tensors."""

    name = "cuda"  # the cuda backend as users name it; only the library differs
    device_type = "cpu"

    @classmethod
    def extension(cls) -> _Extension:
        return _EXTENSION
