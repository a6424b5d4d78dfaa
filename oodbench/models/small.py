"""Small convolutional networks for 8×8 and 28×28 inputs: fast enough for CPU benchmarks."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from oodbench.models.base import MODELS, Backbone, ModelSpec


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(Backbone):
    """Three conv stages (`block1..3`), 2×2 max-pool after the stages listed in `pool_after`,
    global average pooling to `widths[-1]` features."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64, 128),
                 pool_after: tuple[int, ...] = (1,)) -> None:
        super().__init__()
        self.block_names = tuple(f"block{i + 1}" for i in range(len(widths)))
        stages, cin = [], in_channels
        for i, w in enumerate(widths):
            layers = [_conv_bn(cin, w), _conv_bn(w, w)]
            if i in pool_after:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.feature_dim = widths[-1]

    def forward_features(self, x: torch.Tensor, taps: Collection[str] = ()
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        blocks = {}
        for name, stage in zip(self.block_names, self.stages, strict=True):
            x = stage(x)
            if name in taps:
                blocks[name] = x
        return x.mean(dim=(2, 3)), blocks


MODELS.add("smallcnn8", ModelSpec(
    lambda c, s: SmallCNN(c, (32, 64, 128), pool_after=(1,)),
    "3-stage CNN for 8×8 inputs (digits); ~0.3M parameters", image_sizes=(8,)))
MODELS.add("smallcnn28", ModelSpec(
    lambda c, s: SmallCNN(c, (32, 64, 128), pool_after=(0, 1)),
    "3-stage CNN for 28×28 inputs (MNIST family); ~0.3M parameters", image_sizes=(28,)))
MODELS.add("tinycnn28", ModelSpec(
    lambda c, s: SmallCNN(c, (16, 32, 64), pool_after=(0, 1)),
    "3-stage CNN, widths 16/32/64, for 28×28 inputs: the MNIST benchmarks on a CPU; ~0.07M "
    "parameters", image_sizes=(28,)))
