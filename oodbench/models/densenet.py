"""DenseNet-BC (Huang et al. 2017) for 32×32 inputs; registered as DenseNet-BC-100 with growth
rate k = 12, the network of the ODIN and Mahalanobis papers.

Three dense blocks of (depth − 4) / 6 bottleneck layers (BN-ReLU-1×1 conv to 4k, BN-ReLU-3×3 conv
to k, concatenated), transitions BN-ReLU-1×1 conv with compression 0.5 and 2×2 average pooling,
a 2k-channel 3×3 stem, and a final BN-ReLU before global average pooling (342 features).
Block outputs: `dense1`, `dense2` (each dense block's concatenated output) and `dense3` (the last
block after the final BN-ReLU, i.e. what is pooled into the features).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.models.base import MODELS, Backbone


class Bottleneck(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(Backbone):
    block_names = ("dense1", "dense2", "dense3")

    def __init__(self, depth: int = 100, growth: int = 12, in_channels: int = 3,
                 compression: float = 0.5) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        c = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        transitions: list[nn.Module] = []
        for i in range(3):
            layers = []
            for _ in range(n):
                layers.append(Bottleneck(c, growth))
                c += growth
            stages.append(nn.Sequential(*layers))
            if i < 2:
                cout = int(c * compression)
                transitions.append(Transition(c, cout))
                c = cout
        self.blocks = nn.ModuleList(stages)
        self.transitions = nn.ModuleList(transitions)
        self.bn = nn.BatchNorm2d(c)
        self.feature_dim = c
        self.he_init()

    def forward_features(self, x: torch.Tensor, taps: Collection[str] = ()
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.conv1(x)
        out = {}
        for i, name in enumerate(self.block_names):
            x = self.blocks[i](x)
            if i < 2:
                if name in taps:
                    out[name] = x
                x = self.transitions[i](x)
        x = F.relu(self.bn(x))
        if "dense3" in taps:
            out["dense3"] = x
        return x.mean(dim=(2, 3)), out


@MODELS.register("densenet100", summary="DenseNet-BC-100, k = 12 (0.8M parameters), the "
                 "ODIN/Mahalanobis network; a GPU model")
def densenet100(in_channels: int, image_size: int) -> DenseNetBC:
    return DenseNetBC(100, 12, in_channels)
