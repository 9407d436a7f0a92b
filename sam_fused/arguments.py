"""SAM's constructor arguments, and the settings fixed (or checked) when they are set.

``options.py`` holds the checks of single values and param-group keys, which every layer
uses; what needs the variants and the backends by name (the variant and backend arguments,
which settings a variant refuses) is here, above them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import options
from .backends import BACKEND_NAMES
from .options import FrozenOptions
from .variants import Descent, get_variant

__all__ = ["Fixed", "MaxGradNorm", "check_arguments", "check_clipping"]


def check_arguments(
    variant: Any,
    variant_options: Mapping[str, Any] | None,
    rho: Any,
    adaptive: Any,
    eta: Any,
    norm_eps: Any,
    skip_nonfinite: Any,
    max_grad_norm: Any,
    backend: Any,
) -> tuple[Any, FrozenOptions]:
    """SAM's own constructor arguments; returns the variant and its resolved options."""
    found = get_variant(variant)
    resolved = FrozenOptions(found.resolve_options(dict(variant_options or {})))
    options.check_rho(rho, "rho")
    options.check_bool(adaptive, "adaptive")
    options.check_eta(eta, "eta")
    options.check_positive(norm_eps, "norm_eps")
    options.check_bool(skip_nonfinite, "skip_nonfinite")
    options.check_positive(max_grad_norm, "max_grad_norm", allow_none=True)
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
    check_clipping(found, max_grad_norm)
    return found, resolved


class Fixed:
    """A setting fixed when the optimizer is built (validated once): readable, not settable."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, cls: type) -> Any:
        return self if obj is None else getattr(obj.engine, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(
            f"SAM.{self.name} is fixed when the optimizer is built; build a new optimizer with the "
            "new value (state_dict() and load_state_dict() carry the state over)"
        )


class MaxGradNorm(Fixed):
    """``max_grad_norm``: settable (frameworks hand their clipping value over), checked."""

    def __set__(self, obj: Any, value: Any) -> None:
        engine = obj.engine
        options.check_positive(value, "max_grad_norm", allow_none=True)
        check_clipping(engine.variant, value)
        engine.max_grad_norm = None if value is None else float(value)
        engine.contexts_changed()


def check_clipping(variant: Any, max_grad_norm: Any) -> None:
    if max_grad_norm is not None and variant.descent == Descent.LOOKSAM_FULL:
        raise ValueError(
            "max_grad_norm is not available with LookSAM: the norm of its reuse steps' descent "
            "gradient g + alpha (||g|| / ||g_v||) g_v is not computed"
        )
