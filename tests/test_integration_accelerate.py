"""SAM under the real accelerate (1.15): prepare, step(closure), the manual loop through
``unwrap``, ``SAMBackward`` with accumulate() and fp16, save_state/load_state.

Every run is compared with the manual loop (tests/_frameworks.py) over the same batches.
"""

from __future__ import annotations

import _frameworks as fw
import pytest
import torch

accelerate = fw.framework("accelerate")
from accelerate.state import AcceleratorState  # noqa: E402

from sam_fused.integrations.accelerate import SAMBackward, unwrap  # noqa: E402

DATA = fw.batches(6)


@pytest.fixture(autouse=True)
def _isolated():
    with fw.isolated_run():
        yield


def accelerator(precision: str = "no", accumulate: int = 1) -> accelerate.Accelerator:
    """On the CPU accelerate turns fp16 into fp32 (no scaler, no autocast); "fp16" here gets
    the CPU GradScaler and the fp16 autocast it would set up on a GPU."""
    acc = accelerate.Accelerator(cpu=True, mixed_precision=precision, gradient_accumulation_steps=accumulate)
    if precision == "fp16":
        acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**10), True
    return acc


AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def manual_run(variant: str, precision: str = "no", accumulate: int = 1, bn: bool = False, steps: int = 6):
    model = fw.Net(bn)
    opt = fw.make_sam(variant, model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if precision == "fp16" else None
    windows = [DATA[i : i + accumulate] for i in range(0, steps, accumulate)]
    firsts = [
        fw.manual_step(model, opt, w, autocast=AUTOCAST[precision], scaler=scaler, freeze_bn=bn)
        for w in windows
    ]
    return model, opt, firsts


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("variant", ["sam", "rsam", "looksam"])
def test_step_with_a_closure_through_the_prepared_optimizer(variant, precision):
    """No accumulation, fp32 or bf16: the prepared optimizer forwards step(closure), which
    runs both passes; the plain accelerate loop needs nothing else."""
    acc = accelerator(precision)
    model = fw.Net()
    model, opt = acc.prepare(model, fw.make_sam(variant, model.parameters()))
    sam, losses = unwrap(opt), []
    for batch in DATA:

        def closure(batch=batch):
            loss = fw.loss_of(model, batch)
            acc.backward(loss)
            if not sam.perturbed:  # the first pass (accelerate's step() returns nothing)
                losses.append(float(loss))
            return loss

        opt.step(closure)
        opt.zero_grad()
    want, _, firsts = manual_run(variant, precision)
    fw.assert_same(fw.weights(model), fw.weights(want), f"{variant} {precision}")
    assert losses == firsts


@pytest.mark.parametrize("precision", ["no", "fp16"])
@pytest.mark.parametrize("variant", ["sam", "interval"])
def test_manual_loop_through_unwrap(variant, precision):
    """first_step on unwrap(optimizer) with accelerate's scaler, the second pass, then the
    prepared optimizer's step(), which finishes the SAM step (under fp16: scaler.step(SAM)
    and update())."""
    acc = accelerator(precision)
    model = fw.Net()
    model, opt = acc.prepare(model, fw.make_sam(variant, model.parameters()))
    sam = unwrap(opt)
    assert sam is opt.optimizer and not hasattr(opt, "first_step")
    for batch in DATA:
        acc.backward(fw.loss_of(model, batch))
        if sam.first_step(zero_grad=True, grad_scaler=acc.scaler):
            acc.backward(fw.loss_of(model, batch))
        opt.step()
        opt.zero_grad()
    want, _, _ = manual_run(variant, precision)
    fw.assert_same(fw.weights(model), fw.weights(want), f"{variant} {precision}")
    if precision == "fp16":
        assert acc.scaler.get_scale() == 2.0**10  # no overflow here: nothing backed off


@pytest.mark.parametrize("precision", ["no", "fp16"])
@pytest.mark.parametrize("variant", ["sam", "gsam", "rsam", "interval"])
def test_sam_backward_accumulates_both_passes(variant, precision):
    """accumulate() over 2 micro-batches with BatchNorm: SAMBackward runs both passes over
    the window (the second with frozen statistics); equal to the manual loop, and the loss
    it returns is the first pass's."""
    acc = accelerator(precision, accumulate=2)
    model = fw.Net(bn=True)
    model, opt = acc.prepare(model, fw.make_sam(variant, model.parameters()))
    backward = SAMBackward(acc, model, opt, lambda batch: fw.loss_of(model, batch))
    losses = []
    for batch in DATA:
        with acc.accumulate(model):
            losses.append(float(backward(batch)))
            opt.step()
            opt.zero_grad()
    want, _, firsts = manual_run(variant, precision, accumulate=2, bn=True)
    fw.assert_same(fw.weights(model), fw.weights(want), f"{variant} {precision}")
    assert [(a + b) / 2 for a, b in zip(losses[::2], losses[1::2])] == pytest.approx(firsts, rel=1e-6)
    assert int(model.body[1].num_batches_tracked) == len(DATA)


@pytest.mark.parametrize(
    "precision, accumulate, error, message",
    [
        ("no", 2, RuntimeError, "SAMBackward"),  # SAM's first step(closure) refuses accumulate()
        ("fp16", 1, AssertionError, "scale"),  # torch's GradScaler.step(SAM, closure): README
    ],
)
def test_the_closure_loop_is_refused_where_it_cannot_work(precision, accumulate, error, message):
    """accumulate() never calls step(closure) on a window's first micro-batches, and under
    fp16 GradScaler checks the gradients before the closure could make them: both stop at
    the first step, before the closure runs, with nothing applied."""
    acc = accelerator(precision, accumulate=accumulate)
    model = fw.Net()
    model, opt = acc.prepare(model, fw.make_sam("sam", model.parameters()))
    before = fw.weights(model)
    calls = []
    with pytest.raises(error, match=message):
        for batch in DATA[:2]:
            with acc.accumulate(model):
                opt.step(lambda batch=batch: calls.append(1) or acc.backward(fw.loss_of(model, batch)))
    assert calls == []
    fw.assert_same(fw.weights(model), before, "refused")


@pytest.mark.parametrize("variant", ["vasso", "rsam"])
def test_save_state_and_load_state_resume_the_run(variant, tmp_path):
    """save_state after 3 steps; a fresh Accelerator, model and optimizer (built differently)
    load_state and finish the run: the uninterrupted run's weights and optimizer state."""

    def build(seed: int):
        acc = accelerator()
        model = fw.Net(seed=seed)
        model, opt = acc.prepare(model, fw.make_sam(variant, model.parameters(), **extra(seed)))
        return acc, model, opt

    def extra(seed: int) -> dict:
        return {"seed": seed} if variant == "rsam" else {}

    def train(model, opt, batches):
        for batch in batches:
            opt.step(lambda batch=batch: fw.loss_of(model, batch).backward())
            opt.zero_grad()

    acc, model, opt = build(seed=0)
    train(model, opt, DATA[:3])
    acc.save_state(tmp_path)
    train(model, opt, DATA[3:])
    want_state = opt.state_dict()

    AcceleratorState._reset_state(reset_partial_state=True)
    acc2, model2, opt2 = build(seed=5)
    acc2.load_state(tmp_path)
    train(model2, opt2, DATA[3:])
    fw.assert_same(fw.weights(model2), fw.weights(model), f"{variant} resumed")
    got_state = opt2.state_dict()
    for index, entry in want_state["state"].items():
        fw.assert_same(list(got_state["state"][index].values()), list(entry.values()), f"state {index}")
    reference, _, _ = manual_run(variant)
    fw.assert_same(fw.weights(model), fw.weights(reference), f"{variant} vs manual")
