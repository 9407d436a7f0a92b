"""Device selection shared by the benchmark CLIs."""

from __future__ import annotations

import torch


def pick_device(name: str, threads: int | None) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` as a concrete device; CPU runs use ``threads`` (default 1).

    One CPU thread by default: the scaled CPU workloads are small, and OpenMP threads
    competing for a busy core made timings many times slower and noisy.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
        device = torch.device("cuda", torch.cuda.current_device())
    if threads is not None or device.type == "cpu":
        torch.set_num_threads(threads or 1)
    return device
