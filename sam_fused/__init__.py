"""sam_fused: Sharpness-Aware Minimization with fused Triton kernels.

>>> from sam_fused import SAM
>>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
"""

from . import family
from .aesam import AESAM
from .backends import available_backends
from .batchnorm import frozen_bn_stats
from .family import *  # noqa: F403  (one class per variant: family.__all__)
from .lion import Lion
from .msam import MSAM
from .norm_groups import norm_param_groups
from .optimizer import SAM
from .variants import VARIANTS, Variant

__all__ = [
    *family.__all__,
    "AESAM",
    "SAM",
    "Lion",
    "MSAM",
    "VARIANTS",
    "Variant",
    "__version__",
    "available_backends",
    "frozen_bn_stats",
    "norm_param_groups",
]
__version__ = "0.1.0"
