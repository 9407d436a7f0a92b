"""SAM-ON's memory: the bytes of the ``backup`` buffers, SAM versus SAM-ON, on real models.

One SAM step (two passes) of ``resnet18_cifar`` and of the 12 x 768 ``TransformerLM``
(``models.py``), once with every parameter perturbed and once with
``norm_param_groups``; prints the backup bytes each optimizer holds and the parameters'
bytes. Run on the CPU (float32; one small batch)::

    python -m benchmarks.sam_on_memory
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.models import TransformerConfig, TransformerLM, resnet18_cifar
from sam_fused import SAM, norm_param_groups


def backup_bytes(opt: SAM) -> int:
    """The bytes of every ``backup`` buffer the optimizer holds (padding included)."""
    return sum(
        b.storage.buffers["backup"].nbytes for b in opt.engine.buckets if "backup" in b.storage.buffers
    )


def one_step(model: torch.nn.Module, params, loss_fn) -> int:
    opt = SAM(params, torch.optim.SGD, rho=10.0, adaptive=True, lr=0.1, momentum=0.9, backend="foreach")
    loss_fn(model).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model).backward()
    opt.second_step(zero_grad=True)
    return backup_bytes(opt)


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    config = TransformerConfig()
    tokens = torch.randint(0, config.vocab, (1, config.seq))
    cases = {
        "resnet18_cifar": (resnet18_cifar(), lambda m: F.cross_entropy(m(x), y)),
        "transformer 12x768": (TransformerLM(config), lambda m: m(tokens).float().logsumexp(-1).mean()),
    }
    print("| model | parameters MB | norm-layer parameters MB | backup MB, SAM | backup MB, SAM-ON |")
    print("|---|---|---|---|---|")
    for name, (model, loss_fn) in cases.items():
        groups = norm_param_groups(model)
        total = sum(p.nbytes for p in model.parameters())
        norm = sum(p.nbytes for p in groups[0]["params"])
        sam = one_step(model, model.parameters(), loss_fn)
        sam_on = one_step(model, groups, loss_fn)
        mb = lambda n: f"{n / 2**20:.3f}"
        print(f"| {name} | {mb(total)} | {mb(norm)} | {mb(sam)} | {mb(sam_on)} |")


if __name__ == "__main__":
    main()
