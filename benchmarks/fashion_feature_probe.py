"""Which fixed features to train a DP linear model on for Fashion-MNIST: non-private linear probes, training set only.

Each candidate feature map is applied to the first 5,000 training images and the last 2,000 (never the test set),
normalised per sample as the models do (GroupNorm without parameters: 27 groups for the ScatterNet coefficients,
one for an EfficientNet block), and a multinomial logistic regression (L-BFGS, L2 1e-4) is fitted on the 5,000 and
scored on the 2,000. No privacy is involved: this only ranks the maps that the DP search
(benchmarks/studies/fashion_scatter_efficientnet_search.toml) then compares with DP-SGD on a held-out split.

    python benchmarks/fashion_feature_probe.py --out benchmarks/results/fashion_feature_probe
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from groupclip.training.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from groupclip.training.tasks.pretrained_image import efficientnet_encoder
from groupclip.training.tasks.scattering import scatter

TRAIN, VALID = 5000, 2000


@torch.no_grad()
def encoder_taps(pixels: torch.Tensor, resolution: int) -> dict[str, torch.Tensor]:
    """Block 8's output (whole and pooled to 2 x 2) and the 1280-channel head (global average) of the frozen
    EfficientNet-Lite0, input prepared as in ``groupclip.training.tasks.pretrained_image``."""
    net = efficientnet_encoder()
    taps: dict[str, list[torch.Tensor]] = {"block 8, whole": [], "block 8, 2 x 2": [], "head (1280), pooled": []}
    for start in range(0, len(pixels), 500):
        images = pixels[start : start + 500] * FASHION_MNIST_STD + FASHION_MNIST_MEAN
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
        hidden = net._swish(net._bn0(net._conv_stem(images.expand(-1, 3, -1, -1) * 2 - 1)))
        for index, block in enumerate(net._blocks):
            hidden = block(hidden)
            if index == 8:
                taps["block 8, whole"].append(hidden)
                taps["block 8, 2 x 2"].append(F.adaptive_avg_pool2d(hidden, 2))
        head = net._swish(net._bn1(net._conv_head(hidden)))
        taps["head (1280), pooled"].append(F.adaptive_avg_pool2d(head, 1))
    return {name: torch.cat(parts) for name, parts in taps.items()}


def probe(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Validation accuracy of an L2-regularised logistic regression fitted on the first TRAIN rows."""
    weight = torch.zeros(features.shape[1], 10, requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300, history_size=20, line_search_fn="strong_wolfe")
    x, y = features[:TRAIN], labels[:TRAIN]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 1e-4 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((features[TRAIN:] @ weight + bias).argmax(1) == labels[TRAIN:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/fashion_feature_probe")
    args = parser.parse_args()
    torch.manual_seed(0)
    train, _ = load_fashion_mnist()
    pixels = torch.cat([train.x[:TRAIN], train.x[-VALID:]])
    labels = torch.cat([train.y[:TRAIN], train.y[-VALID:]])
    scattering = F.group_norm(scatter(pixels), 27).flatten(1)
    rows = [("ScatterNet (J 2, L 8), GroupNorm 27", scattering.shape[1], probe(scattering, labels))]
    for resolution in (64, 96):
        for name, tap in encoder_taps(pixels, resolution).items():
            normed = F.group_norm(tap, 1).flatten(1)
            rows.append((f"EfficientNet-Lite0 {name}, {resolution} px", normed.shape[1], probe(normed, labels)))
            if name != "head (1280), pooled":
                both = torch.cat([normed, scattering], 1)
                label = f"EfficientNet-Lite0 {name}, {resolution} px + ScatterNet"
                rows.append((label, both.shape[1], probe(both, labels)))
    lines = [
        "# Fixed features for Fashion-MNIST: non-private linear probes (training set only)",
        "",
        f"Command: `python benchmarks/fashion_feature_probe.py --out {args.out}`  ",
        f"Machine: {platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Fitted on the first "
        f"{TRAIN:,} training images, scored on the last {VALID:,}; per-sample GroupNorm as in the models.",
        "",
        "| features | values per image | validation accuracy |",
        "|---|---:|---:|",
        *[f"| {name} | {dims:,} | {accuracy:.2%} |" for name, dims, accuracy in rows],
        "",
    ]
    with open(f"{args.out}.md", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    with open(f"{args.out}.json", "w", encoding="utf-8") as handle:
        json.dump([{"features": n, "dims": d, "val_accuracy": a} for n, d, a in rows], handle, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
