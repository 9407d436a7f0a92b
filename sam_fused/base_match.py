"""Was a checkpoint's param group saved by this base optimizer? Checked before it is loaded.

A torch.optim checkpoint does not name its optimizer, and ``torch.optim``'s own
``load_state_dict`` takes another optimizer's groups without a word: an SGD checkpoint
loaded into Adam fails at the next step with ``KeyError: 'betas'``, and for SAM that is
between the passes, with the weights perturbed. So a saved group must hold every option of
this base optimizer that the base optimizer's own ``__setstate__`` does not fill in (it
fills the options torch added in later releases, such as ``foreach`` or ``maximize``, so
checkpoints of older releases load). A group that lacks one was saved by another optimizer:
refused, naming the optimizer its options point to.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

__all__ = ["check_saved_group"]

# the torch.optim classes a checkpoint may come from, by name (those this torch has)
_TORCH_OPTIMIZERS = (
    "SGD",
    "Adam",
    "AdamW",
    "Adadelta",
    "Adagrad",
    "Adamax",
    "ASGD",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "Adafactor",
    "LBFGS",
    "SparseAdam",
    "Muon",
)


def _filled_by_setstate(cls: type, defaults: dict[str, Any], group: dict[str, Any]) -> set[str]:
    """The keys ``group`` has once ``cls.__setstate__`` (its defaults for older checkpoints)
    has run on a copy of it."""
    scratch = cls.__new__(cls)
    copy = {k: v for k, v in group.items() if k != "params"}
    try:
        scratch.__setstate__(
            {"defaults": dict(defaults), "state": {}, "param_groups": [{**copy, "params": []}]}
        )
    except Exception:  # a class whose __setstate__ needs more: take the group as it is
        return set(copy)
    return set(scratch.param_groups[0])


def _required(cls: type, defaults: dict[str, Any], sam_keys: frozenset[str]) -> set[str]:
    """The options a group of ``cls`` must hold: its defaults' keys that its __setstate__ does
    not fill in (and not SAM's own keys, which take this optimizer's defaults)."""
    return set(defaults) - _filled_by_setstate(cls, defaults, {}) - sam_keys


@cache
def _torch_defaults() -> dict[str, tuple[type, dict[str, Any]]]:
    found = {}
    for name in _TORCH_OPTIMIZERS:
        cls = getattr(torch.optim, name, None)
        if cls is None:
            continue
        try:
            found[name] = (cls, dict(cls([torch.zeros(2, 2, requires_grad=True)]).defaults))
        except Exception:  # an optimizer that needs arguments: not guessed
            continue
    return found


def _saved_by(keys: set[str]) -> str:
    """The torch.optim class(es) a group with these keys looks saved by, best matches first."""
    fits = []
    for name, (cls, defaults) in _torch_defaults().items():
        if _required(cls, defaults, frozenset()) <= keys:
            fits.append((len(keys & set(defaults)), name))
    if not fits:
        return "an optimizer other than torch.optim's"
    best = max(score for score, _ in fits)
    names = [f"torch.optim.{name}" for score, name in fits if score == best]
    return " or ".join(names)


def check_saved_group(
    base: torch.optim.Optimizer, sam_keys: set[str], group: dict[str, Any], index: int
) -> None:
    """Refuse a saved param group that another optimizer than ``base``'s class saved."""
    cls = type(base)
    missing = sorted(
        _required(cls, base.defaults, frozenset(sam_keys)) - _filled_by_setstate(cls, base.defaults, group)
    )
    if not missing:
        return
    saved_by = _saved_by(set(group) - {"params", "param_names"})
    raise ValueError(
        f"the checkpoint's param group {index} was saved by another optimizer ({saved_by}, by its "
        f"options): it has no {', '.join(map(repr, missing))}, which torch.optim.{cls.__name__}, this "
        f"SAM's base optimizer, needs. Load it into SAM(params, <that optimizer>, ...), or load only "
        f"the model's weights and let the base optimizer start fresh. Nothing was changed."
    )
