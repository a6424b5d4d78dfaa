"""He et al. (2016) CIFAR ResNet-20/32/44/56: a 16-channel 3×3 stem, three stages of n basic
blocks with 16/32/64 channels (depth = 6n + 2), global average pooling, a linear layer.

Option-A shortcuts: where a block halves the resolution and doubles the channels, the identity
shortcut subsamples by 2 and zero-pads the new channels, so the shortcut has no parameters. Module
names match the widely used pretrained checkpoints (conv1, bn1, layer{1,2,3}.N.{conv1,bn1,conv2,
bn2}), which `oodbench.models.pretrained` maps onto this backbone.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.models.base import MODELS, Backbone
from oodbench.models.resnet import BasicBlock


class HeResNet(Backbone):
    block_names = ("layer1", "layer2", "layer3")

    def __init__(self, depth: int, in_channels: int = 3, block_activation: str = "relu") -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"He CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, width, 2 if (j == 0 and i > 0) else 1,
                                         block_activation, shortcut="pad"))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.feature_dim = 64
        self.he_init()  # as in the paper

    def forward_features(self, x: torch.Tensor, taps: Collection[str] = ()
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        blocks = {}
        for name in self.block_names:
            x = getattr(self, name)(x)
            if name in taps:
                blocks[name] = x
        return x.mean(dim=(2, 3)), blocks


BOTH = ("relu", "logsoftmax")


def _summary(depth: int, params: str) -> str:
    return (f"He et al. CIFAR ResNet-{depth} ({params} parameters), option-A shortcuts; loads "
            "the akamaster pretrained checkpoints")


@MODELS.register("resnet20", summary=_summary(20, "0.27M"), block_activations=BOTH)
def resnet20(in_channels: int, image_size: int, block_activation: str = "relu") -> HeResNet:
    return HeResNet(20, in_channels, block_activation)


@MODELS.register("resnet32", summary=_summary(32, "0.46M"), block_activations=BOTH)
def resnet32(in_channels: int, image_size: int, block_activation: str = "relu") -> HeResNet:
    return HeResNet(32, in_channels, block_activation)


@MODELS.register("resnet44", summary=_summary(44, "0.66M"), block_activations=BOTH)
def resnet44(in_channels: int, image_size: int, block_activation: str = "relu") -> HeResNet:
    return HeResNet(44, in_channels, block_activation)


@MODELS.register("resnet56", summary=_summary(56, "0.85M"), block_activations=BOTH)
def resnet56(in_channels: int, image_size: int, block_activation: str = "relu") -> HeResNet:
    return HeResNet(56, in_channels, block_activation)
