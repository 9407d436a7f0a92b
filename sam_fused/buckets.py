"""The optimizer's parameters as buckets: laying them out, following them, restoring them.

:class:`Buckets` holds the param groups as they were laid out and the buckets made from
them (``grouping.lay_out``: one per group, real dtype, alias layer and kind). It owns what
concerns the layout as a whole, as opposed to one step's flow (``engine.py``):

* ``adopt``: new param groups become buckets (the constructor, ``add_param_group``);
* ``plans``: every bucket's validated plan for a pass; parameters that moved are followed,
  and parameters cast, moved to another device or come to share memory anew make the
  buckets be laid out again (``relayout``), with their state converted as
  ``load_state_dict`` converts a checkpoint's;
* ``restore``: ``w <- backup`` in reverse bucket order, so that memory several parameters
  share gets back exactly the value it had before the step (``docs/design.md``,
  "Parameters that share memory").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from . import grouping, options
from .backends import get_backend
from .base_updates import REGISTRY
from .layout import Bucket, LayoutError, Plan
from .sharding import shard_group
from .variants import Variant

__all__ = ["Buckets"]


class Buckets:
    """The buckets of one optimizer, in layer order (see the module's docstring).

    ``owner`` is the SAM front end: its ``defaults``, ``param_groups`` and base optimizer
    class are read where a group is laid out.
    """

    def __init__(self, owner: Any, variant: Variant, keys: Mapping[str, str], request: str) -> None:
        self.owner = owner
        self.variant = variant
        self.keys = keys
        self.request = request  # the backend= argument
        self.items: list[Bucket] = []
        self.groups: list[dict] = []  # the groups as laid out (their params: ParamLists)
        self.device = torch.device("cpu")
        self.process_group: Any = None
        self._index()

    def __iter__(self) -> Iterator[Bucket]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def _index(self) -> None:
        self._where = {id(p): (b, i) for b in self.items for i, p in enumerate(b.params)}
        self._partials: dict[tuple, tuple[list[Tensor], Tensor, Tensor]] = {}

    def _changed(self) -> None:
        """The buckets changed: the device and the shard group follow them."""
        if self.items:
            self.device = self.items[0].device
        self.process_group = shard_group(p for b in self.items for p in b.params)
        self._index()

    # ------------------------------------------------------------------ building
    def adopt(self, groups: list[dict], start: int) -> None:
        """Take ``groups`` (numbered from ``start``) into the layout: SAM's keys default and are
        checked, the groups are laid out, and only then (nothing refused) buckets are made."""
        for index, group in enumerate(groups, start):
            for key in self.keys.values():
                group.setdefault(key, self.owner.defaults[key])
            options.check_group(group, self.keys, index, self.device if self.items else None)
        known = [p for b in self.items for p in b.params]
        base = type(self.owner.base_optimizer)
        laid_out = grouping.lay_out(groups, start, known, base, self.variant, self.request)
        # ---- validated: from here on the optimizer changes (the parameters never move)
        self.items += [Bucket(params, i, backend, layer) for params, i, backend, layer in laid_out]
        # buckets of parameters that share memory with earlier ones come later: perturbed in
        # this order, restored in reverse
        self.items.sort(key=lambda b: b.layer)
        for group in groups:
            group["params"] = options.ParamList(group["params"])
        self.groups.extend(groups)
        self._changed()

    def relayout(self) -> None:
        """Lay the buckets out again from the param groups as the parameters are now (cast,
        moved to another device, sharing memory anew), keeping every parameter's state,
        converted to its dtype and device as ``load_state_dict`` converts a checkpoint's."""
        kept = {id(p): b.export_state(i) for b in self.items for i, p in enumerate(b.params)}
        base = type(self.owner.base_optimizer)
        laid_out = grouping.lay_out(self.groups, 0, [], base, self.variant, self.request)
        # ---- validated: the new buckets replace the old
        buckets = [Bucket(params, i, backend, layer) for params, i, backend, layer in laid_out]
        buckets.sort(key=lambda b: b.layer)
        for bucket in buckets:
            for i, p in enumerate(bucket.params):
                bucket.import_state(i, kept[id(p)])
        self.items = buckets
        self._changed()

    # ------------------------------------------------------------------ lookups
    def locate(self, param: Any) -> tuple[Bucket, int] | None:
        """The bucket and index of ``param`` (None: not one of this optimizer's parameters)."""
        found = self._where.get(id(param))
        return found if found is not None and found[0].params[found[1]] is param else None

    def base_names(self, bucket: Bucket) -> tuple[tuple[str, ...], bool]:
        """The base optimizer's state names for the bucket's group, and whether it counts steps."""
        spec = REGISTRY.get(type(self.owner.base_optimizer))
        if spec is None:
            return (), False
        return spec.names_for_group(self.owner.param_groups[bucket.group_index]), spec.counts_steps

    # ------------------------------------------------------------------ passes
    def plans(self, idle: bool, grads: bool = True) -> list[Plan]:
        """Every bucket's plan for this pass (validated: a refusal raises, nothing changed);
        ``grads=False``: the parameters only, no plan (RSAM's noise, before the first pass).

        Parameters that moved keep their buckets (the tables follow them) unless they now
        share memory differently; parameters cast or moved to another device keep their
        shapes: either way, while no step is in flight (``idle``), the buckets are laid out
        again and the state converted (:meth:`relayout`)."""

        def pass_() -> list[Plan]:
            if grads:
                return [bucket.plan() for bucket in self.items]
            for bucket in self.items:
                bucket.follow()
            return []

        try:
            plans = pass_()
        except LayoutError as exc:
            if not (exc.convertible and idle):
                raise
            self.relayout()
            return pass_()
        if any(bucket.moved for bucket in self.items):
            for bucket in self.items:
                bucket.moved = False
            params = [p for group in self.groups for p in group["params"]]
            if grouping.layers_of(params) != [self.locate(p)[0].layer for p in params]:
                if not idle:
                    raise LayoutError(
                        "parameters came to share memory differently between first_step() and "
                        "second_step() (p.data = other.data); abort_step() and step again"
                    )
                self.relayout()
                plans = pass_()
        return plans

    def restore(self, plans: list[Plan | None], aliases_only: bool = False) -> None:
        """``w <- backup`` for the given buckets' plans (None: every parameter), in reverse
        bucket order, so that memory several parameters share gets back the value it had
        before the step (the earliest layer's backup is written last). ``aliases_only``: the
        buckets of layers above 0 only (layer 0 restores fused with its update)."""
        for bucket, plan in reversed(list(zip(self.items, plans))):
            if (plan is None or not plan.empty) and not (aliases_only and bucket.layer == 0):
                bucket.backend.restore(bucket, plan)

    def restore_each(self, plans: list[Plan | None]) -> None:
        """``w <- backup`` parameter by parameter, converting (a parameter cast mid-step)."""
        for bucket, plan in reversed(list(zip(self.items, plans))):
            indices = range(len(bucket.params)) if plan is None else plan.indices
            for i in reversed(indices):
                bucket.weight(i).copy_(bucket.state_tensor("backup", i))

    def sum_partials(
        self, plans: list[Plan], fill: Callable[[Bucket, Plan, Tensor], None], status: Tensor, entries: slice
    ) -> None:
        """Each bucket writes its partial sums (``fill``) into its slice of one buffer; their sums
        land in ``status[entries]``, added up over the ranks' shards under FSDP2. The order is
        fixed by the lengths alone, so the result is bitwise reproducible."""
        taking = [(b, p, b.backend.partial_slots(b, p)) for b, p in zip(self.items, plans) if not p.empty]
        # the partial sums' buffer and its views, kept per shape: a step slices no tensor
        key = (tuple(n for _, _, n in taking), entries.start, entries.stop, id(status))
        held = self._partials.get(key)
        if held is None:
            if len(self._partials) > 8:
                self._partials.clear()
            partials = torch.zeros(4, sum(key[0]), dtype=status.dtype, device=status.device)
            starts = [sum(key[0][:k]) for k in range(len(key[0]))]
            slices = [partials[:, a : a + n] for a, n in zip(starts, key[0])]
            held = self._partials[key] = (slices, partials[: entries.stop - entries.start], status[entries])
        slices, summed, out = held
        for (bucket, plan, _), part in zip(taking, slices):
            fill(bucket, plan, part)
        torch.sum(summed, dim=1, out=out)
        if self.process_group is not None:
            torch.distributed.all_reduce(out, group=self.process_group)

    def gradients(self) -> list[Tensor]:
        """Every parameter's current gradient (local shards), where it has one."""
        return [g for b in self.items for g in map(b.grad, range(len(b.params))) if g is not None]

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_where"], state["_partials"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for bucket in self.items:  # a backend travels by name: this process's object of it
            bucket.backend = get_backend(bucket.backend)
        self._index()
