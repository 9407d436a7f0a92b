"""The README's Python snippets run, in order, on a small model (documentation that users
copy must not rot).

They share one namespace, as a reader's session would, seeded with what the text leaves to
the reader: ``model``, ``loss_fn``, ``loader``, ``x``, ``y``, ``epochs``, ``example_x``,
``example_y``, a checkpoint ``path`` and a folder ``checkpoint_dir``. The device in the
mixed-precision recipe is the test device. Not run here: the CUDA-graph recipe off a GPU
(``GraphedSAMStep`` needs CUDA tensors; its behaviour is tested in tests/test_graph.py),
the framework recipes (they need a framework's trainer and data;
tests/test_integration_<framework>.py runs each of them with the real package) and the DDP
recipes (they need a process group; tests/test_distributed.py runs them on two ranks).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import torch
from conftest import DEVICE

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_HERE = ["sam_fused.integrations", "DistributedDataParallel", "sam_fused.distributed"]
if DEVICE != "cuda":
    NOT_HERE.append("GraphedSAMStep")


def snippets() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return [textwrap.dedent(b) for b in blocks]


def test_readme_snippets_run(tmp_path):
    blocks = snippets()
    assert len(blocks) >= 10, "the README lost its examples?"
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(7, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    ).to(DEVICE)
    loader = [(torch.randn(8, 7, device=DEVICE), torch.randint(0, 3, (8,), device=DEVICE)) for _ in range(2)]
    x, y = loader[0]
    namespace = {
        "torch": torch,
        "model": model,
        "loss_fn": torch.nn.functional.cross_entropy,
        "loader": loader,
        "x": x,
        "y": y,
        "epochs": 1,
        "example_x": x,
        "example_y": y,
        "path": tmp_path / "checkpoint.pt",
        "checkpoint_dir": tmp_path / "dcp",  # torch.distributed.checkpoint writes a folder
    }
    ran = 0
    for index, code in enumerate(blocks):
        if any(marker in code for marker in NOT_HERE):
            continue
        if "rho_sched" in code and "rho_sched" not in namespace:  # the text assumes one exists
            from sam_fused.schedules import PolynomialRho

            namespace["rho_sched"] = PolynomialRho(namespace["opt"], power=0.5)
        code = code.replace('"cuda"', repr(DEVICE))
        before = [p.detach().clone() for p in model.parameters()]
        try:
            exec(compile(code, f"README.md python block {index}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README python block {index} failed:\n{code}") from exc
        ran += 1
        if "backward()" in code:  # a training snippet must have trained
            assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before)), index
    assert ran >= 8
    for p in model.parameters():
        assert torch.isfinite(p).all()
