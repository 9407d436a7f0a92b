"""sam_fused.integrations without any framework: what importing the package pulls in, and
``unwrap`` (its use inside each framework's wrapper is tested in test_integration_*.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sam_fused
from sam_fused.integrations import unwrap

FRAMEWORKS = ("lightning", "pytorch_lightning", "accelerate", "transformers", "timm", "torchvision")


def test_importing_sam_fused_imports_no_framework():
    """A fresh interpreter: sam_fused, its integrations package and the check step(closure)
    runs import none of the frameworks (each glue module imports its own)."""
    code = (
        "import sys, torch, sam_fused, sam_fused.integrations as i\n"
        "m = torch.nn.Linear(2, 1)\n"
        "opt = sam_fused.SAM(m.parameters(), lr=0.1, backend='reference')\n"
        "opt.step(lambda: m(torch.ones(1, 2)).sum().backward())\n"
        "i.unwrap(opt)\n"
        f"print(sorted(k for k in sys.modules if k.split('.')[0] in {FRAMEWORKS!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unwrap_finds_the_sam_behind_wrappers():
    model = torch.nn.Linear(2, 1)
    opt = sam_fused.SAM(model.parameters(), lr=0.1, backend="reference")

    class Wrapper:  # the shape of accelerate's and Lightning's wrappers: .optimizer
        def __init__(self, inner):
            self.optimizer = inner

    assert unwrap(opt) is opt
    assert unwrap(Wrapper(Wrapper(opt))) is opt
    with pytest.raises(TypeError, match=r"sam_fused\.SAM"):
        unwrap(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"sam_fused\.SAM"):
        unwrap(Wrapper(object()))
