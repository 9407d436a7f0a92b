"""Build script: the C++ sources the package ships, and its two optional compiled extensions.

Metadata lives in pyproject.toml. The package is Python plus Triton kernels compiled at
run time; this script adds what ``csrc/`` (the one copy of the C++/CUDA sources) provides:

* every wheel, and so every install, carries ``csrc/`` as ``sam_fused/csrc/`` (the sdist
  carries ``csrc/`` itself, through MANIFEST.in), so an installed package can compile its
  compiled backends on first use (``sam_fused/_extension.py``);
* where torch is importable in the build (``pip install --no-build-isolation ...``), the
  extensions are compiled now, with torch's ``BuildExtension`` (ninja when installed):
  ``sam_fused._C_cpu`` (C++/OpenMP) whenever a C++ compiler is present, and
  ``sam_fused._C_cuda`` when torch has CUDA and nvcc is found, built for the visible GPUs,
  ``TORCH_CUDA_ARCH_LIST``, or sm_80 and sm_90 when no GPU is visible.

pip's default isolated build has no torch (pyproject.toml does not require it: an unpinned
torch there would pull a multi-GB CUDA build), so it builds no extension, and the package
compiles them on first use. A failed compile here only prints why: the install goes on.
``SAM_FUSED_NO_BUILD=1`` builds nothing here (and turns the first-use build off).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SHIPPED_SOURCES = ("*.cpp", "*.cu", "*.cuh", "*.h")  # every file of csrc/ that a build reads


def _say(message: str) -> None:
    print(f"sam_fused setup: {message}", flush=True)


def _flags():
    """The source lists and compiler flags of sam_fused/_extension.py, loaded without
    importing the package (whose __init__ needs more than a build has)."""
    spec = importlib.util.spec_from_file_location("_sam_fused_flags", ROOT / "sam_fused" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _csrc_files() -> list[Path]:
    return sorted({path for pattern in SHIPPED_SOURCES for path in CSRC.glob(pattern)})


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into the built package as sam_fused/csrc/."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install runs from the checkout, which has csrc/
            return
        target = Path(self.build_lib) / "sam_fused" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in _csrc_files():
            self.copy_file(str(source), str(target / source.name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        shipped = [str(Path(self.build_lib) / "sam_fused" / "csrc" / p.name) for p in _csrc_files()]
        return super().get_outputs(include_bytecode) + ([] if self.editable_mode else shipped)


def _tolerant(build_ext_class: type) -> type:
    """A build_ext whose failed extension is reported, not fatal: the package then compiles
    it on first use (or runs on Triton and the reference backend), as without a build."""

    class BuildOptionalExtensions(build_ext_class):
        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as exc:  # a compiler error, nvcc too old for an architecture, ...
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                _say(
                    f"building {ext.name} failed ({lines[0]}); installing without it: sam_fused "
                    "compiles it on first use, or runs without it after one warning"
                )

    return BuildOptionalExtensions


def extensions() -> tuple[list, dict]:
    """The extensions this build can compile, with the build_ext that compiles them."""
    if os.environ.get("SAM_FUSED_NO_BUILD", "0") not in ("", "0"):
        _say("SAM_FUSED_NO_BUILD is set: no compiled extensions")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say(
            "torch is not importable in this build (pip's isolated build): the compiled "
            "backends will compile on first use; `pip install --no-build-isolation ...` builds them now"
        )
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        _say("no C++ compiler found: no compiled extensions (Triton and the reference still work)")
        return [], {}
    if not CSRC.is_dir():
        _say(f"{CSRC} is missing: no compiled extensions")
        return [], {}
    flags = _flags()
    include = [str(CSRC)]
    modules = [
        CppExtension(
            "sam_fused._C_cpu",
            [f"csrc/{name}" for name in flags.CPU_SOURCES],
            include_dirs=include,
            extra_compile_args=flags.CPU_CFLAGS,
            extra_link_args=flags.CPU_LDFLAGS,
        )
    ]
    # the toolkit nvcc belongs to (torch's guess from the PATH can be a wrapper's folder)
    if torch.version.cuda is not None and flags._cuda_toolkit_root() is not None:
        arch_list = flags.cuda_arch_list_for_build(os.environ, torch.cuda.device_count())
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
            _say(f"no GPU is visible: building the CUDA extension for {arch_list} (TORCH_CUDA_ARCH_LIST)")
        modules.append(
            CUDAExtension(
                "sam_fused._C_cuda",
                [f"csrc/{name}" for name in flags.CUDA_SOURCES],
                include_dirs=include,
                extra_compile_args={"cxx": flags.CUDA_CFLAGS, "nvcc": flags.NVCC_FLAGS},
            )
        )
    else:
        _say("torch has no CUDA or nvcc was not found: building the CPU extension only")
    use_ninja = shutil.which("ninja") is not None
    return modules, {"build_ext": _tolerant(BuildExtension.with_options(use_ninja=use_ninja))}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
