"""Start a multi-rank worker script (gloo, CPU) and collect what each rank saved.

Shared by the test modules that run SAM on several processes (``test_distributed.py``,
``test_dcp.py``): each starts its worker once per module, every rank writes
``OUT_DIR/rank{RANK}.pt``, and the tests compare those with computations of their own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sam_fused.backends import CppBackend

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Path, out: Path, world: int, timeout: float) -> list[dict[str, Any]]:
    """Run ``worker OUT`` on ``world`` ranks; what each saved, in rank order (a failure fails the test)."""
    # load (or build) the C++ extension here first, so that the ranks do not all build it
    CppBackend.info()
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",  # the ranks share two cores
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    procs = []
    for rank in range(world):
        log = open(out / f"rank{rank}.log", "w+")  # noqa: SIM115  closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(worker), str(out)],
                    env={**env, "RANK": str(rank)},
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    failures = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                other.kill()
            code = "timeout"
        log.seek(0)
        text = log.read()
        log.close()
        if code != 0:
            failures.append(f"rank {rank} exited with {code}:\n{text[-4000:]}")
    if failures:
        pytest.fail("\n\n".join(failures))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
