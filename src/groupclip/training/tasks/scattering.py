"""ScatterNet features for images: a fixed (data-independent) wavelet scattering transform, computed once.

Tramer & Boneh (2021) showed that DP training of a linear model on scattering features beats end-to-end DP CNNs on
(Fashion-)MNIST. The transform has no trainable or data-fitted parameters, so applying it to each image costs no
privacy: it is a per-sample preprocessing map, like the pixel standardisation with published constants.

The transform is kymatio's 2-D scattering (``J=2``, ``L=8``: 81 channels of 7x7 for a 28x28 image). kymatio 0.3.0's
top-level ``kymatio.torch`` also imports its 3-D frontend, which needs a SciPy function removed in SciPy 1.15, so the
2-D frontend is imported directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..recipe import RecipeError
from ..tensor_cache import cached_tensor, digest

KYMATIO_INSTALL = "pip install kymatio==0.3.0"


def scattering_channels(order2: bool = True, J: int = 2, L: int = 8) -> int:
    """Channels of a ``J``-scale, ``L``-angle scattering of a one-channel image: 1 + J L + L^2 J (J - 1) / 2."""
    return 1 + J * L + (L * L * J * (J - 1) // 2 if order2 else 0)


def scatter(images: Tensor, J: int = 2, L: int = 8, chunk: int = 2000) -> Tensor:
    """Scattering coefficients of ``images`` (``[N, 1, H, W]`` float32) as ``[N, C, H / 2^J, W / 2^J]`` float32.

    Raises:
        RecipeError: kymatio is not installed (names the install command).
    """
    try:
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError as error:
        raise RecipeError(f"ScatterNet features need the kymatio package: {KYMATIO_INSTALL} ({error}).") from error
    transform = ScatteringTorch2D(J=J, shape=tuple(images.shape[-2:]), L=L)
    return torch.cat([transform(images[start : start + chunk]).flatten(1, 2) for start in range(0, len(images), chunk)])


def cached_scatter(images: Tensor, J: int = 2, L: int = 8) -> Tensor:
    """:func:`scatter`, cached on disk by a hash of the images (see :mod:`groupclip.training.tensor_cache`)."""
    name = f"scatter-J{J}-L{L}-{len(images)}-{digest(images.contiguous().numpy().tobytes())}"
    return cached_tensor(name, lambda: scatter(images, J=J, L=L), rows=len(images))
