"""SoftMax loss: the usual linear layer + cross-entropy, the baseline of every OOD paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.losses.base import LOSSES, Criterion


@LOSSES.register("softmax", head=nn.Linear, summary="linear head + cross-entropy (baseline)")
class SoftMaxLoss(Criterion):
    """Cross-entropy; accepts class indices."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

