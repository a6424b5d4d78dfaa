"""A loss is a pair of modules, usable from plain PyTorch:

    head = spec.head(num_features, num_classes)   # replaces nn.Linear
    criterion = spec.criterion()                   # replaces nn.CrossEntropyLoss
    inputs, targets = criterion.preprocess(inputs, targets)   # identity unless the loss augments
    loss = criterion(head(backbone(inputs)), targets)

Losses that need more than the logits (the log-softmax ResNet's entropy term needs every block
activation) declare what they need in `criterion.aux` and implement `training_loss`:

    out = classifier.forward_all(inputs, aux=criterion.aux)   # logits + auxiliary quantities
    loss = criterion.training_loss(out, targets)

The trainer always uses this second form; for losses without auxiliary needs it equals the first.
`LOSSES` maps a name to its `LossSpec`; adding a loss is one module whose criterion class is
decorated `@LOSSES.register("name", head=..., summary=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from oodbench.registry import Registry

if TYPE_CHECKING:
    from oodbench.models.base import ModelOutput


class Criterion(nn.Module):
    """Base class for criteria: `preprocess` is the identity unless a loss augments batches."""

    aux: tuple[str, ...] = ()  # auxiliary model outputs `training_loss` needs (ModelOutput.aux)
    max_grad_norm: float | None = None  # gradient-norm clipping the loss needs to train stably

    def preprocess(self, inputs: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs, targets

    def training_loss(self, output: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
        """The loss the trainer minimises; by default the criterion of the logits."""
        return self(output.logits, targets)


@dataclass(frozen=True)
class LossSpec:
    """`block_activation` names the backbone variant the loss is defined with: "relu" (any
    model) or "logsoftmax" (the ReLU after each residual addition replaced by a channel
    log-softmax; only models that list it in `ModelSpec.block_activations`)."""

    head: Callable[[int, int], nn.Module]
    criterion: Callable[..., Criterion]
    summary: str
    block_activation: str = "relu"


def _loss_spec(criterion: Callable[..., Criterion], *, head: Callable[[int, int], nn.Module],
               summary: str, block_activation: str = "relu") -> LossSpec:
    """The registry entry of a decorated criterion class."""
    return LossSpec(head, criterion, summary, block_activation)


LOSSES: Registry[LossSpec] = Registry("loss", entry=_loss_spec)
