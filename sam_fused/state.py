"""``opt.state``: torch.optim's per-parameter state, as a view of what the buckets own.

The buckets are the one owner of optimizer state (``layout.py``): flat buffers or
per-parameter tensors, and the update counts on the device. ``opt.state[p]`` is a live
mapping over them, with torch.optim's keys and semantics:

* ``momentum_buffer`` (SGD), ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``
  (Adam/AdamW) exist once the parameter has been updated (or the entry was written);
  the variant's running state (``vasso_d``, ``fsam_m``, ``looksam_gv``) once the variant
  updated it. Reading returns the stored tensor itself (a view of a flat buffer; ``step``
  a 0-d view of the update count), so in-place changes reach the kernels.
* Writing a value copies it into the storage; deleting a key, ``opt.state[p].clear()``,
  ``del opt.state[p]`` or ``opt.state.clear()`` makes the state fresh (zeros, count 0), so
  the next update initializes it exactly as torch.optim's lazy init would.
* Keys of a base optimizer that sam_fused does not fuse (RMSprop's ``square_avg``, ...)
  are kept as given, in a plain dict per parameter.
* Entries under a key that is not a tensor (``opt.state["ran_hook"] = True``) are kept as
  given, as torch.optim's ``defaultdict(dict)`` keeps them, and saved by ``state_dict()``.

The base optimizer gets a view of the same state without the variant's key, so that its
``len(state) == 0`` lazy initialization still runs when only the variant has state.
Complex parameters show complex state; DTensor (FSDP2) parameters show DTensor state with
the parameter's mesh and placements, as torch.optim keeps them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .layout import Bucket, is_dtensor

if TYPE_CHECKING:
    from .engine import StepEngine

__all__ = ["OptimizerState", "ParamState", "check_entry"]

_BASE, _VARIANT = 0, 1


class ParamState(MutableMapping):
    """One parameter's state (``opt.state[p]``), a live view of its bucket's storage."""

    def __init__(self, engine: StepEngine, bucket: Bucket, index: int, with_variant: bool = True) -> None:
        self._bucket = bucket
        self._index = index
        self._names, self._counts_steps = engine.base_names(bucket)
        self._variant = engine.variant.running_state if with_variant else None

    # ------------------------------------------------------------------ presence
    def _present(self, kind: int) -> bool:
        b, i = self._bucket, self._index
        if b.written[kind][i]:
            return True
        return b.host_counts()[kind][i] > 0

    def _structured(self) -> list[str]:
        keys: list[str] = []
        if self._names and self._present(_BASE):
            keys = (["step"] if self._counts_steps else []) + list(self._names)
        if self._variant is not None and self._present(_VARIANT):
            keys.append(self._variant)
        return keys

    def _kind(self, key: Any) -> int | None:
        if key in self._names or (key == "step" and self._counts_steps and self._names):
            return _BASE
        if key == self._variant and key is not None:
            return _VARIANT
        return None

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, key: Any) -> Any:
        kind = self._kind(key)
        if kind is None:
            return self._bucket.extra[self._index][key]
        if not self._present(kind):
            raise KeyError(key)
        b, i = self._bucket, self._index
        if key == "step":
            return b.steps[i]
        return _to_user(b.params[i], b.state_tensor(key, i))

    def __setitem__(self, key: Any, value: Any) -> None:
        kind = self._kind(key)
        b, i = self._bucket, self._index
        if kind is None:
            b.extra[i][key] = value
        elif key == "step":
            b.steps[i] = float(value)
            b.written[_BASE][i] = 1
            b.counts_set()
        else:
            local = _to_local(b, i, key, value)
            if local.data_ptr() != b.state_tensor(key, i).data_ptr():  # torch re-stores its own view
                b.store_state(key, i, local)
            if not b.written[kind][i]:
                b.written[kind][i] = 1
                if kind == _VARIANT or not self._counts_steps:
                    # an entry without a "step" key exists from now on: its count says "not fresh"
                    counts = b.steps if kind == _BASE else b.vsteps
                    counts[i] = counts[i].clamp(min=1)
                    b.counts_set()

    def __delitem__(self, key: Any) -> None:
        kind = self._kind(key)
        if kind is None:
            del self._bucket.extra[self._index][key]
            return
        if not self._present(kind):
            raise KeyError(key)
        self._reset(kind)

    def _reset(self, kind: int) -> None:
        b, i = self._bucket, self._index
        names = self._names if kind == _BASE else (self._variant,)
        for name in names:
            b.clear_state(name, i)
        (b.steps if kind == _BASE else b.vsteps)[i] = 0.0
        b.written[kind][i] = 0
        b.counts_set()

    def clear(self) -> None:
        self._bucket.extra[self._index].clear()
        if self._names:
            self._reset(_BASE)
        if self._variant is not None:
            self._reset(_VARIANT)

    def __iter__(self) -> Iterator[Any]:
        yield from self._structured()
        yield from list(self._bucket.extra[self._index])

    def __len__(self) -> int:
        return len(self._structured()) + len(self._bucket.extra[self._index])

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def replace(self, entry: Mapping[Any, Any]) -> None:
        """Make this entry exactly ``entry`` (``opt.state[p] = {...}``; a checkpoint's entry)."""
        self.check_entry(entry)
        # copies first: the entry may hold this very storage (opt.state[p] = dict(opt.state[p]),
        # or a state_dict() of this optimizer), which clear() zeroes
        entry = {k: v.clone() if isinstance(v, Tensor) else v for k, v in entry.items()}
        self.clear()
        for key, value in entry.items():
            if key != "step":
                self[key] = value
        if "step" in entry:  # last: writing a tensor entry must not move the count
            self["step"] = entry["step"]

    def check_entry(self, entry: Mapping[Any, Any]) -> None:
        """Refuse an entry that is incomplete or shaped unlike the parameter, before anything changes."""
        check_entry(self._bucket, self._index, entry, self._names, self._counts_steps, self._variant)


def check_entry(
    bucket: Bucket, i: int, entry: Any, names: tuple[str, ...], counts_steps: bool, variant: str | None
) -> None:
    """An entry for parameter ``i`` holds all of the base optimizer's keys or none, a step
    count that is a number, and tensors shaped like the parameter."""
    where = f"the state of parameter {i} of param group {bucket.group_index}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} is a {type(entry).__name__}, not a dict")
    wanted = (["step"] if counts_steps and names else []) + list(names)
    given = [k for k in entry if k in wanted]
    if given and sorted(given) != sorted(wanted):
        raise ValueError(
            f"{where} has {sorted(given)} of the base optimizer's {sorted(wanted)}: all of them or none"
        )
    for key, value in entry.items():
        if key == "step" and "step" in wanted:
            if not (isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1)):
                raise ValueError(f"{where}: 'step' is {value!r}, not a number")
        elif key in wanted or (key == variant and variant is not None):
            _to_local(bucket, i, key, value)


def _to_user(param: Tensor, local: Tensor) -> Tensor:
    """A stored (real, local) state tensor as torch.optim shows it for ``param``."""
    value = torch.view_as_complex(local) if param.is_complex() else local
    if is_dtensor(param):
        from torch.distributed.tensor import DTensor

        value = DTensor.from_local(
            value,
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )
    return value


def _to_local(bucket: Bucket, i: int, key: str, value: Any) -> Tensor:
    """``value`` as the bucket stores state ``key`` of parameter ``i``, or a clear error."""
    if is_dtensor(value):
        value = value.to_local()
    if not isinstance(value, Tensor) or not (value.is_floating_point() or value.is_complex()):
        raise ValueError(
            f"state {key!r} of parameter {i} of param group {bucket.group_index} must be a floating-point "
            f"tensor, got {type(value).__name__}"
        )
    if value.is_complex():
        value = torch.view_as_real(value)
    want = bucket.weight(i).shape
    if value.shape != want:
        raise ValueError(
            f"state {key!r} of parameter {i} of param group {bucket.group_index} has shape "
            f"{tuple(value.shape)}, but the parameter has shape {tuple(want)}"
        )
    return value.to(device=bucket.device)


class OptimizerState(MutableMapping):
    """``opt.state``: parameter -> :class:`ParamState` for the parameters that have state, and
    whatever else a user or a hook keeps there under a key that is not a tensor
    (``opt.state["ran_hook"] = True``), as torch.optim's ``defaultdict(dict)`` keeps it: such
    entries are saved in ``state_dict()["state"]`` under their own key, replaced by a
    checkpoint's on ``load_state_dict()``, and a missing one reads as a new ``{}``. A tensor
    key must be a parameter of this optimizer (a checkpoint could not number another)."""

    def __init__(self, engine: StepEngine, with_variant: bool = True, foreign: dict | None = None) -> None:
        self.engine = engine
        self._with_variant = with_variant
        self.foreign: dict[Any, Any] = {} if foreign is None else foreign  # the non-parameter entries

    def base_view(self) -> OptimizerState:
        """The view the base optimizer gets: no variant key, the same non-parameter entries."""
        return OptimizerState(self.engine, with_variant=False, foreign=self.foreign)

    def _entry(self, param: Any) -> ParamState:
        found = self.engine.locate(param)
        if found is None:
            raise KeyError(
                f"opt.state has no entry for this tensor: it is not a parameter of this optimizer "
                f"(add it with add_param_group() first); got a tensor of shape {tuple(param.shape)}"
            )
        return ParamState(self.engine, *found, with_variant=self._with_variant)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, Tensor):
            return self._entry(key)
        return self.foreign.setdefault(key, {})  # torch.optim's defaultdict(dict)

    def get(self, key: Any, default: Any = None) -> Any:
        if isinstance(key, Tensor):
            return super().get(key, default)
        return self.foreign.get(key, default)  # as dict.get: no entry is made

    def __setitem__(self, key: Any, entry: Any) -> None:
        if isinstance(key, Tensor):
            self._entry(key).replace(entry)
        else:
            self.foreign[key] = entry

    def __delitem__(self, key: Any) -> None:
        if isinstance(key, Tensor):
            self._entry(key).clear()
        else:
            del self.foreign[key]

    def __contains__(self, key: Any) -> bool:
        if not isinstance(key, Tensor):
            return key in self.foreign
        found = self.engine.locate(key)
        return found is not None and len(ParamState(self.engine, *found, with_variant=self._with_variant)) > 0

    def __iter__(self) -> Iterator[Any]:
        for bucket in self.engine.buckets:
            for i, p in enumerate(bucket.params):
                if len(ParamState(self.engine, bucket, i, self._with_variant)):
                    yield p
        yield from list(self.foreign)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def clear(self) -> None:
        for key in list(self):
            if isinstance(key, Tensor):
                self._entry(key).clear()
        self.foreign.clear()

    def __repr__(self) -> str:
        return f"OptimizerState({len(self)} entries)"
