"""DisMax loss (Macêdo et al., "Distinction Maximization Loss", 2022).

Head: features and learnable prototypes are L2-normalised; d_j = |s| · ||f̂ − p̂_j|| / √2 with a
learnable distance scale s (init 1); logits_j = −(d_j + mean_k d_k). The mean term shifts every
logit equally, so it never changes softmax probabilities or the training loss; it does change
max-logit-type scores, which is what the DisMax scores exploit.

Criterion: cross-entropy on 10 × logits (the entropic scale, training only). With fractional
probability regularization (FPR, on by default), `preprocess` shuffles the batch and turns its
second half into 2×2 mosaics whose four quadrants come from four samples; each mosaic's target
puts 0.25 on each quadrant's class. Loss = (CE on the clean half + alpha · KL(target ‖ p) on the
mosaic half) / 2.

Under DistributedDataParallel (`torchrun`, `oodbench train --nproc-per-node N`) `preprocess` runs
on each rank's slice of the global batch: the shuffle, the clean / mosaic halves and the mosaics'
four source images are all within one rank's batch_size / N images, never across ranks. The loss
of a slice is the mean above over that slice, and DDP averages the slices' gradients, so the
step is the mean of N per-slice DisMax losses (with one process: the paper's whole-batch one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.losses.base import LOSSES, NON_NEGATIVE, POSITIVE, Criterion
from oodbench.losses.isomax import pairwise_distances

ENTROPIC_SCALE = 10.0


class DisMaxHead(nn.Module):
    """Replaces `nn.Linear(num_features, num_classes)`."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(num_classes, num_features))
        self.distance_scale = nn.Parameter(torch.ones(1))

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features.float(), dim=1)
        p = F.normalize(self.prototypes, dim=1)
        # Direct difference, not the ||a||²+||b||²−2ab expansion: exact near zero distance.
        d = pairwise_distances(f, p) / math.sqrt(2.0)
        return self.distance_scale.abs() * d

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        d = self.distances(features)
        return -(d + d.mean(dim=1, keepdim=True))


def mosaic(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the second half of a batch into 2×2 mosaics.

    Returns the new inputs and a B×4 long tensor: for each image, the class of each quadrant
    (top-left, bottom-left, top-right, bottom-right). Clean rows repeat their label four times.
    Quadrant q of mosaic i comes from mosaic-half sample (i − q) mod M (a roll by q).
    """
    b = inputs.shape[0]
    half = b // 2
    x = inputs.clone()
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    quad_targets = targets[:, None].repeat(1, 4)
    m = x[half:]
    src = m.clone()
    t = targets[half:]
    for q, (rows, cols) in enumerate(((slice(0, h), slice(0, w)), (slice(h, None), slice(0, w)),
                                      (slice(0, h), slice(w, None)),
                                      (slice(h, None), slice(w, None)))):
        if q:
            m[..., rows, cols] = torch.roll(src[..., rows, cols], q, dims=0)
        quad_targets[half:, q] = torch.roll(t, q, dims=0)
    return x, quad_targets


@LOSSES.register("dismax", head=DisMaxHead,
                 summary="DisMax: isometric distances to all prototypes + FPR mosaics")
class DisMaxLoss(Criterion):
    """Replaces `nn.CrossEntropyLoss()`. Targets: class indices (B,) or quadrant classes (B, 4)
    from `preprocess`, where the first B//2 rows are clean and the rest are mosaics. Under DDP,
    B is one rank's slice and the mosaics mix images within it (see the module docstring).

    Options: `fpr` (mosaics on/off), `alpha` (weight of the mosaic KL term, >= 0),
    `entropic_scale` (> 0: a non-positive scale would flip or flatten the softmax)."""

    option_ranges = {"alpha": NON_NEGATIVE, "entropic_scale": POSITIVE}

    def __init__(self, fpr: bool = True, alpha: float = 1.0,
                 entropic_scale: float = ENTROPIC_SCALE) -> None:
        super().__init__()
        self.fpr, self.alpha, self.entropic_scale = fpr, alpha, entropic_scale

    def preprocess(self, inputs: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.fpr and self.training) or inputs.shape[0] < 2:
            return inputs, targets
        perm = torch.randperm(inputs.shape[0], device=inputs.device)
        return mosaic(inputs[perm], targets[perm])

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(self.entropic_scale * logits.float(), dim=1)
        if targets.dim() == 1:
            return F.nll_loss(log_p, targets)
        half = logits.shape[0] // 2
        clean = F.nll_loss(log_p[:half], targets[:half, 0])
        target_dist = torch.zeros_like(log_p[half:]).scatter_add_(
            1, targets[half:], torch.full(targets[half:].shape, 0.25, device=logits.device,
                                          dtype=log_p.dtype))
        kl = F.kl_div(log_p[half:], target_dist, reduction="batchmean")
        return (clean + self.alpha * kl) / 2

