"""The CUDA backend's own source, run on the CPU, against the reference.

CI has no GPU, so ``csrc/sam_fused_cuda.cu`` is also built as host C++ against a small
emulation of the CUDA runtime (``tests/emulated_cuda/cuda_emulation.h``: one fiber per CUDA
thread, barriers and warp shuffles honoured, blocks in turn). Its host code (argument
checks, run tables, 16-byte pack selection, grid sizes) and its five kernels then run over
CPU tensors, driven by the ``cuda`` backend's Python class.

The parity tests of ``test_cpp_backend.py`` run here unchanged against that library: every
operation on awkward sizes and all three dtypes, then whole training runs through ``SAM``.
What emulation cannot check (the memory system, nvcc's FMA contraction, real concurrency)
stays for ``SAM_FUSED_TEST_DEVICE=cuda`` on a GPU (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import test_cpp_backend as compiled_tests
import torch
from conftest import DEVICE
from emulated_cuda_backend import EmulatedCudaBackend

# Collected in this module, run against the emulated library by the fixture below.
from test_cpp_backend import (  # noqa: F401
    test_ascent_stats,
    test_ascent_stats_over_several_groups_is_one_norm,
    test_checkpoint_resume_is_bitwise,
    test_every_low_precision_value_survives_the_float32_round_trip,
    test_nonfinite_counts,
    test_nonfinite_gradient_skips_the_whole_step,
    test_norm_is_bitwise_reproducible,
    test_perturb_and_restore,
    test_perturb_skips_on_a_nonfinite_first_gradient,
    test_perturb_with_zero_gradient_is_zero,
    test_training_matches_the_reference_in_float32,
    test_training_skips_the_same_steps,
    test_training_tracks_the_reference_in_low_precision,
    test_update,
    test_update_after_a_separate_restore,
    test_update_without_the_nonfinite_check,
)

import sam_fused.optimizer
from sam_fused._extension import ABI_VERSION, NO_BUILD_ENV
from sam_fused.variants import VARIANTS

if DEVICE == "cuda":
    pytest.skip("on a GPU machine the real kernels run (tests/test_cpp_backend.py)", allow_module_level=True)

INFO = EmulatedCudaBackend.info()  # builds on first use
BUILDS = os.environ.get(NO_BUILD_ENV, "0") in ("", "0")
_BACKEND: list[EmulatedCudaBackend] = []


@pytest.fixture
def device() -> str:
    """The emulation runs on CPU tensors, whatever SAM_FUSED_TEST_DEVICE says."""
    return "cpu"


@pytest.fixture(autouse=True)
def emulated_cuda(monkeypatch):
    """backend='cuda' resolves to the emulated library, for the harness and for SAM."""
    if not INFO:
        if BUILDS:
            pytest.fail(f"the emulated CUDA library did not build: {INFO.detail}")
        pytest.skip(f"{NO_BUILD_ENV} is set: nothing is compiled")
    if not _BACKEND:
        _BACKEND.append(EmulatedCudaBackend())
    real = compiled_tests.make_backend

    def make_backend(name, device, dtype, variant=None):
        if name != "cuda":
            return real(name, device, dtype, variant)
        assert torch.device(device).type == "cpu"
        if variant is not None and not EmulatedCudaBackend.supports_variant(variant):
            raise ValueError(f"the cuda backend has no kernels for variant {variant.name!r}")
        return _BACKEND[0]

    monkeypatch.setattr(compiled_tests, "COMPILED", "cuda")
    monkeypatch.setattr(compiled_tests, "make_backend", make_backend)
    monkeypatch.setattr(sam_fused.optimizer, "make_backend", make_backend)
    return _BACKEND[0]


def test_the_emulated_library_is_the_cuda_source():
    """Built from csrc/sam_fused_cuda.cu (the CUDA slot size, not the CPU one), and used."""
    abi, chunk, max_slots = torch.ops.sam_fused_cuda_emulated.constants()
    assert (abi, chunk, max_slots) == (ABI_VERSION, 4096, 1024)
    assert int(torch.ops.sam_fused_cpu.constants()[1]) != chunk
    pair = compiled_tests.Pair([7], torch.float32, "cpu")
    assert isinstance(pair.fused.backend, EmulatedCudaBackend)
    assert pair.fused.backend.ops is torch.ops.sam_fused_cuda_emulated


@pytest.mark.parametrize("dtype", compiled_tests.DTYPES)
@pytest.mark.parametrize("spec", [pytest.param(s, id=k) for k, s in compiled_tests.SGD_CASES.items()])
def test_sgd_kernel_is_bitwise_the_reference_without_fma(dtype, spec):
    """Built without FMA contraction (as here), the CUDA SGD kernel rounds exactly as the
    reference: its formula has the reference's operation order. (On the GPU nvcc contracts
    a*b+c, so there the results differ by roundings; the tolerance tests cover that.)"""
    pair = compiled_tests.Pair(compiled_tests.SIZES["mixed"] + [65536 + 3], dtype, "cpu")
    compiled_tests.run_steps(pair, spec, 3, compiled_tests.group())
    bits = compiled_tests.bits
    for a, b in zip(pair.fused.params, pair.ref.params):
        assert torch.equal(bits(a), bits(b))
    for name in compiled_tests.state_names_for(spec):
        for i in range(len(pair.sizes)):
            assert torch.equal(bits(pair.fused.state_of(name, i)), bits(pair.ref.state_of(name, i)))


@pytest.mark.parametrize("size", [4 * 256 * 8 * 3 + 4, 8 * 256 * 8 * 2 + 8])
@pytest.mark.parametrize("dtype", compiled_tests.DTYPES)
def test_grid_stride_loops_cover_runs_longer_than_the_grid(size, dtype):
    """With one emulated SM the elementwise grid is 8 blocks of 256 threads, so these runs
    (16-byte packs, several turns of the grid-stride loop) need every turn to match."""
    pair = compiled_tests.Pair([size, 8], dtype, "cpu")
    original = [p.detach().clone() for p in pair.fused.params]
    compiled_tests.run_steps(pair, replace(compiled_tests.ADAMW, amsgrad=True), 2, compiled_tests.group())
    pair.compare_params(steps=2)
    if dtype == torch.float32:  # a step of 1e-3 moves every float32 weight
        assert all((p.detach() != w).all() for p, w in zip(pair.fused.params, original))


def test_a_variant_without_kernels_is_refused_like_on_the_gpu():
    with pytest.raises(ValueError, match="no kernels for variant 'vasso'"):
        compiled_tests.make_backend("cuda", torch.device("cpu"), torch.float32, VARIANTS["vasso"])
