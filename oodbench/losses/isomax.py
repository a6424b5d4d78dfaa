"""IsoMax (Macêdo et al., "Entropic Out-of-Distribution Detection", 2021) and IsoMax+ (Macêdo &
Ludermir, "Enhanced Isotropy Maximization Loss", 2021).

IsoMax head: logits_j = −||f − p_j|| with learnable prototypes p_j initialised at zero.
IsoMax+ head: logits_j = −|s| · ||f̂ − p̂_j||, features and prototypes L2-normalised, prototypes
initialised N(0, 1), learnable distance scale s initialised at 1.
Criterion (both): cross-entropy of `entropic_scale` × logits (10 in both papers). The scale is a
training-time device only: the head's logits (what detectors see) are the unscaled distances.

Distances are computed as the norm of the difference, not as ||a||² + ||b||² − 2ab, which is
exact near zero distance and has a defined (zero) gradient there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.losses.base import LOSSES, POSITIVE, Criterion

ENTROPIC_SCALE = 10.0


def pairwise_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """B×D features, K×D prototypes → B×K Euclidean distances (float32 or wider)."""
    f = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    p = prototypes.to(f.dtype)
    return torch.linalg.vector_norm(f[:, None, :] - p[None, :, :], dim=2)


class IsoMaxHead(nn.Module):
    """Replaces `nn.Linear(num_features, num_classes)`."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.zeros(num_classes, num_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return -pairwise_distances(features, self.prototypes)


class IsoMaxPlusHead(nn.Module):
    """Replaces `nn.Linear(num_features, num_classes)`."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(num_classes, num_features))
        self.distance_scale = nn.Parameter(torch.ones(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(F.normalize(features.float(), dim=1),
                               F.normalize(self.prototypes, dim=1))
        return -self.distance_scale.abs() * d


@LOSSES.register("isomax", head=IsoMaxHead,
                 summary="IsoMax: −Euclidean distance to prototypes, entropic scale 10")
@LOSSES.register("isomaxplus", head=IsoMaxPlusHead,
                 summary="IsoMax+: −scaled distance of normalised features/prototypes, "
                 "entropic scale 10")
class EntropicCrossEntropy(Criterion):
    """Replaces `nn.CrossEntropyLoss()`: cross-entropy of `entropic_scale` × logits (option,
    > 0: a non-positive scale would flip or flatten the softmax)."""

    option_ranges = {"entropic_scale": POSITIVE}

    def __init__(self, entropic_scale: float = ENTROPIC_SCALE) -> None:
        super().__init__()
        self.entropic_scale = entropic_scale

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.entropic_scale * logits.float(), targets)

