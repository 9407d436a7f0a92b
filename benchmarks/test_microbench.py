"""pytest-benchmark microbenchmarks of one SAM optimizer step, run only on request.

    pytest benchmarks/                 # CPU: baseline and the reference backend, small sets
    pytest benchmarks/ --benchmark-only -k triton   # on a GPU machine

``tests/`` is the test suite (``testpaths`` in pyproject.toml); these files are not part of
it. Besides the timings, a few plain tests check what the timings rest on: the parameter
sets have the sizes benchmarks/param_sets.py documents, and the implementations being
compared compute the same step.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.bench_sam_step import build, make_params, stepper
from benchmarks.param_sets import cpu_sets, full_sets

pytest.importorskip("pytest_benchmark")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
SET_NAMES = ("resnet50", "2000x4096")


def bench_sets() -> dict:
    """Full sizes on a GPU; the --quick CPU sizes (about 0.1 M elements) otherwise."""
    sets = full_sets() if HAS_CUDA else cpu_sets(4)
    return {s.name: s for s in sets if s.name in SET_NAMES}


IMPLS = [
    "baseline",
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_CUDA, reason="the triton backend needs CUDA")),
]


# ---------------------------------------------------------------------------- sanity


def test_full_sets_match_anchors() -> None:
    sizes = {s.name: (s.count, s.numel) for s in full_sets()}
    assert sizes["resnet50"] == (161, 25_557_032)
    assert sizes["vit_b16"] == (152, 86_567_656)
    assert sizes["2000x4096"] == (2000, 2000 * 4096)
    assert sizes["one_134m"] == (1, 134_217_728)


def test_cpu_sets_keep_tensor_counts() -> None:
    for full, small in zip(full_sets(), cpu_sets()):
        assert small.count == full.count
        assert all(len(a) == len(b) for a, b in zip(full.shapes, small.shapes))
        assert small.numel < full.numel / 10


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_implementations_agree(base: str) -> None:
    """Three steps of the baseline and of sam_fused give the same weights (fp32 rounding)."""
    shapes = [(17, 5), (17,), (3, 3, 3, 3), (1000,)]
    finals = {}
    impls = ["baseline", "reference"] + (["triton"] if HAS_CUDA else [])
    for impl in impls:
        params = make_params(shapes, DEVICE, torch.float32, seed=3)
        step = stepper(build(impl, params, base))
        for _ in range(3):
            step()
        finals[impl] = torch.cat([p.detach().flatten() for p in params]).cpu()
    for impl in impls[1:]:
        torch.testing.assert_close(finals[impl], finals["baseline"], rtol=1e-5, atol=1e-6)


def test_baseline_first_step_is_sam() -> None:
    """The baseline's perturbation is rho * g / ||g||, and the restore is exact."""
    params = make_params([(4, 3), (5,)], torch.device("cpu"), torch.float32, seed=4)
    before = [p.detach().clone() for p in params]
    opt = build("baseline", params, "sgd")
    opt.first_step()
    norm = math.sqrt(sum(float(p.grad.square().sum()) for p in params))
    for p, w in zip(params, before):
        torch.testing.assert_close(p.detach(), w + 0.05 * p.grad / (norm + 1e-12))
    for group in opt.param_groups:
        group["lr"] = 0.0
        group["weight_decay"] = 0.0
    opt.second_step()
    for p, w in zip(params, before):
        assert torch.equal(p.detach(), w)


# ---------------------------------------------------------------------------- timings


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("set_name", SET_NAMES)
def test_sam_step(benchmark, set_name: str, base: str, impl: str) -> None:
    """first_step + second_step with gradients in place (no forward/backward)."""
    pset = bench_sets()[set_name]
    params = make_params(list(pset.shapes), DEVICE, torch.float32)
    step = stepper(build(impl, params, base))

    def timed() -> None:
        step()
        if HAS_CUDA:
            torch.cuda.synchronize()

    timed()  # state allocation, kernel compilation, the flat-buffer plan
    benchmark.group = f"{pset.label} {base}"
    benchmark.extra_info.update(elements=pset.numel, tensors=pset.count, device=str(DEVICE))
    benchmark.pedantic(timed, rounds=10 if HAS_CUDA else 5, warmup_rounds=1, iterations=1)
    assert all(torch.isfinite(p).all() for p in params)
