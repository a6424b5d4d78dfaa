"""CIFAR-style ResNet-18/34 (3×3 stem, no max-pool; stages of 64/128/256/512 channels), the
backbone of the IsoMax and DisMax papers' CIFAR experiments.

`block_activation="logsoftmax"` builds the log-softmax ResNet variant: the ReLU after each
residual addition becomes a log-softmax over channels (the stem and in-branch ReLUs stay).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.models.activations import make_activation
from oodbench.models.base import MODELS, Backbone


class PadShortcut(nn.Module):
    """Option A (He et al. 2016): x[:, :, ::2, ::2] with (cout − cin) zero channels split
    around it, so the shortcut has no parameters."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.before = (cout - cin) // 2
        self.after = cout - cin - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions plus a shortcut; where the shape changes the shortcut is a 1×1
    projection (`shortcut="conv"`, option B) or subsample + zero channels (`"pad"`, option A)."""

    def __init__(self, cin: int, cout: int, stride: int, block_activation: str = "relu",
                 shortcut: str = "conv") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if (stride != 1 or cin != cout) and shortcut == "pad":
            self.shortcut = PadShortcut(cin, cout)
        elif stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.act = make_activation(block_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class CifarResNet(Backbone):
    block_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, depths: tuple[int, int, int, int], in_channels: int = 3,
                 block_activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512), strict=True)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(cin, width, 2 if (j == 0 and i > 0) else 1,
                                         block_activation))
                cin = width
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.ModuleList(layers)
        self.feature_dim = 512

    def forward_features(self, x: torch.Tensor, taps: Collection[str] = ()
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        blocks = {}
        for name, layer in zip(self.block_names, self.layers, strict=True):
            x = layer(x)
            if name in taps:
                blocks[name] = x
        return x.mean(dim=(2, 3)), blocks


BOTH = ("relu", "logsoftmax")


@MODELS.register("resnet18", summary="CIFAR ResNet-18 (11M parameters); a GPU model",
                 block_activations=BOTH)
def resnet18(in_channels: int, image_size: int, block_activation: str = "relu") -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), in_channels, block_activation)


@MODELS.register("resnet34",
                 summary="CIFAR ResNet-34 (21M parameters), the papers' model; a GPU model",
                 block_activations=BOTH)
def resnet34(in_channels: int, image_size: int, block_activation: str = "relu") -> CifarResNet:
    return CifarResNet((3, 4, 6, 3), in_channels, block_activation)
