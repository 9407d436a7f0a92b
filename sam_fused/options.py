"""Validation of SAM's own arguments and param-group keys, and the messages of its refusals.

Numbers are checked where they are set (the constructor, ``add_param_group``) and the
param-group keys again at every step, before anything changes, since schedules and users
edit groups between steps. Python and numpy numbers are numbers; bools and strings are
not, and NaN or infinity never is a valid radius, offset or epsilon.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SAM_KEYS",
    "FrozenOptions",
    "check_bool",
    "check_group",
    "check_params",
    "check_positive",
    "check_rho",
    "group_keys",
    "rho_key",
]

SAM_KEYS = ("rho", "adaptive", "eta", "perturb")  # perturb: SAM-ON (perturb_groups.py)
_INF = math.inf


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_rho(value: Any, where: str, device: torch.device | None = None) -> None:
    """A radius: a finite number >= 0, or a one-element tensor (a device-resident schedule)."""
    if isinstance(value, Tensor):
        check_tensor_scalar(value, where, None, device)
        if value.device.type == "cpu" and not (math.isfinite(float(value)) and float(value) >= 0):
            raise ValueError(f"{where} must be a finite non-negative number, got {value!r}")
        return
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{where} must be a finite non-negative number, got {value!r}")


def check_eta(value: Any, where: str) -> None:
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{where} (ASAM's offset) must be a finite non-negative number, got {value!r}")


def check_bool(value: Any, where: str) -> None:
    # numpy's bool is a bool; a string such as "no" is not (it would read as True)
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool) or numpy_bool):
        raise TypeError(f"{where} must be True or False, got {value!r}")


def check_positive(value: Any, where: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not (_is_number(value) and 0 < value < math.inf):
        raise ValueError(
            f"{where} must be a positive finite number{' or None' if allow_none else ''}, got {value!r}"
        )


def check_tensor_scalar(value: Any, name: str, index: int | None, device: torch.device | None) -> None:
    """A hyperparameter tensor holds one value, on the parameters' device or the CPU."""
    if not isinstance(value, Tensor):
        return
    where = name if index is None else f"param_groups[{index}][{name!r}]"
    if value.numel() != 1:
        raise ValueError(
            f"{where} is a tensor of shape {tuple(value.shape)}; a hyperparameter tensor holds one "
            "value: set a number or a one-element tensor"
        )
    if device is not None and value.device not in (device, torch.device("cpu")):
        raise ValueError(f"{where} is on {value.device}, the parameters on {device}")


def group_keys(base_defaults: Mapping[str, Any]) -> dict[str, str]:
    """SAM's param-group keys: its own names, or ``sam_<name>`` where the base optimizer has
    an option of the same name (``torch.optim.Adadelta``'s ``rho`` is its decay rate)."""
    return {name: f"sam_{name}" if name in base_defaults else name for name in SAM_KEYS}


def rho_key(optimizer: Any) -> str:
    """The param-group key of SAM's radius in ``optimizer`` (``sam_rho`` beside Adadelta)."""
    engine = getattr(optimizer, "engine", None)
    return "rho" if engine is None else engine.keys["rho"]


def check_group(
    group: dict[str, Any], keys: Mapping[str, str], index: int, device: torch.device | None
) -> None:
    """SAM's keys of one param group (run at every step: cheap)."""
    rho, adaptive, eta = group[keys["rho"]], group[keys["adaptive"]], group[keys["eta"]]
    perturb = group[keys["perturb"]]
    # the common case in a few comparisons; anything else takes the full checks below
    if (
        type(rho) is float
        and type(eta) is float
        and type(adaptive) is bool
        and type(perturb) is bool
        and 0 <= rho < _INF
        and 0 <= eta < _INF
    ):
        return
    where = f"param_groups[{index}]"
    check_rho(rho, f"{where}[{keys['rho']!r}]", device)
    check_bool(adaptive, f"{where}[{keys['adaptive']!r}]")
    check_eta(eta, f"{where}[{keys['eta']!r}]")
    check_bool(perturb, f"{where}[{keys['perturb']!r}] (whether SAM perturbs the group)")


def check_params(params: list[Tensor], index: int) -> None:
    seen: set[int] = set()
    for i, p in enumerate(params):
        where = f"parameter {i} of param group {index}"
        if not isinstance(p, Tensor):
            raise TypeError(f"{where} is a {type(p).__name__}, not a tensor")
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(
                f"{where} has dtype {p.dtype}; SAM optimizes floating-point (or complex) parameters only"
            )
        if p.is_sparse:
            raise TypeError(f"{where} is a sparse tensor; SAM needs dense parameters")
        if id(p) in seen:
            raise ValueError(
                f"{where} appears twice in the same param group (torch.optim warns; sam_fused refuses, since "
                "its buffers hold each parameter once)"
            )
        seen.add(id(p))


def several_devices(devices: set[torch.device]) -> str:
    names = ", ".join(sorted(str(d) for d in devices))
    return (
        f"the parameters are on several devices ({names}); one SAM optimizer needs them on "
        "one device, since its global gradient norm is reduced there. Build one optimizer "
        "per device, or move the model first."
    )


def groups_changed(what: str) -> str:
    return (
        f"{what} after the optimizer was built: sam_fused lays its buffers out once, so an edited "
        "parameter list would silently train the old one. Add parameters with add_param_group(), "
        "or build a new optimizer (state_dict() and load_state_dict() carry the state over)."
    )


def no_closure() -> str:
    return (
        "SAM.step() needs a closure that runs forward and backward and returns the loss (it is "
        "called once per pass), or a first_step() before it; or call first_step() and "
        "second_step(). A training framework that calls step() once after a single backward pass "
        "would run only one pass, which is not SAM: with Lightning add "
        "sam_fused.integrations.lightning.SAMCallback() to the Trainer's callbacks; with the "
        "Hugging Face Trainer use sam_fused.integrations.transformers.SAMTrainer; with accelerate "
        "use sam_fused.integrations.accelerate.SAMBackward; with timm's NativeScaler write the "
        "two-pass loop (README, Frameworks)."
    )


def mid_step_closure() -> str:
    return MID_STEP.format(what="step(closure)") + (
        " With Lightning's manual optimization (self.optimizers().step() after first_step()), "
        "add sam_fused.integrations.lightning.SAMCallback() to the Trainer's callbacks: then "
        "opt.step() finishes the step."
    )


MID_STEP = (
    "{what} between first_step() and second_step() is not allowed: the weights are perturbed. "
    "Finish the step with second_step() (or abandon it with abort_step()) first."
)


class ParamList(list):
    """A param group's parameter list that notices edits: sam_fused lays its buffers out once,
    so a parameter appended, removed or replaced later is refused at the next step."""

    edited = False

    def _edited(self, result: Any) -> Any:
        self.edited = True
        return result

    def __reduce__(self) -> tuple:
        # copies and pickles rebuild the list whole (appending item by item would mark it)
        return (_param_list, (list(self), self.edited))


def _param_list(items: list, edited: bool) -> ParamList:
    rebuilt = ParamList(items)
    rebuilt.edited = edited
    return rebuilt


for _name in ("append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse"):
    setattr(
        ParamList,
        _name,
        (lambda name: lambda self, *a, **k: self._edited(getattr(list, name)(self, *a, **k)))(_name),
    )
for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__"):
    setattr(
        ParamList,
        _name,
        (lambda name: lambda self, *a: self._edited(getattr(list, name)(self, *a)))(_name),
    )


class FrozenOptions(Mapping):
    """A variant's options, fixed when the optimizer is built (so they are checked once)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError(
            "a variant's options are fixed when the optimizer is built (they are validated then); "
            "build a new optimizer with the new value (state_dict()/load_state_dict() carry the state over)"
        )

    def __repr__(self) -> str:
        return repr(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    __hash__ = None  # type: ignore[assignment]
