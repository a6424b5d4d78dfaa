"""Small convolutional networks for 8×8 and 28×28 inputs: fast enough for CPU benchmarks.

Each stage is a 3×3 conv-BN-ReLU that sets the width, then one residual 3×3 conv-BN whose sum
with its input goes through the block activation (ReLU, or a channel log-softmax for the
log-softmax ResNet variant), so the small nets can stand in for ResNets in every loss, the
log-softmax ResNet included. Block outputs `block1..3` are the activation outputs, before any
2×2 max-pool (so in the log-softmax variant they are per-position channel log-probabilities).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.models.activations import make_activation
from oodbench.models.base import MODELS, Backbone


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ResidualConv(nn.Module):
    """act(x + BN(conv(x))): the residual addition whose activation the variants change."""

    def __init__(self, channels: int, block_activation: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = make_activation(block_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn(self.conv(x)))


class SmallStage(nn.Sequential):
    """conv-BN-ReLU to `cout` channels, then one residual conv."""

    def __init__(self, cin: int, cout: int, block_activation: str) -> None:
        super().__init__(_conv_bn_relu(cin, cout), ResidualConv(cout, block_activation))


class SmallCNN(Backbone):
    """Three stages (`block1..3`), 2×2 max-pool after the stages listed in `pool_after`,
    global average pooling to `widths[-1]` features."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64, 128),
                 pool_after: tuple[int, ...] = (1,), block_activation: str = "relu") -> None:
        super().__init__()
        self.block_names = tuple(f"block{i + 1}" for i in range(len(widths)))
        stages, cin = [], in_channels
        for w in widths:
            stages.append(SmallStage(cin, w, block_activation))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.pool_after = tuple(pool_after)
        self.feature_dim = widths[-1]

    def forward_features(self, x: torch.Tensor, taps: Collection[str] = ()
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        blocks = {}
        for i, (name, stage) in enumerate(zip(self.block_names, self.stages, strict=True)):
            x = stage(x)
            if name in taps:
                blocks[name] = x
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
        return x.mean(dim=(2, 3)), blocks


class CompactNet(Backbone):
    """A conv-BN-ReLU stem at full resolution, then stages of conv-BN-ReLU (sets the width),
    2×2 max-pool, one residual conv: the convolutions run after each pool, at a quarter of the
    positions a ResNet stage would use, so a wide net stays cheap on a CPU (the shape of the
    fast CIFAR training nets, e.g. Page's ResNet-9, at half the width and one residual conv)."""

    def __init__(self, in_channels: int, stem: int = 32, widths: tuple[int, ...] = (64, 128, 256),
                 block_activation: str = "relu") -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, stem)
        self.block_names = tuple(f"block{i + 1}" for i in range(len(widths)))
        stages, cin = [], stem
        for w in widths:
            stages.append(nn.Sequential(_conv_bn_relu(cin, w), nn.MaxPool2d(2),
                                        ResidualConv(w, block_activation)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.feature_dim = widths[-1]

    def forward_features(self, x: torch.Tensor, taps: Collection[str] = ()
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, blocks = self.stem(x), {}
        for name, stage in zip(self.block_names, self.stages, strict=True):
            x = stage(x)
            if name in taps:
                blocks[name] = x
        return x.mean(dim=(2, 3)), blocks


BOTH = ("relu", "logsoftmax")


@MODELS.register("smallcnn8", image_sizes=(8,), block_activations=BOTH,
                 summary="3-stage residual CNN for 8×8 inputs (digits); ~0.3M parameters")
def smallcnn8(in_channels: int, image_size: int, block_activation: str = "relu") -> SmallCNN:
    return SmallCNN(in_channels, (32, 64, 128), (1,), block_activation)


@MODELS.register("smallcnn28", image_sizes=(28,), block_activations=BOTH,
                 summary="3-stage residual CNN for 28×28 inputs (MNIST family); ~0.3M parameters")
def smallcnn28(in_channels: int, image_size: int, block_activation: str = "relu") -> SmallCNN:
    return SmallCNN(in_channels, (32, 64, 128), (0, 1), block_activation)


@MODELS.register("tinycnn28", image_sizes=(28,), block_activations=BOTH,
                 summary="3-stage residual CNN, widths 16/32/64, for 28×28 inputs: the MNIST "
                 "benchmarks on a CPU; ~0.07M parameters")
def tinycnn28(in_channels: int, image_size: int, block_activation: str = "relu") -> SmallCNN:
    return SmallCNN(in_channels, (16, 32, 64), (0, 1), block_activation)


@MODELS.register("compact32", image_sizes=(32,), block_activations=BOTH,
                 summary="compact residual CNN for 32×32 (stem 32, stages 64/128/256 after "
                 "pooling); ~1.2M parameters, ≥ 85 % on cifar10-jpeg in ~20 CPU minutes")
def compact32(in_channels: int, image_size: int, block_activation: str = "relu") -> CompactNet:
    return CompactNet(in_channels, 32, (64, 128, 256), block_activation)
