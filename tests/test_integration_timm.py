"""SAM in the real timm (1.0): ``register()``, then ``create_optimizer_v2`` with timm's
weight-decay groups, on a timm model; two training steps equal a SAM built by hand."""

from __future__ import annotations

import copy
import sys

import _frameworks as fw
import pytest
import torch
import torch.nn.functional as F

fw.framework("timm")  # missing: a failure where setup_env.sh installs it, else a skip
import timm  # noqa: E402
import timm.optim  # noqa: E402
import timm.utils  # noqa: E402

import sam_fused  # noqa: E402
from sam_fused.integrations import timm as sam_timm  # noqa: E402


@pytest.fixture(autouse=True)
def _registered():
    with fw.isolated_run():
        assert sam_timm.register() == sam_timm.names()  # a second call changes nothing
        yield


def model_and_batch():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 3, (2,), generator=g))


def loss_of(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_names_and_registration():
    names = sam_timm.names()
    assert len(names) == len(set(names)) == 10 * 5
    assert all("_" not in name for name in names)  # timm drops everything before an "_"
    listed = set(timm.optim.list_optimizers())
    assert set(names) <= listed
    assert sam_timm.register() == names  # again: nothing changes, no warning
    # the reason for the names: timm parses "sam_adamw" as "adamw" (README warns)
    model, _ = model_and_batch()
    assert type(timm.optim.create_optimizer_v2(model, "sam_adamw", lr=1e-3)) is torch.optim.AdamW


def test_create_optimizer_v2_builds_sam_on_timms_groups_and_trains():
    """ "sam": SAM around SGD with Nesterov momentum 0.9 (timm's "sgd"), on timm's two groups;
    two steps equal the same SAM built by hand on a copy of the model."""
    model, batch = model_and_batch()
    twin = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(model, "sam", lr=0.1, weight_decay=5e-4)
    assert type(opt) is sam_fused.SAM and type(opt.base_optimizer) is torch.optim.SGD
    groups = timm.optim.param_groups_weight_decay(model, 5e-4)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in g["params"]] for g in groups
    ]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4]
    assert all(g["momentum"] == 0.9 and g["nesterov"] and g["rho"] == 0.05 for g in opt.param_groups)

    by_hand = sam_fused.SAM(
        timm.optim.param_groups_weight_decay(twin, 5e-4), torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True
    )
    for o, m in ((opt, model), (by_hand, twin)):
        for _ in range(2):
            fw.manual_step(m, o, [batch], loss_of)
    assert not torch.equal(fw.weights(model)[0], fw.weights(model_and_batch()[0])[0])  # it trained
    fw.assert_same(fw.weights(model), fw.weights(twin), "timm's SAM vs by hand")


@pytest.mark.parametrize(
    "name, kwargs, cls, base, check",
    [
        ("vassoadamw", {"rho": 0.1, "theta": 0.4}, sam_fused.VaSSO, torch.optim.AdamW, {"theta": 0.4}),
        ("looksam", {"k": 3}, sam_fused.LookSAM, torch.optim.SGD, {"k": 3}),
        ("gsamadam", {"alpha": 0.2}, sam_fused.GSAM, torch.optim.Adam, {"alpha": 0.2}),
        ("intervalsammomentum", {"k": 4}, sam_fused.IntervalSAM, torch.optim.SGD, {"k": 4}),
        ("asam", {}, sam_fused.ASAM, torch.optim.SGD, {}),
    ],
)
def test_variant_names_pass_their_options_through(name, kwargs, cls, base, check):
    model, batch = model_and_batch()
    opt = timm.optim.create_optimizer_v2(model, name, lr=1e-3, weight_decay=0.05, **kwargs)
    assert type(opt) is cls and type(opt.base_optimizer) is base
    assert {k: opt.variant_options[k] for k in check} == check
    group = opt.param_groups[1]
    assert group["weight_decay"] == 0.05 and group["rho"] == kwargs.get("rho", group["rho"])
    if base is torch.optim.SGD:
        assert group["momentum"] == 0.9 and group["nesterov"] == (name != "intervalsammomentum")
    if cls is sam_fused.ASAM:
        assert group["adaptive"] and group["eta"] == 0.01 and group["rho"] == 0.5
    before = fw.weights(model)
    fw.manual_step(model, opt, [batch], loss_of)
    assert any(not torch.equal(a, b) for a, b in zip(fw.weights(model), before))


def test_native_scaler_is_refused_with_the_fix():
    """timm's NativeScaler takes one pass and calls scaler.step(opt): refused, nothing applied."""
    model, batch = model_and_batch()
    opt = timm.optim.create_optimizer_v2(model, "sam", lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="NativeScaler"):
        timm.utils.NativeScaler(device="cpu")(loss_of(model, batch), opt)
    fw.assert_same([p.detach() for p in model.parameters()], before, "refused")


def test_register_without_timm_names_the_install(monkeypatch):
    for name in ("timm", "timm.optim", "timm.optim._optim_factory"):
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without timm shows
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'sam_fused\[timm\]'") as raised:
        sam_timm.register()
    assert raised.value.name == "timm"
