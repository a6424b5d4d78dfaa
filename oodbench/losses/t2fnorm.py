"""T2FNorm (Regmi et al., "T2FNorm: Train-time Feature Normalization for OOD Detection in Image
Classification", CVPR Workshops 2023).

Train with L2-normalised, temperature-scaled features; score OOD with the raw ones:

    training (and the training loss):  logits = W · (h / (τ ‖h‖₂)) + b,    τ = 0.1
    inference (eval mode, what detectors see):  logits = W · h + b

Normalising during training makes the network's feature norm free of the loss, and the paper
shows that the raw norm then separates ID from OOD data much better (ID features end up with
larger norms); hence the raw features at inference. The head is therefore an `nn.Linear` with a
training/eval switch: `forward` normalises when `self.training`, not otherwise, so
`model.train()` / `model.eval()` selects the mode with no extra flag. Being an `nn.Linear`,
detectors that read the head's W and b (ViM, ReAct …) see the same layer the eval logits use.

One consequence: the eval-mode argmax can differ from the train-mode one, but only through the
bias (scaling h by the positive 1/(τ‖h‖) scales W·h and leaves b). Criterion: cross-entropy.
τ is a constant of the head (heads are built as `head(num_features, num_classes)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.losses.base import LOSSES, Criterion

T2FNORM_TAU = 0.1


class T2FNormHead(nn.Linear):
    """Replaces `nn.Linear(num_features, num_classes)`: normalises the features by τ‖h‖ in
    train mode, passes them raw in eval mode."""

    def __init__(self, num_features: int, num_classes: int, tau: float = T2FNORM_TAU) -> None:
        super().__init__(num_features, num_classes)
        self.tau = tau

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training:
            features = F.normalize(features, dim=1) / self.tau
        return super().forward(features)


@LOSSES.register("t2fnorm", head=T2FNormHead,
                 summary="T2FNorm: linear head on h/(τ‖h‖) in training (τ = 0.1), raw h at "
                 "inference; cross-entropy")
class T2FNormLoss(Criterion):
    """Cross-entropy; the normalisation lives in the head."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)
