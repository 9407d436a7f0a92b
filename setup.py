"""Build script: the compiled backends. Metadata lives in pyproject.toml.

The package is Python plus Triton kernels compiled at run time; this script adds the two
optional extensions of ``csrc/``, built with torch's ``BuildExtension`` (ninja when it is
installed):

* ``sam_fused._C_cpu``: the C++/OpenMP CPU backend, whenever a C++ compiler is present;
* ``sam_fused._C_cuda``: the CUDA backend, when torch has CUDA and nvcc is found (built
  for the visible GPUs' architectures, or ``TORCH_CUDA_ARCH_LIST``).

They need torch at build time, so install with ``pip install -e . --no-build-isolation``
(pyproject.toml does not list torch as a build requirement: an unpinned torch there pulls
a multi-GB CUDA build into pip's isolated build environment). Without torch, without a
compiler, or with ``SAM_FUSED_NO_BUILD=1``, the package installs without them and compiles
them on first use instead (or runs on Triton and the reference backend).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _flags():
    """The compiler flags of sam_fused/_extension.py, loaded without importing the package."""
    spec = importlib.util.spec_from_file_location("_sam_fused_flags", ROOT / "sam_fused" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    print(f"sam_fused setup: {message}")


def extensions() -> tuple[list, dict]:
    if os.environ.get("SAM_FUSED_NO_BUILD", "0") not in ("", "0"):
        _say("SAM_FUSED_NO_BUILD is set: no compiled extensions")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say(
            "torch is not importable here (pip's isolated build?): no compiled extensions now; "
            "use `pip install -e . --no-build-isolation`, or let them compile on first use"
        )
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        _say("no C++ compiler found: no compiled extensions (Triton and the reference still work)")
        return [], {}
    flags = _flags()
    csrc = str(ROOT / "csrc")
    modules = [
        CppExtension(
            "sam_fused._C_cpu",
            [f"csrc/{name}" for name in flags.CPU_SOURCES],
            include_dirs=[csrc],
            extra_compile_args=flags.CPU_CFLAGS,
            extra_link_args=flags.CPU_LDFLAGS,
        )
    ]
    # the toolkit nvcc belongs to (torch's guess from the PATH can be a wrapper's folder)
    if torch.version.cuda is not None and flags._cuda_toolkit_root() is not None:
        modules.append(
            CUDAExtension(
                "sam_fused._C_cuda",
                [f"csrc/{name}" for name in flags.CUDA_SOURCES],
                include_dirs=[csrc],
                extra_compile_args={"cxx": flags.CUDA_CFLAGS, "nvcc": flags.NVCC_FLAGS},
            )
        )
    else:
        _say("torch has no CUDA or nvcc was not found: building the CPU extension only")
    use_ninja = shutil.which("ninja") is not None
    return modules, {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
