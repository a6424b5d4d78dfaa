"""A loss is a pair of modules, usable from plain PyTorch:

    head = spec.head(num_features, num_classes)   # replaces nn.Linear
    criterion = spec.criterion()                   # replaces nn.CrossEntropyLoss
    inputs, targets = criterion.preprocess(inputs, targets)   # identity unless the loss augments
    loss = criterion(head(backbone(inputs)), targets)

`LOSSES` maps a name to its `LossSpec`; adding a loss is one module and one `LOSSES.add`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from oodbench.registry import Registry


class Criterion(nn.Module):
    """Base class for criteria: `preprocess` is the identity unless a loss augments batches."""

    def preprocess(self, inputs: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs, targets


@dataclass(frozen=True)
class LossSpec:
    head: Callable[[int, int], nn.Module]
    criterion: Callable[..., Criterion]
    summary: str


LOSSES: Registry[LossSpec] = Registry("loss")
