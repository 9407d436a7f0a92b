"""Per-kernel resource use of compiled GPU code, read with cuobjdump (no GPU needed).

Shared by ``tests/compile_kernels.py`` (Triton cubins) and ``tests/test_cuda_source.py``
(the CUDA C++ object): registers, stack and local memory per thread, where stack or local
memory means the kernel spills.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple


class KernelUsage(NamedTuple):
    name: str
    regs: int
    stack: int
    local: int

    @property
    def spills(self) -> int:
        return self.stack + self.local


def cuobjdump() -> Path | None:
    """The cuobjdump that ships inside the triton wheel, else one on the PATH."""
    try:
        import triton
    except ImportError:
        triton = None
    if triton is not None:
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if tool.is_file():
            return tool
    found = shutil.which("cuobjdump")
    return Path(found) if found else None


def resource_usage(binary: str | Path) -> list[KernelUsage] | None:
    """Every kernel in a cubin or object file; None when no cuobjdump is available."""
    tool = cuobjdump()
    if tool is None:
        return None
    out = subprocess.run([str(tool), "-res-usage", str(binary)], capture_output=True, text=True).stdout
    found = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return [KernelUsage(name, int(r), int(s), int(loc)) for name, r, s, loc in found]
