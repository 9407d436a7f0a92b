"""The four parameter sets of the published SAM-step timings (benchmarks/README.md), as tensor shapes.

The shapes are generated from the architectures (no torchvision or timm needed), so the
benchmark sees the real mix of tensor sizes: what a per-parameter loop pays per tensor and
what a flat-buffer kernel pays per element both depend on it.

``full_sets()`` are the GPU sizes; ``cpu_sets()`` keep the tensor counts but divide the
dimensions so that a CPU run of every backend over all four sets takes about a minute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Shape = tuple[int, ...]

__all__ = [
    "SET_NAMES",
    "ParamSet",
    "cpu_sets",
    "full_sets",
    "many_small_shapes",
    "one_large_shapes",
    "resnet50_shapes",
    "scale_shapes",
    "select",
    "vit_b16_shapes",
]


@dataclass(frozen=True)
class ParamSet:
    """A named list of parameter shapes."""

    name: str  # the key used on the command line
    label: str  # the name benchmarks/README.md uses
    shapes: tuple[Shape, ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def count(self) -> int:
        return len(self.shapes)

    def describe(self) -> str:
        return f"{self.label}: {self.count} tensors, {self.numel / 1e6:.2f} M elements"


def resnet50_shapes(num_classes: int = 1000) -> list[Shape]:
    """ResNet-50's parameters in ``model.parameters()`` order: convs (no bias), BN w/b, fc."""
    shapes: list[Shape] = []

    def conv_bn(out_ch: int, in_ch: int, k: int) -> None:
        shapes.append((out_ch, in_ch, k, k))
        shapes.extend([(out_ch,), (out_ch,)])  # BatchNorm weight, bias

    expansion = 4
    conv_bn(64, 3, 7)  # stem
    in_ch = 64
    for blocks, width in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        for b in range(blocks):
            conv_bn(width, in_ch, 1)
            conv_bn(width, width, 3)
            conv_bn(width * expansion, width, 1)
            if b == 0:  # the projection shortcut of each stage's first block
                conv_bn(width * expansion, in_ch, 1)
            in_ch = width * expansion
    shapes.extend([(num_classes, in_ch), (num_classes,)])
    return shapes


def vit_b16_shapes(num_classes: int = 1000, image: int = 224, patch: int = 16) -> list[Shape]:
    """ViT-B/16's parameters (timm order): tokens, patch embedding, 12 blocks, norm, head."""
    dim, depth, mlp = 768, 12, 3072
    tokens = (image // patch) ** 2 + 1
    shapes: list[Shape] = [(1, 1, dim), (1, tokens, dim), (dim, 3, patch, patch), (dim,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,)]  # norm1
        shapes += [(3 * dim, dim), (3 * dim,)]  # qkv
        shapes += [(dim, dim), (dim,)]  # attention projection
        shapes += [(dim,), (dim,)]  # norm2
        shapes += [(mlp, dim), (mlp,)]  # fc1
        shapes += [(dim, mlp), (dim,)]  # fc2
    shapes += [(dim,), (dim,), (num_classes, dim), (num_classes,)]  # final norm, head
    return shapes


def many_small_shapes(count: int = 2000, size: int = 4096) -> list[Shape]:
    """Many equal small tensors: the case where per-tensor host work dominates."""
    return [(size,)] * count


def one_large_shapes(size: int = 134_217_728) -> list[Shape]:
    """One large tensor: the case where only memory bandwidth matters."""
    return [(size,)]


def scale_shapes(shapes: list[Shape], div: int) -> list[Shape]:
    """Divide every dimension larger than ``div`` by ``div``; small dims (3, 7x7) stay.

    Tensor counts and ranks are unchanged, so the per-tensor costs keep their weight.
    """
    return [tuple(d // div if d > div else d for d in s) for s in shapes]


def full_sets() -> list[ParamSet]:
    """The four sets at the sizes of the published timings (benchmarks/README.md)."""
    return [
        ParamSet("resnet50", "ResNet-50", tuple(resnet50_shapes())),
        ParamSet("vit_b16", "ViT-B/16", tuple(vit_b16_shapes())),
        ParamSet("2000x4096", "2000 x 4096", tuple(many_small_shapes())),
        ParamSet("one_134m", "one 134M tensor", tuple(one_large_shapes())),
    ]


# per-set divisors for CPU runs: each set lands between about 0.25 M and 2 M elements
_CPU_DIV = {"resnet50": 4, "vit_b16": 8, "2000x4096": 16, "one_134m": 64}


def cpu_sets(extra_div: int = 1) -> list[ParamSet]:
    """The four sets scaled down for CPU runs; ``extra_div`` shrinks them further (--quick)."""
    sets = []
    for s in full_sets():
        div = _CPU_DIV[s.name] * extra_div
        sets.append(ParamSet(s.name, f"{s.label} /{div}", tuple(scale_shapes(list(s.shapes), div))))
    return sets


SET_NAMES = tuple(s.name for s in full_sets())
_ALIASES = {
    "resnet": "resnet50",
    "resnet-50": "resnet50",
    "vit": "vit_b16",
    "vit-b/16": "vit_b16",
    "vitb16": "vit_b16",
    "many": "2000x4096",
    "2000": "2000x4096",
    "one": "one_134m",
    "134m": "one_134m",
    "one134m": "one_134m",
}


def select(sets: list[ParamSet], names: str | None) -> list[ParamSet]:
    """The sets named in a comma-separated list (aliases allowed), in the given order."""
    if not names or names == "all":
        return sets
    by_name = {s.name: s for s in sets}
    chosen = []
    for raw in names.split(","):
        key = raw.strip().lower()
        key = _ALIASES.get(key, key)
        if key not in by_name:
            raise ValueError(f"unknown parameter set {raw!r}; choose from {', '.join(SET_NAMES)}")
        chosen.append(by_name[key])
    return chosen


if __name__ == "__main__":
    for s in full_sets() + cpu_sets():
        print(s.describe())
