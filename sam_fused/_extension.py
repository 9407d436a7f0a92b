"""Loading the compiled backends: the C++ CPU extension and the CUDA extension.

Each extension is found in one of two ways, tried in order:

1. built ahead of time by ``setup.py`` (``pip install -e . --no-build-isolation``), as the
   modules ``sam_fused._C_cpu`` and ``sam_fused._C_cuda``;
2. compiled on first use from ``csrc/`` by torch's JIT loader
   (``torch.utils.cpp_extension.load``, ninja), cached in torch's extensions directory
   (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so only the first
   process pays for the build (about half a minute for the CPU extension on two cores).

Setting ``SAM_FUSED_NO_BUILD=1`` turns step 2 off. When neither works, the backend is
reported unavailable (with the reason, see :func:`sam_fused.available_backends`), a
failed build warns once, and ``backend="auto"`` uses Triton or foreach instead:
the package never needs a compiler to import or to run.

Importing a library registers its operations with the dispatcher, as
``torch.ops.sam_fused_cpu.*`` / ``torch.ops.sam_fused_cuda.*`` (no pybind11, which keeps the
build short). A process loads each library at most once: registering a namespace twice
is an error, so the result, success or failure, is cached for the process.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["NO_BUILD_ENV", "BackendInfo", "cpu_extension", "cuda_extension"]

NO_BUILD_ENV = "SAM_FUSED_NO_BUILD"
ABI_VERSION = 4  # kAbiVersion in csrc/sam_fused_common.h
CSRC = Path(__file__).resolve().parent.parent / "csrc"
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
            if abi != ABI_VERSION:
                self._fail(f"{how} is out of date (ABI {abi}, this package needs {ABI_VERSION})")
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
                f"its sources are not in {self.source_dir} (installed without csrc/ and without a build)"
            )
        reason = _toolchain_problem(self.kind)
        if reason is not None:
            return self._fail(reason)
        from torch.utils import cpp_extension

        _clear_stale_lock(cpp_extension, self.jit_name)
        _log.info("sam_fused: compiling the %s extension (first use; cached afterwards)", self.kind)
        try:
            self._module = cpp_extension.load(
                name=self.jit_name,
                sources=[str(self.source_dir / s) for s in self.sources],
                extra_include_paths=list(dict.fromkeys([str(CSRC), str(self.source_dir)])),
                extra_cflags=self.cflags,
                extra_ldflags=CPU_LDFLAGS if self.kind == "cpp" else [],
                extra_cuda_cflags=NVCC_FLAGS,
                is_python_module=True,
                verbose=False,
            )
        except Exception as exc:  # a compiler error, a missing header, a failed link...
            detail = str(exc).strip().splitlines()
            return self._fail(f"the build failed: {detail[0] if detail else type(exc).__name__}")
        return f"JIT build {self.jit_name} (torch extensions cache)"

    def _fail(self, reason: str) -> None:
        self._info = BackendInfo(False, reason)
        fallback = "the foreach backend" if self.kind == "cpp" else "Triton or the foreach backend"
        warnings.warn(
            f"sam_fused: the {self.kind} backend is unavailable: {reason}. {fallback} runs instead. "
            f"To build it: install a C++ compiler and ninja (pip install ninja), then reinstall with "
            f"`pip install -e . --no-build-isolation` or just rerun (it compiles on first use); "
            f"set {NO_BUILD_ENV}=1 to skip the build without this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


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


# the sources of each library (setup.py builds the same lists)
CPU_SOURCES = ["sam_fused_cpu.cpp", "sam_fused_host.cpp"]
CUDA_SOURCES = ["sam_fused_cuda.cu"]
_CPU = _Extension("cpp", "sam_fused._C_cpu", "sam_fused_cpu", "sam_fused_cpu", CPU_SOURCES)
_CUDA = _Extension("cuda", "sam_fused._C_cuda", "sam_fused_cuda", "sam_fused_cuda", CUDA_SOURCES)


def cpu_extension() -> _Extension:
    """The C++ CPU extension (``torch.ops.sam_fused_cpu``)."""
    return _CPU


def cuda_extension() -> _Extension:
    """The CUDA extension (``torch.ops.sam_fused_cuda``)."""
    return _CUDA
