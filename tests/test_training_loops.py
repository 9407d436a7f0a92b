"""SAM inside real training loops: BatchNorm, gradient accumulation and checkpoint/resume
with every feature on. (Lightning, accelerate, the Hugging Face Trainer and timm are
driven for real in tests/test_integration_*.py.)

Every numerical check compares with an independent computation on fresh random inputs: a
plain train-mode forward, a float64 formula, the single-big-batch run, the manual SAM loop
or an uninterrupted run.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sam_fused import GSAM, RSAM, SAM, LookSAM, VaSSO, frozen_bn_stats
from sam_fused.schedules import PolynomialRho

# ---------------------------------------------------------------------------- helpers


def fresh_batch(seed: int, n: int = 16, shape: tuple[int, ...] = (6,), device: str = "cpu"):
    """Random inputs and targets, a new draw per seed."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, *shape, generator=g).to(device)
    y = torch.randn(n, 1, generator=g).to(device)
    return x, y


class MLP(nn.Module):
    """A small regression net; ``bn=True`` puts a BatchNorm1d inside a nested block."""

    def __init__(self, bn: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        norm: nn.Module = nn.BatchNorm1d(12) if bn else nn.Identity()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.Sequential(norm, nn.Tanh()), nn.Linear(12, 5))
        self.head = nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


class ConvNet(nn.Module):
    """Conv + BatchNorm2d + Linear + BatchNorm1d: two kinds of BN in nested containers."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.classifier(self.features(x)))


def bn_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {
        name: buf.detach().clone()
        for name, buf in model.named_buffers()
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }


def assert_buffers_equal(got: dict[str, Tensor], want: dict[str, Tensor], what: str) -> None:
    assert got.keys() == want.keys()
    assert got, "the model has no BatchNorm buffers: the check would be empty"
    for name in want:
        assert torch.equal(got[name], want[name]), f"{what}: {name} differs"


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def backward_pass(model: nn.Module, x: Tensor, y: Tensor, micro_batches: int = 1) -> Tensor:
    """One SAM pass: ``micro_batches`` equal chunks, each loss divided by their number, so
    the accumulated gradient is the big batch's mean-loss gradient. Returns the loss."""
    if x.shape[0] % micro_batches:
        raise ValueError(f"batch of {x.shape[0]} does not split into {micro_batches} equal micro-batches")
    total = torch.zeros((), device=x.device)
    for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
        loss = F.mse_loss(model(xb), yb) / micro_batches
        loss.backward()
        total += loss.detach()
    return total


def manual_sam_step(
    model: nn.Module,
    opt: SAM,
    x: Tensor,
    y: Tensor,
    micro_batches: int = 1,
    freeze_bn: bool = False,
    after_backward: Callable[[nn.Module, int], None] | None = None,
) -> Tensor:
    """The documented manual loop; ``after_backward(model, pass_index)`` lets a feature
    touch the gradients (a poisoned entry; later clipping or unscaling)."""
    if opt.variant.perturbs_before_pass:
        opt.noise_step()
    loss = backward_pass(model, x, y, micro_batches)
    if after_backward is not None:
        after_backward(model, 0)
    if opt.first_step(zero_grad=True):
        with frozen_bn_stats(model) if freeze_bn else nullcontext():
            backward_pass(model, x, y, micro_batches)
        if after_backward is not None:
            after_backward(model, 1)
        opt.second_step(zero_grad=True)
    return loss


OPTIMIZERS: dict[str, Callable[..., SAM]] = {
    "sam": lambda params, backend, **kw: SAM(params, rho=0.05, lr=0.05, momentum=0.9, backend=backend, **kw),
    "vasso": lambda params, backend, **kw: VaSSO(
        params, rho=0.05, lr=0.05, momentum=0.9, backend=backend, **kw
    ),
    "gsam": lambda params, backend, **kw: GSAM(
        params, rho=0.05, lr=0.05, momentum=0.9, backend=backend, **kw
    ),
    "rsam": lambda params, backend, **kw: RSAM(
        params, rho=0.05, lr=0.05, momentum=0.9, backend=backend, **kw
    ),
    "looksam": lambda params, backend, **kw: LookSAM(
        params, rho=0.05, k=2, lr=0.05, momentum=0.9, backend=backend, **kw
    ),
}


# ============================================================================ 1. BatchNorm


def bn_case(kind: str, device: str) -> tuple[nn.Module, _BatchNorm, tuple[int, ...]]:
    """A BatchNorm layer of ``kind`` nested two containers deep, and its input shape."""
    layers: dict[str, tuple[Callable[[], _BatchNorm], tuple[int, ...]]] = {
        "BatchNorm1d-2d-input": (lambda: nn.BatchNorm1d(3), (3,)),
        "BatchNorm1d-3d-input": (lambda: nn.BatchNorm1d(3), (3, 5)),
        "BatchNorm2d": (lambda: nn.BatchNorm2d(3), (3, 4, 4)),
        "BatchNorm3d": (lambda: nn.BatchNorm3d(3), (3, 2, 3, 3)),
        "SyncBatchNorm": (lambda: nn.SyncBatchNorm(3), (3, 4, 4)),
        "LazyBatchNorm1d": (lambda: nn.LazyBatchNorm1d(), (3,)),
        "LazyBatchNorm2d": (lambda: nn.LazyBatchNorm2d(), (3, 4, 4)),
        "LazyBatchNorm3d": (lambda: nn.LazyBatchNorm3d(), (3, 2, 3, 3)),
    }
    make, shape = layers[kind]
    bn = make()
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity(), bn)).to(device)
    model.train()
    # move everything off its defaults so "unchanged" and "equal" are not about zeros and ones
    model(fresh_batch(0, 8, shape, device)[0] * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return model, bn, shape


BN_KINDS = [
    "BatchNorm1d-2d-input",
    "BatchNorm1d-3d-input",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]


@pytest.mark.parametrize("kind", BN_KINDS)
def test_frozen_bn_stats_normalizes_with_batch_stats_and_records_nothing(kind, device):
    model, bn, shape = bn_case(kind, device)
    twin = copy.deepcopy(model)  # an ordinary train-mode model: the independent forward
    before = bn_buffers(model)
    x = fresh_batch(1, 8, shape, device)[0] * 3 - 1
    with frozen_bn_stats(model) as frozen:
        assert frozen == [bn]
        out = model(x)
        assert_buffers_equal(bn_buffers(model), before, "inside the block")
    assert bn.track_running_stats is True
    assert_buffers_equal(bn_buffers(model), before, "after the block")
    # same numbers as a plain train-mode forward, which uses the batch statistics
    assert torch.equal(out, twin(x))
    # and as the float64 formula with the batch's biased variance
    dims = [0, *range(2, x.dim())]
    xd = x.double()
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = xd.mean(dims, keepdim=True), xd.var(dims, unbiased=False, keepdim=True)
    want = (xd - mean) / torch.sqrt(var + bn.eps) * bn.weight.double().view(view) + bn.bias.double().view(
        view
    )
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # the twin did record that batch, so the buffers really would have moved without the block
    assert not torch.equal(twin[1][1].running_mean, bn.running_mean)
    # after the block the layer records again
    model(x)
    assert int(bn.num_batches_tracked) == int(before["1.1.num_batches_tracked"]) + 1


def test_frozen_bn_stats_restores_after_an_exception(device):
    model = ConvNet().to(device).train()
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    x, _ = fresh_batch(2, 4, (2, 6, 6), device)
    with pytest.raises(ZeroDivisionError), frozen_bn_stats(model):
        model(x)
        1 / 0  # noqa: B018
    assert [m.track_running_stats for m in norms] == [True, True]
    before = bn_buffers(model)
    model(x)
    after = bn_buffers(model)
    assert all(not torch.equal(after[k], before[k]) for k in before), "stats must update again"


def test_frozen_bn_stats_leaves_eval_and_untracked_layers_alone(device):
    tracked, in_eval, untracked = (
        nn.BatchNorm1d(4),
        nn.BatchNorm1d(4),
        nn.BatchNorm1d(4, track_running_stats=False),
    )
    model = nn.Sequential(tracked, nn.Sequential(in_eval, untracked)).to(device).train()
    model(fresh_batch(3, 8, (4,), device)[0] + 2)  # running stats away from 0 / 1
    in_eval.eval()
    twin = copy.deepcopy(model)
    x = fresh_batch(4, 8, (4,), device)[0]
    before = bn_buffers(model)
    with frozen_bn_stats(model) as frozen:
        assert frozen == [tracked]
        # switching an eval-mode layer would make it use batch stats: it keeps its own
        assert in_eval.track_running_stats is True and untracked.track_running_stats is False
        out = model(x)
        mid = tracked(x)
    assert torch.equal(out, twin(x)), "eval layer must still normalize with its running stats"
    torch.testing.assert_close(
        in_eval(mid), (mid - in_eval.running_mean) / torch.sqrt(in_eval.running_var + 1e-5)
    )
    assert_buffers_equal(bn_buffers(model), before, "eval and untracked layers")
    assert [m.track_running_stats for m in (tracked, in_eval, untracked)] == [True, True, False]


def test_frozen_bn_stats_nests(device):
    model = MLP(bn=True).to(device).train()
    bn = model.body[1][0]
    with frozen_bn_stats(model):
        with frozen_bn_stats(model) as inner:
            assert inner == []  # already frozen: the inner block owns nothing
        assert bn.track_running_stats is False, "leaving the inner block must not unfreeze"
    assert bn.track_running_stats is True


def test_frozen_bn_stats_refuses_bad_input(device):
    with pytest.raises(TypeError, match=r"nn\.Module"), frozen_bn_stats([nn.BatchNorm1d(3)]):  # type: ignore[arg-type]
        pass
    ready, lazy = nn.BatchNorm1d(3), nn.LazyBatchNorm1d()
    model = nn.Sequential(ready, lazy).to(device)
    with pytest.raises(RuntimeError, match="lazy and not initialized"), frozen_bn_stats(model):
        pass
    assert ready.track_running_stats is True and lazy.track_running_stats is True


@pytest.mark.parametrize("freeze", [True, False])
def test_sam_step_with_frozen_second_pass_records_one_forward(freeze, backend, device):
    """A SAM step whose second pass runs under the helper leaves the running stats exactly
    where ONE ordinary forward of the batch at w leaves them; without it they differ."""
    model = ConvNet().to(device).train()
    twin = copy.deepcopy(model)  # built before the optimizer re-points any storage
    opt = OPTIMIZERS["sam"](model.parameters(), backend)
    x, y = fresh_batch(5, 8, (2, 6, 6), device)
    manual_sam_step(model, opt, x, y, freeze_bn=freeze)
    twin(x)  # the independent computation: one train-mode forward at w
    if freeze:
        assert_buffers_equal(bn_buffers(model), bn_buffers(twin), "SAM step with the helper")
    else:  # the control: the perturbed pass is recorded as a second batch
        assert int(model.features[1].num_batches_tracked) == 2
        assert not torch.equal(model.features[1].running_mean, twin.features[1].running_mean)


def bn_freezing_closure(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    """The README's closure: the first call records BN statistics, later calls do not."""
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        calls += 1
        with frozen_bn_stats(model) if calls > 1 else nullcontext():
            loss = F.mse_loss(model(x), y)
            loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("name", ["sam", "looksam"])
def test_bn_freezing_closure_equals_manual_loop(name, backend, device):
    """step(closure) with the README's closure: the manual loop with the helper on pass 2
    (weights and BN buffers bit for bit), and after each step (LookSAM's one-pass steps
    included) the BN buffers of ONE forward at the step's starting weights."""
    manual, closed = ConvNet(seed=4).to(device).train(), ConvNet(seed=4).to(device).train()
    opt_m, opt_c = (
        OPTIMIZERS[name](manual.parameters(), backend),
        OPTIMIZERS[name](closed.parameters(), backend),
    )
    for step in range(4):
        x, y = fresh_batch(60 + step, 8, (2, 6, 6), device)
        one_forward = copy.deepcopy(closed)  # independent: forwards only, at the weights w
        with torch.no_grad():
            one_forward(x)
        manual_sam_step(manual, opt_m, x, y, freeze_bn=True)
        opt_c.step(bn_freezing_closure(closed, x, y))
        opt_c.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(params_of(closed), params_of(manual), strict=True))
        assert_buffers_equal(bn_buffers(closed), bn_buffers(manual), f"closure vs manual, step {step}")
        assert_buffers_equal(bn_buffers(closed), bn_buffers(one_forward), f"one forward, step {step}")


# ============================================================================ 2. accumulation


def run_accumulated(
    name: str,
    backend: str,
    device: str,
    micro_batches: int,
    style: str,
    steps: int = 4,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[list[Tensor], list[dict[str, Tensor]]]]:
    """Parameters and optimizer state after every step."""
    model = MLP(seed=3).to(device=device, dtype=dtype)
    opt = OPTIMIZERS[name](model.parameters(), backend)
    out = []
    for step in range(steps):
        x, y = (t.to(dtype) for t in fresh_batch(10 + step, 16, device=device))
        if style == "manual":
            manual_sam_step(model, opt, x, y, micro_batches)
        else:  # the closure accumulates the micro-batches of one pass

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                return backward_pass(model, x, y, micro_batches)

            opt.step(closure)
            opt.zero_grad()
        state = [
            {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in model.parameters()
        ]
        out.append((params_of(model), state))
    return out


def assert_runs_close(got, want, what: str, rtol: float = 2e-5, atol: float = 2e-6) -> None:
    for step, ((p_got, s_got), (p_want, s_want)) in enumerate(zip(got, want, strict=True)):
        for a, b in zip(p_got, p_want, strict=True):
            torch.testing.assert_close(
                a, b, rtol=2e-5, atol=2e-6, msg=lambda m, step=step: f"{what}, step {step}: {m}"
            )
        for st_a, st_b in zip(s_got, s_want, strict=True):
            assert st_a.keys() == st_b.keys()
            for key in st_b:
                torch.testing.assert_close(st_a[key], st_b[key], rtol=rtol, atol=atol)


@pytest.mark.parametrize("style", ["manual", "closure"])
@pytest.mark.parametrize("name", ["sam", "vasso", "gsam"])
def test_accumulated_micro_batches_equal_one_big_batch(name, style, backend, device):
    big = run_accumulated(name, backend, device, micro_batches=1, style="manual")
    accumulated = run_accumulated(name, backend, device, micro_batches=4, style=style)
    assert_runs_close(accumulated, big, f"{name} with 4 micro-batches ({style})")
    if name == "vasso":  # the persistent state took part, so the comparison covered it
        assert all("vasso_d" in st for st in big[-1][1])


@pytest.mark.parametrize("name", ["sam", "vasso", "gsam"])
def test_accumulation_in_float64_differs_only_by_rounding(name, device):
    """In float64 (reference backend) the two runs agree to 1e-12: what separates them in
    float32 is summation order, not a missing or doubled micro-batch."""
    kw = {"steps": 4, "dtype": torch.float64}
    big = run_accumulated(name, "reference", device, micro_batches=1, style="manual", **kw)
    accumulated = run_accumulated(name, "reference", device, micro_batches=4, style="manual", **kw)
    assert_runs_close(accumulated, big, f"{name} float64", rtol=1e-12, atol=1e-13)


def test_accumulating_only_one_pass_is_detected(device):
    """The control for the tolerance above: a second pass that sees one micro-batch of four
    (what a framework that accumulates outside the step would give) is far from the big batch."""
    model, ref = MLP(seed=3).to(device), MLP(seed=3).to(device)
    opt, ref_opt = (
        OPTIMIZERS["sam"](model.parameters(), "reference"),
        OPTIMIZERS["sam"](ref.parameters(), "reference"),
    )
    x, y = fresh_batch(10, 16, device=device)
    manual_sam_step(ref, ref_opt, x, y)
    backward_pass(model, x, y, 4)
    opt.first_step(zero_grad=True)
    (F.mse_loss(model(x[12:]), y[12:]) / 4).backward()
    opt.second_step(zero_grad=True)
    gap = max((a - b).abs().max().item() for a, b in zip(params_of(model), params_of(ref)))
    assert gap > 1e-4


# ============================================================================ 3. checkpoints


@dataclass
class LoopSpec:
    """What one training run does, so that features can be switched on one by one.

    ``schedulers`` build objects with ``step``/``state_dict``/``load_state_dict`` (LR and
    rho schedules; a GradScaler could join them); ``after_backward`` hooks see the
    gradients of each pass (a poisoned entry; clipping or unscaling could join them);
    ``checks`` assert at the end of a run that a feature really took effect."""

    batchnorm: bool = False
    micro_batches: int = 1
    schedulers: list[Callable[[SAM], Any]] = field(default_factory=list)
    after_backward: list[Callable[[nn.Module, int, int], None]] = field(default_factory=list)
    checks: list[Callable[[nn.Module, SAM], None]] = field(default_factory=list)


def _with_batchnorm(spec: LoopSpec) -> None:
    spec.batchnorm = True

    def moved(model: nn.Module, opt: SAM) -> None:
        bn = model.body[1][0]
        steps = TOTAL_STEPS * spec.micro_batches  # one forward per micro-batch of pass 1
        assert int(bn.num_batches_tracked) == steps, "the second pass must not be recorded"

    spec.checks.append(moved)


def _with_accumulation(spec: LoopSpec) -> None:
    spec.micro_batches = 2


def _with_lr_schedule(spec: LoopSpec) -> None:
    spec.schedulers.append(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL_STEPS))


def _with_rho_schedule(spec: LoopSpec) -> None:
    spec.schedulers.append(lambda opt: PolynomialRho(opt, power=0.5))


POISONED_STEP = 1  # before the checkpoint, so the skip count must survive it


def _with_nonfinite_skip(spec: LoopSpec) -> None:
    def poison(model: nn.Module, step: int, pass_index: int) -> None:
        if step == POISONED_STEP and pass_index == 0:
            model.head.weight.grad[0, 0] = float("nan")

    def skipped_once(model: nn.Module, opt: SAM) -> None:
        assert int(opt.skipped_steps) == 1

    spec.after_backward.append(poison)
    spec.checks.append(skipped_once)


# feature name -> setup; fp16 (GradScaler) and max_grad_norm clipping can be added here
FEATURES: dict[str, Callable[[LoopSpec], None]] = {
    "batchnorm": _with_batchnorm,
    "accumulation": _with_accumulation,
    "lr_schedule": _with_lr_schedule,
    "rho_schedule": _with_rho_schedule,
    "nonfinite_skip": _with_nonfinite_skip,
}
TOTAL_STEPS, SAVE_AFTER = 7, 4  # LookSAM k=2 resumes on a one-pass step


def build_run(name: str, backend: str, device: str, features: tuple[str, ...], seed: int):
    spec = LoopSpec()
    for feature in features:
        FEATURES[feature](spec)
    model = MLP(bn=spec.batchnorm, seed=seed).to(device).train()
    extra = {"seed": seed} if name == "rsam" else {}
    opt = OPTIMIZERS[name](model.parameters(), backend, **extra)
    schedulers = [make(opt) for make in spec.schedulers]
    return spec, model, opt, schedulers


def train(spec: LoopSpec, model: nn.Module, opt: SAM, schedulers: list, steps: range, device: str) -> list:
    """Runs ``steps``; returns the model's whole state (parameters and BN buffers) and the
    groups' lr and rho after each step."""
    trajectory = []
    for step in steps:
        x, y = fresh_batch(40 + step, 16, device=device)

        def hook(model: nn.Module, pass_index: int, step: int = step) -> None:
            for feature_hook in spec.after_backward:
                feature_hook(model, step, pass_index)

        manual_sam_step(model, opt, x, y, spec.micro_batches, freeze_bn=spec.batchnorm, after_backward=hook)
        for sched in schedulers:
            sched.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        groups = [(g["lr"], g["rho"]) for g in opt.param_groups]
        trajectory.append((state, groups))
    return trajectory


def assert_same_trajectory(got: list, want: list, what: str) -> None:
    for i, ((s_got, g_got), (s_want, g_want)) in enumerate(zip(got, want, strict=True)):
        assert g_got == g_want, f"{what}: lr/rho differ after step {SAVE_AFTER + i}"
        for key in s_want:
            assert torch.equal(s_got[key], s_want[key]), f"{what}: {key} differs after step {SAVE_AFTER + i}"


@pytest.mark.parametrize(
    "name, features",
    [(name, tuple(FEATURES)) for name in ("vasso", "looksam", "rsam")]
    + [("vasso", (feature,)) for feature in FEATURES],
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else v,
)
def test_resume_mid_run_equals_uninterrupted_run(name, features, backend, device):
    spec, model, opt, schedulers = build_run(name, backend, device, features, seed=1)
    train(spec, model, opt, schedulers, range(SAVE_AFTER), device)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "schedulers": [s.state_dict() for s in schedulers],
        },
        buffer,
    )
    uninterrupted = train(spec, model, opt, schedulers, range(SAVE_AFTER, TOTAL_STEPS), device)
    for check in spec.checks:
        check(model, opt)

    # everything fresh and built differently (init seed, RSAM seed), then loaded
    spec2, model2, opt2, schedulers2 = build_run(name, backend, device, features, seed=99)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for sched, state in zip(schedulers2, saved["schedulers"], strict=True):
        sched.load_state_dict(state)
    resumed = train(spec2, model2, opt2, schedulers2, range(SAVE_AFTER, TOTAL_STEPS), device)
    for check in spec2.checks:
        check(model2, opt2)
    assert_same_trajectory(resumed, uninterrupted, f"{name} with {'+'.join(features)}")
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert opt.state[p].keys() == opt2.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(opt2.state[q][key]), torch.as_tensor(value)), key
