"""Wide ResNet (Zagoruyko & Komodakis 2016) for 32×32 inputs; registered as WRN-28-10, the
network of the ODIN paper (dropout 0.3 between the two convolutions of each block).

Pre-activation blocks (BN-ReLU-conv-BN-ReLU-dropout-conv, plus the identity or a 1×1-conv
shortcut of the pre-activated input); three groups of (depth − 4) / 6 blocks with 16k/32k/64k
channels; a final BN-ReLU before global average pooling. Block outputs: `layer1`, `layer2` (the
groups' outputs) and `layer3` (after the final BN-ReLU, what is pooled into the features).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.models.base import MODELS, Backbone


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(Backbone):
    block_names = ("layer1", "layer2", "layer3")

    def __init__(self, depth: int = 28, widen: int = 10, in_channels: int = 3,
                 dropout: float = 0.3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        cin, groups = 16, []
        for i, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(cin, width, 2 if (j == 0 and i > 0) else 1, dropout))
                cin = width
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.ModuleList(groups)
        self.bn = nn.BatchNorm2d(cin)
        self.feature_dim = cin
        self.he_init()

    def forward_features(self, x: torch.Tensor, taps: Collection[str] = ()
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.conv1(x)
        out = {}
        for name, group in zip(self.block_names, self.groups, strict=True):
            x = group(x)
            if name == "layer3":
                x = F.relu(self.bn(x))
            if name in taps:
                out[name] = x
        return x.mean(dim=(2, 3)), out


@MODELS.register("wrn28-10", summary="WideResNet-28-10 with dropout 0.3 (36M parameters), the "
                 "ODIN network; a GPU model")
def wrn28_10(in_channels: int, image_size: int) -> WideResNet:
    return WideResNet(28, 10, in_channels, 0.3)
