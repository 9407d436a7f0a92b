"""Checkpoints saved the ecosystem's way, reloaded into freshly built models, on every backend.

The savers find tied weights by storage identity (safetensors refuses, or drops, tensors
that share a storage), so these tests are the guard of the rule that SAM never re-points a
parameter into a shared buffer. Each run trains with SAM on one backend (chosen for the
whole process through ``SAM_FUSED_BACKEND``, as a user would), saves the model (and the
optimizer where the tool saves it) the tool's own way, then builds everything anew, as
after a restart, loads, and compares with the run that was not interrupted: weights and
optimizer state bit for bit.
"""

from __future__ import annotations

import _frameworks as fw
import pytest
import torch
from conftest import ALL_BACKENDS

from sam_fused import SAM

safetensors_torch = pytest.importorskip("safetensors.torch")
accelerate = fw.framework("accelerate")
transformers = fw.framework("transformers")
pl = fw.framework("lightning.pytorch")

from accelerate.state import AcceleratorState  # noqa: E402
from test_integration_transformers import Recording, Tokens, tiny_bert, training_args  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

from sam_fused.integrations.accelerate import unwrap  # noqa: E402
from sam_fused.integrations.lightning import SAMCallback  # noqa: E402

DATA = fw.batches(6)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request, monkeypatch) -> str:
    """Every SAM the test builds runs on this backend (``backend="auto"`` is replaced)."""
    monkeypatch.setenv("SAM_FUSED_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _isolated():
    with fw.isolated_run():
        yield


def train(model: torch.nn.Module, opt, batches) -> None:
    for batch in batches:
        opt.step(lambda batch=batch: fw.loss_of(model, batch).backward())
        opt.zero_grad()


def bumped(model: torch.nn.Module) -> torch.nn.Module:
    """The model built differently: only a loaded checkpoint can make it equal again."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    return model


def assert_state_equal(got: dict, want: dict) -> None:
    assert got["state"].keys() == want["state"].keys()
    for key, entry in want["state"].items():
        assert got["state"][key].keys() == entry.keys()
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(got["state"][key][name]), torch.as_tensor(value)), (key, name)


def assert_file_holds(path, model: torch.nn.Module, values: bool = True) -> None:
    """Every key of the model's state_dict (with its values): nothing dropped as 'shared'."""
    saved = safetensors_torch.load_file(str(path))
    expected = model.state_dict()
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        assert not values or torch.equal(saved[key], value), key


# ---------------------------------------------------------------------- accelerate
def test_accelerate_save_state_then_load_state_after_a_restart(backend, tmp_path):
    def build(seed: int):
        acc = accelerate.Accelerator(cpu=True)
        model = fw.Net(seed=seed)
        model, opt = acc.prepare(model, fw.make_sam("sam", model.parameters()))
        return acc, model, opt

    acc, model, opt = build(seed=0)
    train(model, opt, DATA[:3])
    acc.save_state(tmp_path)
    assert_file_holds(tmp_path / "model.safetensors", model)
    train(model, opt, DATA[3:])

    AcceleratorState._reset_state(reset_partial_state=True)
    acc2, model2, opt2 = build(seed=5)
    acc2.load_state(tmp_path)
    train(model2, opt2, DATA[3:])
    fw.assert_same(fw.weights(model2), fw.weights(model), "resumed")
    assert_state_equal(opt2.state_dict(), opt.state_dict())
    assert unwrap(opt2).backends == unwrap(opt).backends == [backend]


def test_accelerate_save_model_writes_every_weight(backend, tmp_path):
    acc = accelerate.Accelerator(cpu=True)
    model = fw.Net()
    model, opt = acc.prepare(model, fw.make_sam("sam", model.parameters()))
    train(model, opt, DATA[:2])
    acc.save_model(model, tmp_path)  # safetensors by default
    assert_file_holds(tmp_path / "model.safetensors", model)
    fresh = bumped(fw.Net(seed=3))
    safetensors_torch.load_model(fresh, str(tmp_path / "model.safetensors"))
    fw.assert_same(fw.weights(fresh), fw.weights(model), "reloaded")


# ---------------------------------------------------------------------- safetensors
def test_safetensors_save_model_and_save_file(backend, tmp_path):
    model = fw.Net()
    opt = fw.make_sam("sam", model.parameters())
    train(model, opt, DATA[:2])
    safetensors_torch.save_model(model, str(tmp_path / "model.safetensors"))
    safetensors_torch.save_file(model.state_dict(), str(tmp_path / "state.safetensors"))
    for name in ("model.safetensors", "state.safetensors"):
        assert_file_holds(tmp_path / name, model)
    fresh = bumped(fw.Net(seed=3))
    missing, unexpected = safetensors_torch.load_model(fresh, str(tmp_path / "model.safetensors"))
    assert not missing and not unexpected
    fw.assert_same(fw.weights(fresh), fw.weights(model), "reloaded")
    train(model, opt, DATA[2:4])  # and the optimizer still trains the model it was built on
    assert not all(torch.equal(a, b) for a, b in zip(fw.weights(fresh), fw.weights(model)))


# ---------------------------------------------------------------------- transformers
# the tiny BERT (built from a config: nothing is downloaded) and the Trainer of
# test_integration_transformers.py
def test_transformers_save_pretrained_then_from_pretrained(backend, tmp_path):
    model = tiny_bert()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids, labels = torch.randint(1, 64, (4, 8), generator=g), torch.randint(0, 2, (4,), generator=g)
        opt.step(lambda ids=ids, labels=labels: model(input_ids=ids, labels=labels).loss.backward())
        opt.zero_grad()
    model.save_pretrained(tmp_path)  # safetensors, tied embeddings handled by transformers itself
    loaded = BertForSequenceClassification.from_pretrained(tmp_path)
    fw.assert_same(fw.weights(loaded), fw.weights(model), "from_pretrained")
    assert opt.backends == [backend]


def test_sam_trainer_checkpoint_then_resume(backend, tmp_path):
    def run(out, resume=None, seed=0):
        model = tiny_bert(seed)
        trainer = Recording(
            model=model,
            args=training_args(out, max_steps=6, save_strategy="steps", save_steps=3),
            train_dataset=Tokens(),
            sam_class=SAM,
            sam_kwargs={"rho": 0.05},
        )
        trainer.windows = []
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    # every weight (the model has trained on since: the resume below checks the values)
    assert_file_holds(tmp_path / "whole" / "checkpoint-3" / "model.safetensors", whole.model, values=False)
    resumed = run(tmp_path / "again", resume=str(tmp_path / "whole" / "checkpoint-3"), seed=7)
    fw.assert_same(fw.weights(resumed.model), fw.weights(whole.model), "resumed")
    assert set(unwrap(whole.optimizer).backends) == {backend}  # two groups: decay and no decay


# ---------------------------------------------------------------------- Lightning
class Module(pl.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = fw.Net(seed=seed)

    def training_step(self, batch, batch_idx):
        return fw.loss_of(self.net, batch)

    def configure_optimizers(self):
        return fw.make_sam("sam", self.net.parameters())


def test_lightning_checkpoint_then_load_from_checkpoint(backend, tmp_path):
    x, y = (torch.cat(t) for t in zip(*DATA))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer = pl.Trainer(max_epochs=1, callbacks=[SAMCallback()], enable_checkpointing=False, **options)
    module = Module()
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert trainer.optimizers[0].backends == [backend]

    loaded = Module.load_from_checkpoint(tmp_path / "last.ckpt", seed=5)  # built differently
    fw.assert_same(fw.weights(loaded.net), fw.weights(module.net), "load_from_checkpoint")
    again = pl.Trainer(max_epochs=2, callbacks=[SAMCallback()], enable_checkpointing=False, **options)
    again.fit(Module(seed=5), data, ckpt_path=tmp_path / "last.ckpt")
    whole = pl.Trainer(max_epochs=2, callbacks=[SAMCallback()], enable_checkpointing=False, **options)
    uninterrupted = Module()
    whole.fit(uninterrupted, data)
    fw.assert_same(fw.weights(again.lightning_module.net), fw.weights(uninterrupted.net), "resumed")
    assert_state_equal(again.optimizers[0].state_dict(), whole.optimizers[0].state_dict())
