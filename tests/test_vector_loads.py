"""The Triton kernels read parameters through address tables at full vector width.

Parameters keep their own storage, so every kernel finds them through a table of addresses
(``sam_fused/tables.py``). An address loaded from memory tells the compiler nothing about
its alignment; the aligned specialization (``TABLE=2``, every address 16-byte aligned, the
usual case) says it, and then each thread must move its elements as 128-bit vectors, as a
kernel over one flat buffer would. This compiles the update kernel (SGD, Adam, Lion) for an
H100/H200 (sm_90) without a GPU (``compile_kernels.py``'s compile-only driver; ptxas ships
in the triton wheel) and counts the global loads and stores in the PTX.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

HERE = Path(__file__).resolve().parent

# one process: the real compiler must be chosen before triton is first imported, and the
# test session imported it with TRITON_INTERPRET=1
_PROBE = r"""
import json, re, sys
import torch
from compile_kernels import _install_driver
_install_driver(("cuda", 90, 32))
from sam_fused.backends.triton import WARPS
from sam_fused.base_updates import AdamSpec, SGDSpec
from sam_fused.kernels import descent
from sam_fused.lion import LionSpec
from sam_fused.tables import CHUNK

table = torch.empty(64, dtype=torch.int64)
status = torch.empty(64, dtype=torch.float64)
steps = torch.empty(64, dtype=torch.float32)
# (spec, option bits, states): SGD with momentum, AdamW, Lion with weight decay
cases = {"sgd": (SGDSpec, 0b0010, 1), "adam": (AdamSpec, 0b0011, 2), "lion": (LionSpec, 0b01, 1)}
out = {}
for kernel, (spec, options, states) in cases.items():
    for dtype in ("float32", "bfloat16"):
        for layout in (1, 2):
            like = torch.empty(64, dtype=getattr(torch, dtype))
            compiled = descent.update_kernel.warmup(
                src=table, param=table, grad=table,
                state0=table if states > 0 else None, state1=table if states > 1 else None, state2=None,
                aux=None, gv=None, steps=steps, status=status, lr_arg=0.1,
                device_scalars=torch.empty(2, dtype=torch.float64) if spec is AdamSpec else None,
                h0=0.1, h1=0.9, h2=0.1, h3=1e-8, h4=0.0, h5=1.0, alpha=0.0, table=table, like=like,
                BASE=spec.kernel, OPTIONS=options, DESCENT=0, UNSCALE=False, CLIP_GRAD=False, CHECK=True,
                LR_ON_DEVICE=False, TABLE=layout, BLOCK=CHUNK, num_warps=WARPS, grid=(1,))
            ptx = compiled.asm["ptx"]
            out[f"{kernel}/{dtype}/{layout}"] = {
                "v4_loads": len(re.findall(r"ld\.global(\.[a-z]+)*\.v4\.b32", ptx)),
                "v4_stores": len(re.findall(r"st\.global(\.[a-z]+)*\.v4\.b32", ptx)),
                "narrow_stores": len(re.findall(r"st\.global(\.[a-z]+)*\.b(16|32) ", ptx)),
            }
json.dump(out, sys.stdout)
"""

# streams the update kernel reads and writes per element (SGD with momentum: backup, grad,
# momentum in; weight, momentum out. Adam: backup, grad, exp_avg, exp_avg_sq in; weight,
# exp_avg, exp_avg_sq out. Lion: backup, grad, exp_avg in; weight, exp_avg out)
STREAMS = {"sgd": (3, 2), "adam": (4, 3), "lion": (3, 2)}


@pytest.fixture(scope="module")
def counts() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, cwd=HERE, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    return json.loads(done.stdout)


@pytest.mark.parametrize("kernel", sorted(STREAMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_aligned_tables_move_128_bit_vectors(counts, kernel, dtype):
    from sam_fused.backends.triton import WARPS
    from sam_fused.tables import CHUNK

    per_thread = CHUNK // (32 * WARPS) * dtype.itemsize  # bytes of one stream per thread
    vectors = per_thread // 16
    assert vectors >= 1, "a thread holds less than 16 bytes of a stream: no 128-bit access possible"
    reads, writes = STREAMS[kernel]
    name = str(dtype).removeprefix("torch.")
    aligned = counts[f"{kernel}/{name}/2"]
    assert aligned["v4_loads"] == reads * vectors
    assert aligned["v4_stores"] == writes * vectors
    assert aligned["narrow_stores"] == 0
    unaligned = counts[f"{kernel}/{name}/1"]  # offset views: element by element, correctly
    assert unaligned["v4_loads"] == unaligned["v4_stores"] == 0
    assert unaligned["narrow_stores"] > 0


def test_the_probe_reads_real_ptx():
    """The counts come from PTX text: a PTX vector load looks like this (so the regular
    expressions above can match, and a renamed instruction would fail loudly)."""
    assert re.fullmatch(r"ld\.global(\.[a-z]+)*\.v4\.b32", "ld.global.v4.b32")
    assert re.fullmatch(r"ld\.global(\.[a-z]+)*\.v4\.b32", "ld.global.nc.v4.b32")
