"""Loading the compiled backends: the C++ CPU extension and the CUDA extension.

Each extension is found in one of two ways, tried in order:

1. built ahead of time by ``setup.py`` (an install whose build can import torch:
   ``pip install --no-build-isolation ...``), as the modules ``sam_fused._C_cpu`` and
   ``sam_fused._C_cuda``;
2. compiled on first use from the C++ sources by torch's JIT loader
   (``torch.utils.cpp_extension.load``, ninja), announced by one line on stderr and cached
   in torch's extensions directory (``$TORCH_EXTENSIONS_DIR``, default
   ``~/.cache/torch_extensions``), so only the first process pays for the build (about half a
   minute for the CPU extension on two cores).

The sources are ``csrc/`` at the top of a checkout, the one copy the project edits; every
wheel and sdist ships them (setup.py copies them into the package as ``sam_fused/csrc/``),
so an installed package finds them beside its modules (:data:`CSRC`).

``SAM_FUSED_NO_BUILD=1`` turns step 2 off. When neither works, the backend is reported
unavailable with the reason (:func:`sam_fused.available_backends`), a failed build warns
once, and ``backend="auto"`` uses Triton or foreach: no compiler is needed to run.

A library registers its operations as ``torch.ops.sam_fused_cpu.*`` /
``torch.ops.sam_fused_cuda.*`` (no pybind11: a shorter build), once per process (a second
registration is an error), so the load's result is cached.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["NO_BUILD_ENV", "BackendInfo", "cpu_extension", "cuda_extension"]

NO_BUILD_ENV = "SAM_FUSED_NO_BUILD"
# Each library's files in csrc/ (setup.py builds from these lists too); its headers beside them.
CPU_SOURCES = [
    "sam_fused_cpu.cpp",
    "sam_fused_cpu_ascent.cpp",
    "sam_fused_cpu_descent.cpp",
    "sam_fused_cpu_msam.cpp",
    "sam_fused_host.cpp",
]
CUDA_SOURCES = ["sam_fused_cuda.cu"]
PACKAGE_DIR = Path(__file__).resolve().parent


def _source_dir() -> Path:
    """The C++ sources: a wheel/sdist install's ``sam_fused/csrc/`` (setup.py copies it
    there), else a checkout's (or editable install's) top-level ``csrc/``."""
    installed = PACKAGE_DIR / "csrc"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "csrc"


CSRC = _source_dir()
ABI_HEADER = "sam_fused_common.h"


def _abi_version(source_dir: Path = CSRC) -> int | None:
    """``kAbiVersion`` of the shipped ``csrc/sam_fused_common.h`` (None if unreadable); a
    prebuilt library that reports another number (an older install's) is refused."""
    try:
        text = (source_dir / ABI_HEADER).read_text()
    except OSError:
        return None
    found = re.search(r"constexpr\s+int64_t\s+kAbiVersion\s*=\s*(\d+)\s*;", text)
    return int(found[1]) if found else None


ABI_VERSION = _abi_version()
# Architectures for a CUDA build that sees no GPU (a docker build, a CPU build machine):
# torch's default is the visible GPUs', an empty list there. sm_80 (A100) and sm_90
# (H100/H200); TORCH_CUDA_ARCH_LIST chooses others.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
# What a first-use build costs, for the message that announces it (measured on the
# project's 2-core CPU machine: 30 s for the CPU library)
BUILD_TIME = {"cpp": "about half a minute on 2 cores", "cuda": "a few minutes"}
# Compiler flags shared by setup.py and the JIT loader. -O3 without -march: a cached or
# installed build must run on any x86-64/aarch64 machine, and GCC vectorises the plain
# loops for the baseline ISA. -ffp-contract=off keeps a*b+c as two roundings (as torch's
# own CPU kernels compute most of these formulas); -fno-math-errno lets sqrt vectorise.
CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]

_log = logging.getLogger("sam_fused")


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here, and why (or why not). Truthy when available."""

    available: bool
    detail: str

    def __bool__(self) -> bool:
        return self.available


class _Extension:
    """One compiled library: found, built or refused once per process, then cached."""

    def __init__(
        self,
        kind: str,
        module: str,
        jit_name: str,
        namespace: str,
        sources: list[str],
        source_dir: Path = CSRC,
        cflags: list[str] | None = None,
    ) -> None:
        self.kind = kind  # "cpp" or "cuda": the backend name users see
        self.module = module
        self.jit_name = jit_name
        self.namespace = namespace
        self.sources = sources
        self.source_dir = source_dir  # csrc/, or tests/emulated_cuda/ for the emulated CUDA build
        self.cflags = cflags if cflags is not None else (CPU_CFLAGS if kind == "cpp" else CUDA_CFLAGS)
        self._lock = threading.Lock()
        self._done = False
        self._ops: Any = None
        self._module: Any = None  # the library's Python module (its host helpers)
        self._info = BackendInfo(False, "not loaded yet")

    def ops(self) -> Any:
        """The ``torch.ops`` namespace of the library, or None when it cannot be had."""
        self.load()
        return self._ops

    def info(self) -> BackendInfo:
        self.load()
        return self._info

    def loaded_module(self) -> Any:
        """The library's Python module if it has been loaded already (never builds), else None."""
        return self._module if self._done and self._ops is not None else None

    def load(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            reason = self._precondition()
            if reason is not None:
                self._info = BackendInfo(False, reason)
                return
            how = self._import_prebuilt()
            if how is None:
                if os.environ.get(NO_BUILD_ENV, "0") not in ("", "0"):
                    self._info = BackendInfo(
                        False, f"{NO_BUILD_ENV} is set and no prebuilt extension ({self.module}) exists"
                    )
                    return
                how = self._build()
                if how is None:
                    return
            ops = getattr(torch.ops, self.namespace)
            try:
                abi = int(ops.constants()[0])
            except (AttributeError, RuntimeError, IndexError):
                abi = -1  # older than the version check itself
            if ABI_VERSION is None:
                self._fail(
                    f"this package's csrc/{ABI_HEADER} cannot be read, so {how} cannot be checked",
                    "reinstall sam_fused from a wheel, an sdist, a checkout or git (each ships csrc/)",
                )
                return
            if abi != ABI_VERSION:
                self._fail(
                    f"{how} is out of date (ABI {abi}, this package needs {ABI_VERSION})",
                    "reinstall sam_fused, or delete the cached build and rerun",
                )
                return
            self._ops = ops
            self._info = BackendInfo(True, how)

    # ------------------------------------------------------------------ steps
    def _precondition(self) -> str | None:
        """Why this library cannot run in this process at all, or None."""
        if self.kind == "cuda":
            if torch.version.cuda is None:
                return "this torch build has no CUDA"
            if not torch.cuda.is_available():
                return "torch sees no CUDA device"
        return None

    def _import_prebuilt(self) -> str | None:
        try:
            self._module = importlib.import_module(self.module)
        except ImportError:
            return None
        return f"prebuilt extension {self.module}"

    def _build(self) -> str | None:
        missing = [s for s in self.sources if not (self.source_dir / s).is_file()]
        if missing:
            return self._fail(
                f"its sources ({', '.join(missing)}) are not in {self.source_dir}",
                "reinstall sam_fused from a wheel, an sdist, a checkout or git (each ships them)",
            )
        reason = _toolchain_problem(self.kind)
        if reason is not None:
            return self._fail(reason, "install what is missing, then rerun: it compiles on first use")
        from torch.utils import cpp_extension

        _clear_stale_lock(cpp_extension, self.jit_name)
        build_dir = _build_directory(cpp_extension, self.jit_name)
        sources = [self.source_dir / s for s in self.sources]
        include_dirs = list(dict.fromkeys([CSRC, self.source_dir]))
        patterns = ("*.h", "*.cuh") if self.kind != "cpp" else ("*.h",)
        headers = [h for folder in include_dirs for pattern in patterns for h in folder.glob(pattern)]
        if not _cached_build_is_current(build_dir, sources + headers):
            print(
                f"sam_fused: compiling the {self.kind} backend's library on first use "
                f"({BUILD_TIME.get(self.kind, 'under a minute')}); it is cached in {build_dir} "
                "for later runs",
                file=sys.stderr,
                flush=True,
            )
        try:
            self._module = cpp_extension.load(
                name=self.jit_name,
                sources=[str(s) for s in sources],
                extra_include_paths=[str(folder) for folder in include_dirs],
                extra_cflags=self.cflags,
                extra_ldflags=CPU_LDFLAGS if self.kind == "cpp" else [],
                extra_cuda_cflags=NVCC_FLAGS,
                is_python_module=True,
                verbose=False,
            )
        except Exception as exc:  # a compiler error, a missing header, a failed link...
            detail = str(exc).strip().splitlines()
            return self._fail(
                f"the build failed: {detail[0] if detail else type(exc).__name__}",
                "check the compiler (a C++17 g++ or clang++, with OpenMP for the CPU library), "
                "then rerun: it compiles on first use",
            )
        return f"JIT build {self.jit_name} (torch extensions cache)"

    def _fail(self, reason: str, fix: str) -> None:
        self._info = BackendInfo(False, reason)
        fallback = "the foreach backend" if self.kind == "cpp" else "Triton or the foreach backend"
        warnings.warn(
            f"sam_fused: the {self.kind} backend is unavailable: {reason}. {fallback} runs instead. "
            f"To get it: {fix}; or set {NO_BUILD_ENV}=1 to run without it and without this warning.",
            RuntimeWarning,
            stacklevel=_outside_package_stacklevel(),
        )
        return None


def _outside_package_stacklevel() -> int:
    """``warnings.warn``'s stacklevel that names the first caller outside sam_fused.

    Counted from the function that calls this one (stacklevel 1): a warning raised deep in
    the package (a backend chosen while the optimizer is built) then points at the user's
    line, ``SAM(...)``, rather than at this module.
    """
    package = str(PACKAGE_DIR) + os.sep
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back
        level += 1
    return level


def _build_directory(cpp_extension: Any, name: str) -> str:
    """Where torch's JIT loader keeps the build of ``name``."""
    try:
        return cpp_extension._get_build_directory(name, verbose=False)
    except (AttributeError, OSError):  # a private torch API that moved
        return "torch's extensions cache ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)"


def _cached_build_is_current(build_dir: str, inputs: list[Path]) -> bool:
    """Whether torch's cache holds a library built after every input file last changed,
    which torch then loads without compiling (an estimate, for the message only: torch
    decides itself, from a hash of the sources and flags)."""
    built = [p.stat().st_mtime for p in Path(build_dir).glob("*.so")] if os.path.isdir(build_dir) else []
    return bool(built) and max(built) >= max(p.stat().st_mtime for p in inputs)


def cuda_arch_list_for_build(environ: Mapping[str, str], visible_gpus: int) -> str | None:
    """The ``TORCH_CUDA_ARCH_LIST`` a CUDA build must set, or None to keep torch's choice.

    torch compiles for the visible GPUs unless ``TORCH_CUDA_ARCH_LIST`` is set; with no GPU
    visible (nvcc in a docker build, say) its list is empty and it fails with an IndexError.
    """
    if environ.get("TORCH_CUDA_ARCH_LIST") or visible_gpus > 0:
        return None
    return DEFAULT_CUDA_ARCH_LIST


STALE_LOCK_SECONDS = 900  # a build takes a minute or two; a lock this old lost its process


def _clear_stale_lock(cpp_extension: Any, name: str) -> None:
    """Remove a build lock left by a killed process (torch would wait on it forever)."""
    try:
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            _log.warning("sam_fused: removing the stale build lock %s", lock)
            lock.unlink()
    except (AttributeError, OSError):  # private torch API moved, or a race with its owner
        pass


def _has_cudart(root: str | os.PathLike) -> bool:
    return any((Path(root) / folder / "libcudart.so").exists() for folder in ("lib64", "lib"))


def _cuda_toolkit_root() -> str | None:
    """The CUDA toolkit torch will compile and link with, corrected when it is a wrapper's folder.

    torch takes ``CUDA_HOME`` (or ``CUDA_PATH``), else the folder above ``which nvcc``. Where
    ``nvcc`` on the PATH is a wrapper script (``/usr/local/bin/nvcc`` running the real one,
    as on our CPU machines), that folder holds no CUDA runtime and the link fails with
    "cannot find -lcudart". nvcc itself knows its toolkit (``TOP`` in ``nvcc --dryrun``);
    when the user set neither variable, that folder is used instead.
    """
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or _has_cudart(home) or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return home
    try:
        probe = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return home
    found = re.search(r"^#\$ TOP=(.+)$", probe.stdout + probe.stderr, flags=re.MULTILINE)
    if found is None:
        return home
    top = os.path.realpath(found[1].strip())
    if not _has_cudart(top):
        return home
    _log.info("sam_fused: nvcc's toolkit is %s (torch guessed %s from the PATH)", top, home)
    os.environ["CUDA_HOME"] = top  # for the build's subprocesses
    cpp_extension.CUDA_HOME = top  # torch's build reads the module global
    return top


def _toolchain_problem(kind: str) -> str | None:
    """What is missing to compile, or None. Puts a pip-installed ninja on PATH first."""
    if shutil.which("ninja") is None:
        candidates = [Path(sys.executable).parent]
        try:
            import ninja  # the PyPI package ships the binary

            candidates.insert(0, Path(ninja.BIN_DIR))
        except (ImportError, AttributeError):
            pass
        for folder in candidates:
            if (folder / "ninja").is_file():
                os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
                break
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        return f"no C++ compiler was found ({compiler})"
    if kind == "cuda":
        if _cuda_toolkit_root() is None:
            return "nvcc was not found (set CUDA_HOME)"
    return None


_CPU = _Extension("cpp", "sam_fused._C_cpu", "sam_fused_cpu", "sam_fused_cpu", CPU_SOURCES)
_CUDA = _Extension("cuda", "sam_fused._C_cuda", "sam_fused_cuda", "sam_fused_cuda", CUDA_SOURCES)


def cpu_extension() -> _Extension:
    """The C++ CPU extension (``torch.ops.sam_fused_cpu``)."""
    return _CPU


def cuda_extension() -> _Extension:
    """The CUDA extension (``torch.ops.sam_fused_cuda``)."""
    return _CUDA
