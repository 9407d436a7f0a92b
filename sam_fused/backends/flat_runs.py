"""A plan's parameters as slices of the bucket's flat buffers (the foreach backend's unit).

What a bucket owns (gradients, backup, optimizer state, scratch) lives in one flat buffer
per role, parameter ``i`` at ``[offsets[i], offsets[i] + padded numel)`` (``storage.py``),
consecutive parameters next to each other. The parameters a plan takes part with therefore
cover a few *segments*, maximal runs of consecutive indices, each one slice ``[lo, hi)`` of
every buffer: one segment for the usual plan, where every parameter has a gradient. The
foreach backend runs its elementwise math on those slices as a few large tensor operations
and touches the parameters themselves only through ``torch._foreach_*`` over lists of them.

The padding between parameters (at most 15 elements) is zeros in every buffer, and the
math keeps zeros at zero (every variant's direction and every base update maps zero
gradient, weight and state to zero), so it stays harmless. Quantities per parameter (update
counts) are per element only where the math needs them (:meth:`FlatRun.counts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..elementwise import PerTensor
from ..placement import dense_view
from ..storage import ALIGN, Storage

__all__ = ["FlatRun", "Segment"]


@dataclass
class Segment:
    """Consecutive parameters ``first .. stop - 1`` of a bucket: one slice of every buffer."""

    first: int
    stop: int
    slots: slice  # the same parameters' positions in the plan's (or run's) lists
    lo: int  # element range in every flat buffer
    hi: int
    starts: list[int]  # each parameter's offset, relative to lo
    repeats: Tensor | None = None  # each parameter's padded length, on the device (built lazily)
    views: dict[str, list[Tensor]] = field(default_factory=dict)  # per role (built lazily)

    @property
    def size(self) -> int:
        return self.hi - self.lo


class FlatRun:
    """The segments of a plan (parameters ``indices`` of a bucket's storage)."""

    def __init__(self, storage: Storage, indices: tuple[int, ...]) -> None:
        self.storage = storage
        self.segments: list[Segment] = []
        position = 0
        while position < len(indices):
            end = position + 1
            while end < len(indices) and indices[end] == indices[end - 1] + 1:
                end += 1
            first, stop = indices[position], indices[end - 1] + 1
            lo = storage.offsets[first]
            hi = storage.offsets[stop - 1] + _padded(storage.numels[stop - 1])
            starts = [storage.offsets[i] - lo for i in range(first, stop)]
            self.segments.append(Segment(first, stop, slice(position, end), lo, hi, starts))
            position = end

    def buffer(self, role: str, segment: Segment) -> Tensor:
        """The segment's slice of the flat buffer of ``role``."""
        return self.storage.buffer(role)[segment.lo : segment.hi]

    def views(self, role: str, segment: Segment) -> list[Tensor]:
        """The segment's parameters' views of ``role``, shaped like them (cached)."""
        views = segment.views.get(role)
        if views is None:
            views = segment.views[role] = self.storage.views(role, range(segment.first, segment.stop))
        return views

    def views_of(self, flat: Tensor, segment: Segment) -> list[Tensor]:
        """Views of a tensor laid out like the segment's slice (a result of the flat math),
        one per parameter, shaped like the parameters' views of the buffers."""
        like = self.storage.like
        return [
            dense_view(flat, start, like[i])
            for i, start in zip(range(segment.first, segment.stop), segment.starts)
        ]

    def counts(self, counts: Tensor, segment: Segment, host: bool) -> list[tuple[int, int, object]]:
        """The segment cut into runs ``(lo, hi, count)`` (element ranges relative to the
        segment) over which the math sees one update count: on the host (``host``), runs of
        parameters with equal counts, each count an int (usually one run: every parameter
        is updated every step); otherwise one run whose count is a :class:`PerTensor`,
        expanded per element on the device, with no synchronisation."""
        values = counts[segment.first : segment.stop]
        if not host:
            if segment.repeats is None:
                ends = [*segment.starts[1:], segment.size]
                lengths = [end - start for start, end in zip(segment.starts, ends)]
                segment.repeats = torch.tensor(lengths, dtype=torch.int64).to(counts.device)
            return [(0, segment.size, PerTensor(values, segment.repeats, segment.size))]
        found, lengths = torch.unique_consecutive(values, return_counts=True)
        runs = []
        param = 0
        for count, length in zip(found.tolist(), lengths.tolist()):
            stop = param + length
            hi = segment.starts[stop] if stop < len(segment.starts) else segment.size
            runs.append((segment.starts[param], hi, int(count)))
            param = stop
        return runs


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
