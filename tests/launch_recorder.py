"""Record every Triton kernel specialization the test suite launches.

The CPU runs every kernel through the Triton interpreter, which is lenient where the real
compiler is not (types, constexpr branches, what a block may hold). So that a kernel that
only the interpreter accepts cannot pass CI, the suite records each distinct launch here
and ``tests/compile_kernels.py`` compiles every one of them for a GPU target afterwards.

A launch is recorded as what Triton specialises on, not as its values: tensors by dtype
and 16-byte alignment, integers by the classes the JIT tells apart (== 1, multiple of 16,
other; 32 or 64 bits), floats and booleans by type, None as None, and the constexprs and
launch options exactly, whether passed by position or by name. Enabled by
``SAM_FUSED_RECORD_LAUNCHES=<file>`` (see ``tests/conftest.py``); the file is written when
the session ends.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import torch

_INT32 = 2**31


def describe(value: Any) -> Any:
    """A JSON-able stand-in for ``value`` that Triton specialises exactly like ``value``."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        base = 0 if -_INT32 <= value < _INT32 else 2**40
        if value == 1:
            return 1
        return {"int": base + (16 if value % 16 == 0 else 7)}
    if isinstance(value, float):
        return {"float": 0.5}
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def _is_constexpr(param: inspect.Parameter, tl) -> bool:
    return param.annotation is tl.constexpr or param.annotation in ("tl.constexpr", "constexpr")


@functools.cache
def _constexprs(fn) -> tuple[tuple[bool, ...], frozenset[str]]:
    """Which positions, and which parameter names, are constexprs of kernel ``fn``."""
    import triton.language as tl

    params = list(inspect.signature(fn).parameters.values())
    flags = tuple(_is_constexpr(p, tl) for p in params)
    return flags, frozenset(p.name for p, flag in zip(params, flags) if flag)


class LaunchRecorder:
    """Hooks the interpreter's launch so each new specialization lands in ``self.launches``."""

    def __init__(self) -> None:
        self.launches: dict[str, dict] = {}
        self._undo = None

    def install(self) -> None:
        from benchmarks.bench_host import intercept_triton_launches

        self._undo = intercept_triton_launches(self.record, run_kernels=True)

    def uninstall(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def record(self, fn, args: tuple, kwargs: dict) -> None:
        positions, names = _constexprs(fn)
        parameters = inspect.signature(fn).parameters
        entry = {
            "module": fn.__module__,
            "kernel": fn.__name__,
            # a constexpr is kept exactly, by position or by name; every other kernel argument
            # as what Triton specialises on; launch options (num_warps, ...) exactly
            "args": [a if is_const else describe(a) for is_const, a in zip(positions, args)],
            "kwargs": {
                k: v if k in names or k not in parameters else describe(v) for k, v in sorted(kwargs.items())
            },
        }
        key = json.dumps(entry, sort_keys=True)
        self.launches.setdefault(key, entry)

    def write(self, path: str | Path) -> None:
        """Merge into ``path`` (several pytest runs, or the workers of one pytest-xdist run, may
        share one file: the merge holds a lock file beside it)."""
        from filelock import FileLock  # a dependency of torch

        path = Path(path)
        with FileLock(str(path) + ".lock"):
            known = {}
            if path.exists():
                for entry in json.loads(path.read_text()):
                    known[json.dumps(entry, sort_keys=True)] = entry
            known.update(self.launches)
            path.write_text(json.dumps([known[k] for k in sorted(known)], indent=0))
