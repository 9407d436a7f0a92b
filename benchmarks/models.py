"""The two models of the end-to-end benchmark (``bench_e2e.py``), defined here in plain PyTorch.

* :func:`resnet18_cifar`: ResNet-18 for 32x32 inputs as CIFAR training code usually builds
  it: a 3x3 stride-1 stem without max-pooling, four stages of two basic blocks (64, 128,
  256, 512 channels; stride 2 from the second stage), global average pooling, a 10-way
  linear head. 11.17 M parameters, 62 tensors.
* :class:`TransformerLM`: a 12-layer pre-norm transformer encoder, 768 wide, 12 heads, MLP
  3072 (GELU), learned positions, over sequences of 128 tokens from a 32000-token
  vocabulary, with an untied linear head that predicts a token at every position. The
  loss is token-level cross-entropy over the vocabulary (language-model style rather than
  a classification head, so the 24.6 M-parameter head and the 32000-wide softmax are part
  of the cost); attention is bidirectional, so the benchmark's next-token targets are
  a cost stand-in, not a language model. 134.3 M parameters (85 M in the layers, 24.6 M
  each in the embedding and the head), 150 tensors. Attention is
  ``F.scaled_dot_product_attention``, so the flash kernels run under bf16 autocast on a GPU.

No dropout anywhere: a random mask would make the two SAM passes see different networks
(that is a training choice, not a cost), and it keeps CUDA-graph capture free of RNG state.
``tiny=True`` variants keep the structure and shrink widths and depth, for CPU smoke runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNetCifar", "TransformerConfig", "TransformerLM", "resnet18_cifar"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """A ResNet of basic blocks with the CIFAR stem (3x3, stride 1, no max-pool)."""

    def __init__(self, blocks: tuple[int, ...], width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages = []
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                stages.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18_cifar(num_classes: int = 10, tiny: bool = False) -> ResNetCifar:
    """ResNet-18 for 32x32 inputs; ``tiny``: width 8 and one block per stage."""
    if tiny:
        return ResNetCifar((1, 1, 1, 1), width=8, num_classes=num_classes)
    return ResNetCifar((2, 2, 2, 2), width=64, num_classes=num_classes)


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of :class:`TransformerLM`; the defaults are the benchmark's 12 x 768 encoder."""

    vocab: int = 32000
    seq: int = 128
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072

    @classmethod
    def tiny(cls) -> TransformerConfig:
        return cls(vocab=128, seq=16, width=32, layers=2, heads=2, mlp=64)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and MLP, each with a residual."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # (b, heads, t, head_dim)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TransformerLM(nn.Module):
    """Token embedding + learned positions, ``layers`` encoder layers, final norm, vocabulary head."""

    def __init__(self, cfg: TransformerConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or TransformerConfig()
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Parameter(torch.zeros(1, cfg.seq, cfg.width).normal_(0, 0.02))
        self.layers = nn.Sequential(*(EncoderLayer(cfg) for _ in range(cfg.layers)))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits of shape (batch * seq, vocab), flattened for ``F.cross_entropy``."""
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        logits = self.head(self.norm(self.layers(x)))
        return logits.flatten(0, 1)
