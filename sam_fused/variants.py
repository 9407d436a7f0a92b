"""The SAM variants: what each one perturbs along, and how.

Every variant in this module follows the two-pass skeleton of ``docs/variants.md``. The
ascent step is written, for every parameter ``p`` of every group, as

    v_p = direction(g_p)                      (the variant's choice; SAM: v = g)
    T_p = |w_p| + eta  if the group is adaptive (ASAM), else 1
    u_p = T_p * v_p                           (what the global norm measures)
    eps_p = rho_group * T_p * u_p / (||u|| + norm_eps)   (normalized variants)
    eps_p = rho_group * T_p * u_p                        (unnormalized: USAM)

with ``||u||`` ONE L2 norm over every parameter that has a gradient, in every group.
Plain SAM is ``v = g, T = 1``; ASAM is SAM with ``adaptive=True``; USAM drops the
normalisation. A new variant is a new :class:`Variant` entry: the reference backend calls
:meth:`Variant.direction`, and the Triton kernels switch on :attr:`Variant.kernel_id`, so
adding one changes a branch, not a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["VARIANTS", "Variant", "get_variant"]


@dataclass(frozen=True)
class Variant:
    """One member of the SAM family.

    Attributes:
        name: the value users pass as ``variant=``.
        normalized: whether the perturbation is divided by the global norm of ``u``.
        kernel_id: the constexpr the Triton kernels switch on to compute ``v``.
        reference: where the variant was published.
    """

    name: str
    normalized: bool
    kernel_id: int
    reference: str

    def direction(self, grad: Tensor) -> Tensor:
        """The ascent direction ``v`` of one parameter, before the ASAM scaling.

        SAM and USAM ascend along the gradient itself.
        """
        if self.kernel_id == 0:
            return grad
        raise NotImplementedError(f"variant {self.name!r} has no direction rule")


VARIANTS: dict[str, Variant] = {
    "sam": Variant("sam", normalized=True, kernel_id=0, reference="Foret et al., ICLR 2021"),
    "usam": Variant(
        "usam", normalized=False, kernel_id=0, reference="Andriushchenko & Flammarion, ICML 2022"
    ),
}


def get_variant(name: str) -> Variant:
    """Look a variant up by name, with an error that lists the valid names."""
    try:
        return VARIANTS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown SAM variant {name!r}; choose one of {sorted(VARIANTS)} "
            "(ASAM is variant='sam' with adaptive=True)"
        ) from None
