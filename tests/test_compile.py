"""torch.compile. A compiled model trains with sam_fused, and a compiled function
that calls the optimizer runs it eagerly (a graph break at the optimizer, by design) with
the same numbers as the eager loop.

On the CPU the compiler backend is ``aot_eager`` (Dynamo + AOTAutograd, the parts that
touch parameters and gradients, without Inductor's C++ build, which takes minutes on two
cores); on a GPU (``SAM_FUSED_TEST_DEVICE=cuda``) Inductor itself.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import classification_batch, mlp
from conftest import DEVICE

from sam_fused import GSAM, SAM

COMPILER = "inductor" if DEVICE == "cuda" else "aot_eager"
# aot_eager runs the same ATen ops as eager mode; Inductor fuses and reorders float math
# (its own Triton kernels), so three steps may drift by a few float32 roundings
TOL = dict(rtol=1e-4, atol=1e-5) if COMPILER == "inductor" else dict(rtol=1e-5, atol=1e-6)


def make_model(device: str) -> torch.nn.Module:
    return mlp([7, 33, 3], device=device, norm=torch.nn.LayerNorm, activation=torch.nn.GELU)


def batch(step: int, device: str):
    return classification_batch(step, 16, 7, 3, device)


def loss_fn(out, y):
    return torch.nn.functional.cross_entropy(out, y)


def sam_step(forward, opt, x, y) -> torch.Tensor:
    loss = loss_fn(forward(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    loss_fn(forward(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss.detach()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [SAM, GSAM])
def test_compiled_model_trains_like_the_eager_one(backend, device, cls):
    runs = []
    for compiled in (False, True):
        model = make_model(device)
        forward = torch.compile(model, backend=COMPILER) if compiled else model
        opt = cls(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
        losses = [sam_step(forward, opt, *batch(i, device)) for i in range(3)]
        runs.append(([p.detach().clone() for p in model.parameters()], torch.stack(losses)))
    torch.testing.assert_close(runs[1][1], runs[0][1], **TOL)
    for a, b in zip(runs[1][0], runs[0][0]):
        torch.testing.assert_close(a, b, **TOL)


def test_compiled_training_step_runs_the_optimizer_eagerly(backend, device):
    """The whole step under torch.compile: Dynamo compiles the forward/backward pieces and
    calls first_step/second_step eagerly (they are marked torch.compiler.disable)."""
    runs = []
    for compiled in (False, True):
        model = make_model(device)
        opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, backend=backend)

        def step(x, y, model=model, opt=opt):
            return sam_step(model, opt, x, y)

        step_fn = torch.compile(step, backend=COMPILER) if compiled else step
        losses = [step_fn(*batch(i, device)) for i in range(3)]
        runs.append(([p.detach().clone() for p in model.parameters()], torch.stack(losses)))
    torch.testing.assert_close(runs[1][1], runs[0][1], **TOL)
    for a, b in zip(runs[1][0], runs[0][0]):
        torch.testing.assert_close(a, b, **TOL)
