"""SAM on two ranks (gloo, CPU) against single-process and textbook computations.

One pair of worker processes (``tests/_distributed_worker.py``) runs every distributed
scenario once, for the whole module; each test then compares what the ranks ended with
against a computation made here, in this process, without torch.distributed:

* synced DDP SAM on 2 ranks x half a batch == single-process SAM on the whole batch;
* m-sharpness == each rank's own perturbation (own gradient, own norm), the second
  gradients averaged, written out with autograd; and it differs from synced SAM;
* inside ``local_first_pass`` the first-pass gradient is the rank's own, while the popular
  recipe (forward outside ``no_sync``, backward inside) still all-reduces;
* FSDP2 (``fully_shard``, DTensor parameters) == single-process SAM, norm included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
import _distributed_worker as W  # the problem both sides build
from _ranks import run_ranks

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_distributed_worker.py"
LAUNCH_TIMEOUT = 240  # seconds; the two ranks take about 20 s on two cores

# float32: the all-reduce adds the two half-batch means in another order than one
# full-batch backward does, so equal computations agree to rounding, not bitwise
RTOL, ATOL = 2e-5, 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """Run both ranks once; what each saved, in rank order."""
    return run_ranks(WORKER, tmp_path_factory.mktemp("dist"), W.WORLD, LAUNCH_TIMEOUT)


# ---------------------------------------------------------------------------- independent runs
def _single_process_sam(
    base: str, backend: str, variant: str = "sam", options: dict | None = None, steps: list[int] | None = None
):
    """Plain SAM in this process on the whole batch: what the ranks together must compute.
    ``steps``: the batches to step on, by index (default: all of them, in order)."""
    model = W.make_model()
    params = list(model.parameters())
    opt = W.make_sam(params, base, backend, variant, options)
    data = W.batches()
    norms = W.train(model, opt, data if steps is None else [data[i] for i in steps])
    snap = W.snapshot(params, opt, base, lambda t: t)
    snap["norms"] = norms
    snap["backends"] = opt.backends
    return snap


def _grads(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(W.loss_fn(model(x), y), list(model.parameters())))


def _norm(grads: list[Tensor]) -> Tensor:
    return torch.sqrt(sum(g.square().sum() for g in grads))


def _textbook_m_sharpness(base: str) -> dict[str, Any]:
    """m-sharpness with m = the per-rank batch, with autograd and torch.optim only.

    Each replica perturbs its copy of w along its own gradient, normalised by its own norm;
    the gradients at the replicas' perturbed points are averaged and the base optimizer
    steps from w with that average.
    """
    model = W.make_model()
    params = list(model.parameters())
    cls, kwargs = W.BASES[base]
    opt = cls(params, **kwargs)
    for batch in W.batches():
        w = [p.detach().clone() for p in params]
        second = []
        for rank in range(W.WORLD):
            x, y = W.shard(batch, rank)
            g = _grads(model, x, y)
            norm = _norm(g)
            with torch.no_grad():
                for p, w0, gi in zip(params, w, g):
                    p.copy_(w0 + W.RHO * gi / (norm + 1e-12))
            second.append(_grads(model, x, y))
            with torch.no_grad():
                for p, w0 in zip(params, w):
                    p.copy_(w0)
        for i, p in enumerate(params):
            p.grad = sum(gs[i] for gs in second) / W.WORLD
        opt.step()
    return W.snapshot(params, opt, base, lambda t: t)


def _assert_close_runs(got: dict[str, Any], want: dict[str, Any], rtol: float = RTOL, atol: float = ATOL):
    for i, (a, b) in enumerate(zip(got["params"], want["params"], strict=True)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"param {i}: {m}")
    for i, (sa, sb) in enumerate(zip(got["state"], want["state"], strict=True)):
        assert sa.keys() == sb.keys()
        for name in sa:
            torch.testing.assert_close(
                sa[name], sb[name], rtol=rtol, atol=atol, msg=lambda m, i=i, n=name: f"state {n} of {i}: {m}"
            )


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b) if x.numel())


CASES = [(backend, base) for backend in W.DDP_BACKENDS for base in W.BASES]


# ---------------------------------------------------------------------------- DDP
@pytest.mark.parametrize(("backend", "base"), CASES)
def test_synced_ddp_equals_single_process_full_batch(ranks, backend, base):
    want = _single_process_sam(base, backend)
    for rank, res in enumerate(ranks):
        assert res["ddp"][f"backends/{backend}"] == want["backends"], f"rank {rank}"
        _assert_close_runs(res["ddp"][f"synced/{backend}/{base}"], want)


@pytest.mark.parametrize(("backend", "base"), CASES)
def test_m_sharpness_equals_per_replica_perturbation(ranks, backend, base):
    want = _textbook_m_sharpness(base)
    for res in ranks:
        _assert_close_runs(res["ddp"][f"msharp/{backend}/{base}"], want)


@pytest.mark.parametrize(("backend", "base"), CASES)
def test_m_sharpness_differs_from_synced_sam(ranks, backend, base):
    for res in ranks:
        m = res["ddp"][f"msharp/{backend}/{base}"]["params"]
        synced = res["ddp"][f"synced/{backend}/{base}"]["params"]
        # far above the rounding differences the equality tests tolerate
        assert _max_diff(m, synced) > 1e-3


def test_manual_loop_with_context_manager_equals_sam_step(ranks):
    for res in ranks:
        got, want = res["ddp"]["msharp_manual"], res["ddp"]["msharp/reference/sgd"]
        for a, b in zip(
            got["params"] + [s["momentum_buffer"] for s in got["state"]],
            want["params"] + [s["momentum_buffer"] for s in want["state"]],
        ):
            assert torch.equal(a, b)


def test_local_first_pass_skips_the_all_reduce(ranks):
    """Inside the helper each rank's gradient is its own, and so is its perturbation."""
    model = W.make_model()
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    batch = W.batches()[0]
    for rank, res in enumerate(ranks):
        local = _grads(model, *W.shard(batch, rank))
        for got, want in zip(res["ddp"]["helper/grads"], local):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
        norm = _norm(local)
        for got, w, g in zip(res["ddp"]["helper/perturbed"], w0, local):
            torch.testing.assert_close(got, w + W.RHO * g / (norm + 1e-12), rtol=RTOL, atol=ATOL)
    r0, r1 = (res["ddp"] for res in ranks)
    assert _max_diff(r0["helper/grads"], r1["helper/grads"]) > 1e-3
    assert _max_diff(r0["helper/perturbed"], r1["helper/perturbed"]) > 1e-3


def test_no_sync_around_backward_only_still_all_reduces(ranks):
    """The popular recipe's first pass: forward outside no_sync, backward inside."""
    model = W.make_model()
    batch = W.batches()[0]
    synced = _grads(model, *batch)  # the whole batch's mean loss = DDP's average
    for rank, res in enumerate(ranks):
        naive = res["ddp"]["naive/grads"]
        for got, want in zip(naive, synced):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
        assert _max_diff(naive, _grads(model, *W.shard(batch, rank))) > 1e-3


def test_nonfinite_first_pass_on_one_rank_skips_on_every_rank(ranks):
    w0 = [p.detach() for p in W.make_model().parameters()]
    for res in ranks:
        run = res["ddp"]["nan/agree=True"]
        assert run["skipped"] == 1.0
        assert all(torch.equal(a, b) for a, b in zip(run["params"], w0))
    # without agree_on_skip only rank 1 skips, and the replicas part: the reason it exists
    r0, r1 = (res["ddp"]["nan/agree=False"] for res in ranks)
    assert (r0["skipped"], r1["skipped"]) == (0.0, 1.0)
    assert _max_diff(r0["params"], r1["params"]) > 1e-3


# ---------------------------------------------------------------------------- FSDP2
@pytest.mark.parametrize(("variant", "base", "backend", "options"), W.FSDP_CASES, ids=lambda c: str(c))
def test_fsdp2_equals_single_process_full_batch(ranks, variant, base, backend, options):
    key = f"fsdp/{variant}/{base}/{backend}"
    want = _single_process_sam(base, backend, variant, options)
    for res in ranks:
        got = res["fsdp"][key]
        # local shards: foreach, or the C++ table kernels where "auto" picks them
        assert got["backends"] == [W.auto_backend(variant) if backend == "auto" else "reference"]
        _assert_close_runs(got, want)
        torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(want["norms"]), rtol=RTOL, atol=0)
    # the shards really are split (7 rows: 4 + 3; rank 1's share of the 1-row layer is empty)
    shapes = [res["fsdp"][key]["local_shapes"] for res in ranks]
    assert shapes == [[(4, 6), (4,), (1, 7), (1,)], [(3, 6), (3,), (0, 7), (0,)]]


FUSED_FSDP = [pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}") for c in W.fused_fsdp_cases() if c[0] != "rsam"]


@pytest.mark.parametrize(("variant", "base", "backend", "options"), FUSED_FSDP)
def test_fsdp2_fused_table_path_equals_single_process(ranks, variant, base, backend, options):
    """Every variant x base with FSDP2's shards in a fused backend's multi-tensor kernels: the
    sharded run equals plain SAM on the whole model in one process (the reference backend),
    norms included, on both ranks; and the fused path is what ran."""
    key = f"fsdp/{variant}/{base}/{backend}"
    want = _single_process_sam(base, "reference", variant, options)
    for res in ranks:
        got = res["fsdp"][key]
        assert got["backends"] == [backend]
        _assert_close_runs(got, want)
        torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(want["norms"]), rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend", [b for b in W.table_backends() if W.runs_variant(b, "rsam")])
@pytest.mark.parametrize("base", sorted(W.BASES))
def test_fsdp2_rsam_noise_is_drawn_per_shard(ranks, backend, base):
    """RSAM's noise comes from the optimizer's generator over each rank's own elements (one
    draw of the local numel, documented in docs/variants.md), so a sharded run is not the
    unsharded one; the fused table path draws exactly what the reference draws on the shard."""
    for res in ranks:
        got, want = res["fsdp"][f"fsdp/rsam/{base}/{backend}"], res["fsdp"][f"fsdp/rsam/{base}/reference"]
        assert got["backends"] == [backend] and want["backends"] == ["reference"]
        _assert_close_runs(got, want)


def test_fsdp2_norm_is_the_full_model_norm(ranks):
    """The first step's norm against the full model's gradient, computed here with autograd."""
    model = W.make_model()
    want = float(_norm(_grads(model, *W.batches()[0])))
    for res in ranks:
        for variant, base, backend, _ in W.FSDP_CASES:
            got = res["fsdp"][f"fsdp/{variant}/{base}/{backend}"]["norms"][0]
            assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("backend", W.FSDP_BACKENDS)
@pytest.mark.parametrize("how", W.OVERFLOW_LOOPS)
def test_fsdp2_overflow_in_one_shard_skips_the_step_on_every_rank(ranks, how, backend):
    """An infinity in one rank's gradient shard only (first pass on rank 1, then second pass on
    rank 0): both ranks skip both steps, the loss scale backs off the same on both, and the
    run equals single-process SAM over the clean steps alone."""
    clean = [batch for batch, bad_pass, _ in W.OVERFLOW_STEPS if bad_pass is None]
    want = _single_process_sam("sgd", "reference", steps=clean)
    bad = [bad_pass is not None for _, bad_pass, _ in W.OVERFLOW_STEPS]
    skipped = [float(sum(bad[: i + 1])) for i in range(len(bad))]
    scales = [W.OVERFLOW_SCALE * 0.5 ** sum(bad[: i + 1]) for i in range(len(bad))]  # backoff 0.5
    for rank, res in enumerate(ranks):
        run = res["fsdp"][f"overflow/{how}/{backend}"]
        assert [s["skipped"] for s in run["steps"]] == skipped, f"rank {rank}"
        if how != "unscaled":
            assert [s["scale"] for s in run["steps"]] == scales, f"rank {rank}"
        for i in range(1, len(bad)):
            if bad[i]:  # a skipped step leaves the weights exactly where the step before left them
                for a, b in zip(run["steps"][i]["params"], run["steps"][i - 1]["params"]):
                    assert torch.equal(a, b), f"rank {rank}, step {i}"
        _assert_close_runs(run, want)


def test_refusals_on_two_ranks(ranks):
    for res in ranks:
        errors = res["fsdp"]["errors"]
        assert errors["mixed"].startswith("ValueError") and "all or none" in errors["mixed"]
        # GCSAM's row means on a shard that holds parts of rows would be wrong: refused
        assert errors["gcsam_rows"].startswith("ValueError") and "along dimension 1" in errors["gcsam_rows"]
        assert errors["gcsam_rows_unchanged"] is True
        assert errors["cpp"] is None  # backend="cpp" runs the local shards over table buckets
        assert errors["local_first_pass"].startswith("TypeError") and "DTensor" in errors["local_first_pass"]
        assert errors["inner_module"].startswith("TypeError") and "not its .module" in errors["inner_module"]


# ---------------------------------------------------------------------------- one process
def test_import_needs_no_process_group():
    code = (
        "import torch.distributed as dist, sam_fused.distributed as d; "
        "assert not dist.is_initialized(); print(sorted(d.__all__))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['agree_on_skip',", "'local_first_pass',", "'sam_step']"]


def test_plain_module_in_one_process_is_a_pass_through():
    """Without a multi-rank job every gradient is local: sam_step(m_sharpness=True) is plain SAM."""
    from sam_fused.distributed import sam_step

    runs = []
    for m_sharpness in (False, True):
        model = W.make_model()
        opt = W.make_sam(model.parameters(), "sgd", "reference")
        for x, y in W.batches():
            sam_step(model, opt, lambda x=x, y=y, m=model: W.loss_fn(m(x), y), m_sharpness=m_sharpness)
        runs.append([p.detach().clone() for p in model.parameters()])
    want = _single_process_sam("sgd", "reference")["params"]
    for got in runs:
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_input_is_refused():
    from sam_fused.distributed import local_first_pass, sam_step

    model = W.make_model()
    with pytest.raises(TypeError, match="DistributedDataParallel"), local_first_pass(nn.DataParallel(model)):
        pass
    with pytest.raises(TypeError, match=r"nn\.Module"), local_first_pass(object()):
        pass
    gsam = W.make_sam(model.parameters(), "sgd", "reference", "gsam")
    with pytest.raises(ValueError, match="m_sharpness=False"):
        sam_step(model, gsam, lambda: W.loss_fn(model(torch.ones(2, 6)), torch.ones(2, 1)), m_sharpness=True)
