"""SAM under the real Hugging Face ``Trainer`` (transformers 5.2x) through ``SAMTrainer``.

A tiny BERT classifier built from a config (nothing is downloaded). Every run is compared
with the manual loop over the very windows the Trainer drew (it shuffles), bit for bit:
the weights, the logged loss (the first pass's) and the logged grad_norm.
"""

from __future__ import annotations

import _frameworks as fw
import pytest
import torch

transformers = fw.framework("transformers")
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

import sam_fused  # noqa: E402
from sam_fused.integrations.transformers import SAMTrainer  # noqa: E402

CLASSES = {"sam": sam_fused.SAM, "rsam": sam_fused.RSAM, "looksam": sam_fused.LookSAM}
CLASSES.update(gsam=sam_fused.GSAM, interval=sam_fused.IntervalSAM)


@pytest.fixture(autouse=True)
def _isolated():
    with fw.isolated_run():
        yield


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


class Recording(SAMTrainer):
    """Keeps a copy of every window the Trainer fetched, for the manual loop."""

    def get_batch_samples(self, *args, **kwargs):
        samples, num_items = super().get_batch_samples(*args, **kwargs)
        self.windows.append(([{k: v.clone() for k, v in s.items()} for s in samples], num_items))
        return samples, num_items


def training_args(out, **kwargs) -> TrainingArguments:
    options = {
        "output_dir": str(out),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "report_to": [],
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "optim": "sgd",
        "max_grad_norm": 0.0,
        "seed": 0,
        "dataloader_num_workers": 0,
        **kwargs,
    }
    return TrainingArguments(**options)


def train(tmp_path, variant: str = "sam", sam_kwargs=None, **kwargs) -> Recording:
    trainer = Recording(
        model=tiny_bert(),
        args=training_args(tmp_path, **kwargs),
        train_dataset=Tokens(),
        sam_class=CLASSES[variant],
        sam_kwargs={"rho": 0.05, **(sam_kwargs or {})},
    )
    trainer.windows = []
    if kwargs.get("fp16"):  # what fp16=True sets up on a GPU; on the CPU accelerate would run fp32
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        trainer.accelerator.native_amp = True
    trainer.train()
    return trainer


def manual_run(trainer: Recording, variant: str, sam_kwargs=None, **kwargs):
    """The manual loop over the Trainer's windows, with the Trainer's loss convention: a model
    that takes loss kwargs gets ``num_items_in_batch`` and its loss is not divided by the
    window's size (the Trainer's choice, kept here)."""
    args = training_args("unused", **kwargs)
    model = tiny_bert()
    decay = set(trainer.get_decay_parameter_names(model))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    base, base_kwargs = trainer.get_optimizer_cls_and_kwargs(args, model)
    clip = args.max_grad_norm or None
    opt = CLASSES[variant](groups, base, rho=0.05, max_grad_norm=clip, **(sam_kwargs or {}), **base_kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if args.fp16 else None
    autocast = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    firsts, norms = [], []
    for window, num_items in trainer.windows:
        with_items = trainer.model_accepts_loss_kwargs and num_items is not None
        extra = {"num_items_in_batch": num_items} if with_items else {}
        firsts.append(
            fw.manual_step(
                model,
                opt,
                window,
                lambda m, inputs, extra=extra: m(**inputs, **extra).loss,
                divide=not with_items,
                autocast=autocast,
                scaler=scaler,
            )
        )
        if clip:
            norms.append(float(opt.variant.descent_norm2(opt._engine.status, opt.variant_options).sqrt()))
    return model, firsts, norms


def logged(trainer: Recording, key: str) -> list[float]:
    return [
        entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry
    ]


CASES = {
    "sgd": ("sam", {}),
    "ga2-clip": ("sam", {"gradient_accumulation_steps": 2, "max_grad_norm": 0.5}),
    "gsam-adamw-wd-clip": (
        "gsam",
        {"optim": "adamw_torch", "weight_decay": 0.01, "max_grad_norm": 1.0, "learning_rate": 1e-3},
    ),
    "interval-ga2": ("interval", {"gradient_accumulation_steps": 2}),
    "looksam": ("looksam", {}),
    "rsam": ("rsam", {}),
    "bf16-clip": ("sam", {"bf16": True, "max_grad_norm": 0.5}),
    "fp16-ga2-clip": ("sam", {"fp16": True, "gradient_accumulation_steps": 2, "max_grad_norm": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sam_trainer_equals_the_manual_loop(case, tmp_path):
    variant, kwargs = CASES[case]
    sam_kwargs = {"k": 2} if variant in ("interval", "looksam") else {}
    trainer = train(tmp_path, variant, sam_kwargs=sam_kwargs, **kwargs)
    assert trainer.state.global_step == 4 == len(trainer.windows)
    model, firsts, norms = manual_run(trainer, variant, sam_kwargs=sam_kwargs, **kwargs)
    fw.assert_same(fw.weights(trainer.model), fw.weights(model), case)
    # the logged loss is the first pass's (summed as tensors there, as floats here)
    assert logged(trainer, "loss") == pytest.approx(firsts, rel=1e-6)
    if kwargs.get("max_grad_norm"):
        assert trainer.sam.max_grad_norm == kwargs["max_grad_norm"]
        assert logged(trainer, "grad_norm") == pytest.approx(norms, rel=1e-6)
    else:
        assert logged(trainer, "grad_norm") == []


def test_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """IntervalSAM with accumulation, checkpoint at step 3 (SAM's state_dict in optimizer.pt,
    the step index that decides its one-pass steps included), resumed by a new Trainer."""
    kwargs = {"gradient_accumulation_steps": 2, "max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    whole = train(tmp_path / "whole", "interval", sam_kwargs={"k": 2}, **kwargs)
    resumed = Recording(
        model=tiny_bert(seed=1),
        args=training_args(tmp_path / "whole", **kwargs),
        train_dataset=Tokens(),
        sam_class=sam_fused.IntervalSAM,
        sam_kwargs={"rho": 0.05, "k": 2},
    )
    resumed.windows = []
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert resumed.state.global_step == 6 and len(resumed.windows) == 3
    fw.assert_same(fw.weights(resumed.model), fw.weights(whole.model), "resumed")
    model, _, _ = manual_run(whole, "interval", sam_kwargs={"k": 2}, **kwargs)
    fw.assert_same(fw.weights(whole.model), fw.weights(model), "uninterrupted vs manual")


def test_plain_trainer_and_misconfigurations_are_refused(tmp_path):
    """The plain Trainer with a SAM fails at its first step, naming SAMTrainer; LookSAM under
    the Trainer's default max_grad_norm=1.0 is refused with the fix."""
    model = tiny_bert()
    before = fw.weights(model)
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=1e-2)
    plain = transformers.Trainer(
        model=model, args=training_args(tmp_path), train_dataset=Tokens(), optimizers=(opt, None)
    )
    with pytest.raises(RuntimeError, match="SAMTrainer"):
        plain.train()
    fw.assert_same(fw.weights(model), before, "refused")
    with pytest.raises(ValueError, match=r"max_grad_norm=0"):
        train(tmp_path, "looksam", max_grad_norm=1.0)
