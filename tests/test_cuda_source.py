"""The CUDA backend's source compiles for an H100/H200 (sm_90), also on a machine without a GPU.

On a GPU machine ``benchmarks/gpu_check.sh`` builds and runs the extension itself (and
``tests/test_backend_ops.py`` checks it against the reference); here nvcc compiles
``csrc/sam_fused_cuda.cu`` with the include paths and nvcc flags torch's extension loader
uses, so a change that breaks the CUDA source fails CI instead of the next GPU session.
The CPU build of torch ships the CUDA headers of ATen and c10 but not the one header its
CMake writes for CUDA builds; an empty stand-in takes its place.

The compiled object is then read back with the ``cuobjdump`` that ships with triton: each
kernel must have sm_90 machine code and use no local memory (a register spill would keep
a bandwidth-bound kernel far from its floor).
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from conftest import DEVICE
from cubin_usage import cuobjdump, resource_usage

from sam_fused._extension import NVCC_FLAGS
from sam_fused.base_updates import REGISTRY
from sam_fused.variants import Ascent, Descent

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "sam_fused_cuda.cu"  # with the kernels of sam_fused_cuda_kernels.cuh


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


pytestmark = [
    pytest.mark.skipif(
        DEVICE == "cuda", reason="on a GPU machine gpu_check.sh builds and runs the extension itself"
    ),
    pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed here (environment limitation)"),
]


@pytest.fixture(scope="module")
def cuda_object(tmp_path_factory) -> Path:
    from torch.utils import cpp_extension

    out = tmp_path_factory.mktemp("cuda_source")
    stand_in = out / "include" / "c10" / "cuda" / "impl"
    stand_in.mkdir(parents=True)
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        (stand_in / "cuda_cmake_macros.h").write_text("// stand-in: the CPU wheel lacks this header\n")
    obj = out / "sam_fused_cuda.o"
    command = [
        _nvcc(),
        "-c",
        str(SOURCE),
        "-o",
        str(obj),
        "-std=c++17",
        "-arch=sm_90",
        "-Xcompiler",
        "-fPIC",
        "-DTORCH_EXTENSION_NAME=sam_fused_cuda",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-I{out / 'include'}",
        f"-I{ROOT / 'csrc'}",
        f"-I{sysconfig.get_paths()['include']}",
        *(f"-I{path}" for path in cpp_extension.include_paths()),
        *cpp_extension.COMMON_NVCC_FLAGS,
        *(flag for flag in NVCC_FLAGS if flag not in cpp_extension.COMMON_NVCC_FLAGS),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = result.stderr.splitlines()
    errors = [line for line in lines if "error" in line] or lines[-30:]
    assert result.returncode == 0, "nvcc failed:\n" + "\n".join(errors[:30])
    return obj


def test_cuda_source_compiles_for_sm90(cuda_object):
    tool = cuobjdump()
    if tool is None:
        assert cuda_object.stat().st_size > 0
        return
    listing = subprocess.run([str(tool), "--list-elf", str(cuda_object)], capture_output=True, text=True)
    assert "sm_90" in listing.stdout, listing.stdout + listing.stderr


def test_every_cuda_kernel_is_there_and_spills_nothing(cuda_object):
    functions = resource_usage(cuda_object)
    if functions is None:
        pytest.skip("cuobjdump is not available here (environment limitation)")
    names = {k.name for k in functions}
    # the fused operations of csrc/sam_fused_cuda_kernels.cuh, each instantiated for its dtypes
    kernels = (
        "stats_kernel",
        "perturb_kernel",
        "copy_kernel",
        "centralize_kernel",
        "descent_stats_kernel",
        "update_kernel",
    )
    for kernel in (*kernels, "advance_steps_kernel"):
        assert any(kernel in name for name in names), f"{kernel} missing from {sorted(names)}"
    # every variant rule and every fused base, for each of the three dtypes: the ascent kernels
    # per ascent rule (and adaptive or not), the update kernel per base and descent rule
    bases = {spec.kernel for spec in REGISTRY.values()}
    counts = {kernel: sum(f"{len(kernel)}{kernel}I" in name for name in names) for kernel in kernels}
    assert counts == {
        "stats_kernel": 3 * len(Ascent) * 2,
        "perturb_kernel": 3 * len(Ascent) * 2,
        "copy_kernel": 3,
        "centralize_kernel": 3,
        "descent_stats_kernel": 3 * 2,
        "update_kernel": 3 * len(bases) * len(Descent),
    }, counts
    spilling = [(k.name, k.stack, k.local) for k in functions if k.local or k.stack]
    assert not spilling, f"kernels using local memory or stack: {spilling}"


def test_the_cuda_toolkit_is_found_behind_an_nvcc_wrapper(monkeypatch):
    """torch guesses CUDA_HOME from the folder above ``which nvcc``; where that nvcc is a
    wrapper script (as on the project's CPU machines) the guess holds no CUDA runtime and
    the extension's link fails. The loader asks nvcc for its toolkit instead."""
    from torch.utils import cpp_extension

    from sam_fused import _extension

    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", "")  # so that monkeypatch restores it after the loader sets it
    monkeypatch.delenv("CUDA_HOME")
    guess = str(Path(_nvcc()).resolve().parent.parent)  # what torch derives from the PATH
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", guess)
    root = _extension._cuda_toolkit_root()
    assert root is not None and _extension._has_cudart(root), (guess, root)
    assert (Path(root) / "bin" / "nvcc").is_file(), root
    assert root == cpp_extension.CUDA_HOME
