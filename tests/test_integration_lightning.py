"""SAM under the real ``lightning.Trainer`` (2.6), with and without ``SAMCallback``.

Every run is compared with the manual loop (tests/_frameworks.py) over the same batches,
bit for bit: weights and BatchNorm buffers, the loss Lightning reports, the step count.
"""

from __future__ import annotations

import importlib
import sys

import _frameworks as fw
import pytest
import torch
from conftest import backends_for
from torch.utils.data import DataLoader, TensorDataset

pl = fw.framework("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from sam_fused.integrations.lightning import SAMCallback, grad_scaler  # noqa: E402

STEPS = 6  # batches per epoch


@pytest.fixture(autouse=True)
def _isolated():
    with fw.isolated_run():
        yield


class Module(pl.LightningModule):
    """Regression on ``fw.Net``; records what each pass saw and what Lightning reported."""

    def __init__(self, variant: str, bn: bool = False, manual: bool = False, **sam_kwargs) -> None:
        super().__init__()
        self.net = fw.Net(bn)
        self.variant, self.sam_kwargs = variant, sam_kwargs
        self.automatic_optimization = not manual
        self.passes: list[tuple[bool, float]] = []  # (perturbed, loss) per training_step call
        self.reported: list[float] = []  # the loss Lightning hands on_train_batch_end
        self.before_step_calls = 0
        self.finish = "step"  # manual optimization ends a step with opt.step(), or opt.second_step()

    def training_step(self, batch, batch_idx):
        if not self.automatic_optimization:
            return self.manual_training_step(batch)
        loss = fw.loss_of(self.net, batch)
        self.passes.append((self.optimizers().perturbed, float(loss)))
        return loss

    def manual_training_step(self, batch) -> None:
        """The manual-optimization recipe of the README."""
        opt = self.optimizers()
        if opt.variant.perturbs_before_pass:
            opt.noise_step()
        loss = fw.loss_of(self.net, batch)
        self.manual_backward(loss)
        self.passes.append((False, float(loss)))
        if opt.first_step(zero_grad=True, grad_scaler=grad_scaler(self.trainer)):
            self.manual_backward(fw.loss_of(self.net, batch))
            if self.finish == "second_step":  # the popular recipe
                opt.second_step()
        if self.finish == "step":
            opt.step()
        opt.zero_grad()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if outputs:
            self.reported.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, optimizer) -> None:
        self.before_step_calls += 1

    def configure_optimizers(self):
        return fw.make_sam(self.variant, self.net.parameters(), **self.sam_kwargs)


DATA = fw.batches(STEPS)


def loader() -> DataLoader:
    x, y = (torch.cat(t) for t in zip(*DATA))
    return DataLoader(TensorDataset(x, y), batch_size=8)


def trainer(callback: bool = True, **kwargs) -> pl.Trainer:
    options = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [],
        **kwargs,
    }
    if callback:
        options["callbacks"] = [SAMCallback(), *options["callbacks"]]
    return pl.Trainer(**options)


def fp16_plugin(init_scale: float = 2.0**10) -> MixedPrecision:
    """Lightning turns precision="16-mixed" on the CPU into bf16; a plugin instance with a CPU
    GradScaler drives the fp16 path (fp16 autocast, scaled losses, scaler.step)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def manual_run(variant: str, accumulate: int = 1, steps: int = STEPS, epochs: int = 1, **kwargs):
    """The independent run: the manual loop over the same windows. Returns the model, the
    optimizer and the first-pass loss of each step."""
    sam_kwargs = kwargs.pop("sam_kwargs", {})
    bn = kwargs.pop("bn", False)
    model = fw.Net(bn)
    opt = fw.make_sam(variant, model.parameters(), **sam_kwargs)
    windows = [DATA[i : i + accumulate] for i in range(0, steps, accumulate)] * epochs
    firsts = [fw.manual_step(model, opt, w, freeze_bn=bn, **kwargs) for w in windows]
    return model, opt, firsts


def window_sums(values: list[float], accumulate: int) -> list[float]:
    return [sum(values[i : i + accumulate]) for i in range(0, len(values), accumulate)]


# ---------------------------------------------------------------------------- without the callback
@pytest.mark.parametrize("variant", ["sam", "rsam", "looksam"])
def test_plain_trainer_runs_sam_through_its_closure(variant):
    """fp32 without accumulation or clipping: Lightning's closure goes through step(closure),
    once per pass; the weights are the manual loop's (the reported loss is the second
    pass's, and hooks run after each pass: the README lists what the callback changes)."""
    module = Module(variant)
    run = trainer(callback=False)
    run.fit(module, loader())
    want, _, firsts = manual_run(variant)
    fw.assert_same(fw.weights(module.net), fw.weights(want), variant)
    assert run.global_step == STEPS
    assert [loss for perturbed, loss in module.passes if not perturbed] == firsts
    two_pass = [perturbed for perturbed, _ in module.passes].count(True)
    assert module.before_step_calls == STEPS + two_pass  # once per pass


def test_plain_trainer_refusals_name_the_callback():
    """Where the plain Trainer cannot run SAM, the run stops at the first step with the fix
    named, and no update was applied (the refused manual opt.step() leaves the step in
    flight, as any refusal does: abort_step() takes the weights back to w)."""
    initial = fw.weights(fw.Net())
    cases = [
        ({"plugins": [fp16_plugin()]}, False, "SAMCallback"),  # one pass, then scaler.step(opt)
        ({"accumulate_grad_batches": 2}, False, "SAMCallback"),  # micro-batch 0 outside step
        ({}, True, "SAMCallback"),  # manual: opt.step() hands SAM a closure mid-step
        # Lightning's own refusal (its plugin sees _step_supports_amp_scaling): README
        ({"precision": "bf16-mixed", "gradient_clip_val": 0.5}, False, "gradient clipping"),
    ]
    for kwargs, manual, message in cases:
        module = Module("sam", manual=manual)
        run = trainer(callback=False, **kwargs)
        with pytest.raises(RuntimeError, match=message):
            run.fit(module, loader())
        assert run.optimizers[0].abort_step() == manual
        fw.assert_same(fw.weights(module.net), initial, f"refused run {kwargs}")


# ---------------------------------------------------------------------------- with the callback
@pytest.mark.parametrize("variant", ["sam", "vasso", "gsam", "rsam", "looksam", "interval"])
def test_callback_accumulates_both_passes_over_the_window(variant):
    """accumulate_grad_batches=2 with BatchNorm: both passes over both micro-batches, the
    second with frozen statistics; Lightning reports the first pass's loss, counts one step
    per window and runs on_before_optimizer_step once per step."""
    module = Module(variant, bn=True)
    run = trainer(accumulate_grad_batches=2)
    run.fit(module, loader())
    want, _, firsts = manual_run(variant, accumulate=2, bn=True)
    fw.assert_same(fw.weights(module.net), fw.weights(want), variant)  # BN buffers included
    assert int(module.net.body[1].num_batches_tracked) == STEPS  # one forward per batch recorded
    assert run.global_step == STEPS // 2 == module.before_step_calls
    assert window_sums(module.reported, 2) == firsts
    # each micro-batch's, divided by the window's size (a power of two: exact)
    assert [loss / 2 for perturbed, loss in module.passes if not perturbed] == module.reported
    if variant in ("looksam", "interval"):  # k=2: a one-pass step in between
        assert [p for p, _ in module.passes].count(True) == 2 * 2


@pytest.mark.parametrize(
    "variant, precision, accumulate",
    [
        ("sam", "bf16-mixed", 1),
        ("vasso", "32-true", 2),
        ("sam", "16-mixed", 2),
        ("interval", "16-mixed", 1),
    ],
)
def test_callback_clips_in_sam_under_every_precision(variant, precision, accumulate):
    """gradient_clip_val becomes SAM(max_grad_norm): the descent gradient clipped once, after
    unscaling. fp16 starts from a scale that overflows, so a skipped step and the scaler's
    back-off are part of the comparison."""
    fp16 = precision == "16-mixed"
    kwargs = {"plugins": [fp16_plugin(2.0**24)]} if fp16 else {"precision": precision}
    module = Module(variant)
    run = trainer(gradient_clip_val=0.5, accumulate_grad_batches=accumulate, **kwargs)
    run.fit(module, loader())
    sam = run.optimizers[0]
    assert sam.max_grad_norm == 0.5
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24) if fp16 else None
    want, opt, firsts = manual_run(
        variant, accumulate, autocast=dtype, scaler=scaler, sam_kwargs={"max_grad_norm": 0.5}
    )
    fw.assert_same(fw.weights(module.net), fw.weights(want), f"{variant} {precision}")
    assert int(sam.skipped_steps) == int(opt.skipped_steps)
    if fp16:
        assert int(opt.skipped_steps) >= 1
        assert run.precision_plugin.scaler.get_scale() == scaler.get_scale() < 2.0**24
    assert window_sums(module.reported, accumulate) == firsts


@pytest.mark.parametrize("fp16", [False, True], ids=["32-true", "16-mixed"])
@pytest.mark.parametrize("variant", ["rsam", "interval"])
def test_callback_manual_optimization_counts_steps(variant, fp16):
    """Manual optimization: first_step(), the second pass, opt.step(). The callback makes
    opt.step() finish the SAM step (through the scaler under fp16), so global_step counts
    and max_steps stops the run."""
    kwargs = {"plugins": [fp16_plugin()]} if fp16 else {}
    module = Module(variant, manual=True)
    run = trainer(max_steps=4, **kwargs)
    run.fit(module, loader())
    assert run.global_step == 4
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if fp16 else None
    want, _, firsts = manual_run(variant, steps=4, autocast=torch.float16 if fp16 else None, scaler=scaler)
    fw.assert_same(fw.weights(module.net), fw.weights(want), variant)
    assert [loss for _, loss in module.passes] == firsts


@pytest.mark.parametrize("callback", [False, True], ids=["plain", "callback"])
@pytest.mark.parametrize(
    "variant,backend", [(v, b) for v in ("sam", "interval") for b in backends_for(v)], ids="-".join
)
def test_manual_second_step_counts_global_step(variant, backend, callback):
    """The popular recipe, opt.first_step(), the second pass, opt.second_step() on
    self.optimizers(), without opt.step(): each SAM step counts once in global_step (a
    one-pass step of interval SAM too), with or without the callback, so max_steps stops the
    run; the weights are the manual loop's."""
    module = Module(variant, manual=True, backend=backend)
    module.finish = "second_step"
    run = trainer(callback=callback, max_steps=4)
    run.fit(module, loader())
    assert run.global_step == 4
    want, _, firsts = manual_run(variant, steps=4, sam_kwargs={"backend": backend})
    fw.assert_same(fw.weights(module.net), fw.weights(want), variant)
    assert [loss for _, loss in module.passes] == firsts


def test_the_glue_without_lightning_names_the_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "sam_fused.integrations.lightning")
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without it shows
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'sam_fused\[lightning\]'"):
        importlib.import_module("sam_fused.integrations.lightning")


@pytest.mark.parametrize("variant", ["rsam", "interval"])
def test_checkpoint_resume_equals_the_uninterrupted_run(variant, tmp_path):
    """ModelCheckpoint every 3 steps (an epoch: Lightning resumes a plain DataLoader from the
    epoch's start, so a mid-epoch checkpoint would not reproduce the run with any optimizer);
    a fresh Trainer and module resumed from it (fit(ckpt_path=...)) end where the
    uninterrupted run ends: weights, BN buffers and the optimizer's step index (IntervalSAM's
    schedule), RSAM's generator."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    whole = Module(variant, bn=True)
    run = trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[checkpoints], enable_checkpointing=True)
    run.fit(whole, loader())
    assert run.global_step == STEPS  # 3 per epoch
    saved = tmp_path / "epoch=0-step=3.ckpt"
    assert saved.exists(), sorted(p.name for p in tmp_path.iterdir())

    resumed = Module(variant, bn=True)
    with torch.no_grad():  # built differently: only the checkpoint can make it equal
        for p in resumed.net.parameters():
            p.add_(1.0)
    again = trainer(max_epochs=2, accumulate_grad_batches=2)
    again.fit(resumed, loader(), ckpt_path=saved)
    assert again.global_step == STEPS
    fw.assert_same(fw.weights(resumed.net), fw.weights(whole.net), f"{variant} resumed")
    want_state, got_state = run.optimizers[0].state_dict(), again.optimizers[0].state_dict()
    entry = lambda state: state["param_groups"][0]["sam_fused"]  # sam_fused's entry rides in each group
    assert entry(got_state)["step_index"] == entry(want_state)["step_index"] == STEPS
    want, _, _ = manual_run(variant, accumulate=2, epochs=2, bn=True)
    fw.assert_same(fw.weights(whole.net), fw.weights(want), f"{variant} uninterrupted vs manual")


def test_callback_refuses_what_sam_cannot_do():
    with pytest.raises(ValueError, match="LookSAM"):  # SAM.max_grad_norm's own refusal
        trainer(gradient_clip_val=1.0).fit(Module("looksam"), loader())
    with pytest.raises(ValueError, match="global norm"):
        trainer(gradient_clip_val=1.0, gradient_clip_algorithm="value").fit(Module("sam"), loader())
    with pytest.raises(ValueError, match="max_grad_norm"):
        trainer(gradient_clip_val=1.0).fit(Module("sam", max_grad_norm=2.0), loader())
