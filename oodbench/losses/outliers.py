"""Losses trained with auxiliary outliers: a batch of images known to be out-of-distribution
(the benchmark's `outliers` set, disjoint from every OOD test set) is appended to each
in-distribution batch; its rows carry the target `OUTLIER_TARGET` (-1).

* Outlier Exposure (Hendrycks, Mazeika & Dietterich, "Deep Anomaly Detection with Outlier
  Exposure", ICLR 2019): cross-entropy on the in-distribution rows plus λ × the cross-entropy
  of the outlier rows to the uniform distribution over the K classes,

      loss = CE(f_in, y) + λ · mean_out( −(1/K) Σ_k log softmax(f_out)_k ),    λ = 0.5,

  written as the authors do: −(1/K) Σ_k log p_k = logsumexp(f) − mean_k f_k.

* Energy-regularised training (Liu, Wang, Owens & Li, "Energy-based Out-of-distribution
  Detection", NeurIPS 2020), with E(x) = −logsumexp(f(x)):

      loss = CE(f_in, y) + λ · ( mean_in max(0, E_in − m_in)² + mean_out max(0, m_out − E_out)² ),
      λ = 0.1, m_in = −25, m_out = −7.

  The margins are the paper's CIFAR values and are scale-dependent: they are energies, i.e.
  (minus) log-sum-exp logit values, and a small network or a short schedule may never reach
  logits of 25. The in-margin pulls in-distribution energies below m_in (large logits), the
  out-margin pushes outlier energies above m_out; set both per benchmark (`loss_options`).
  The paper fine-tunes a pretrained network; here it is also usable from scratch.

Both heads are the plain linear layer; the in-distribution part is the usual cross-entropy, so
a batch without outlier rows gives CE (+ the energy in-margin term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.losses.base import LOSSES, NON_NEGATIVE, OUTLIER_TARGET, Criterion

OE_WEIGHT = 0.5
ENERGY_WEIGHT = 0.1
ENERGY_M_IN = -25.0
ENERGY_M_OUT = -7.0


def split_outliers(logits: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(in-distribution logits, their targets, outlier logits), float32 or wider: outlier rows
    are those whose target is OUTLIER_TARGET."""
    f = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    out = targets == OUTLIER_TARGET
    return f[~out], targets[~out], f[out]


def _mean_or_zero(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mean of `values`, or an exact 0 (keeping the graph) when there are none."""
    return values.mean() if values.numel() else like.sum() * 0.0


@LOSSES.register("oe", head=nn.Linear,
                 summary="Outlier Exposure: CE + λ·CE-to-uniform on auxiliary outliers (λ = 0.5)")
class OutlierExposureLoss(Criterion):
    """Replaces `nn.CrossEntropyLoss()`; rows with target -1 are auxiliary outliers. Option
    `weight` λ >= 0 (0 = plain cross-entropy on the in-distribution rows)."""

    option_ranges = {"weight": NON_NEGATIVE}
    needs_outliers = True

    def __init__(self, weight: float = OE_WEIGHT) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        f_in, y, f_out = split_outliers(logits, targets)
        ce = _mean_or_zero(F.cross_entropy(f_in, y, reduction="none"), logits)
        to_uniform = torch.logsumexp(f_out, dim=1) - f_out.mean(dim=1)
        return ce + self.weight * _mean_or_zero(to_uniform, logits)


@LOSSES.register("energy-ft", head=nn.Linear,
                 summary="energy-regularised training: CE + λ·squared hinges on the energies "
                 "of ID (< m_in) and auxiliary outliers (> m_out); λ = 0.1, m_in = −25, "
                 "m_out = −7")
class EnergyRegularisedLoss(Criterion):
    """Replaces `nn.CrossEntropyLoss()`; rows with target -1 are auxiliary outliers. Options:
    `weight` λ >= 0, margins `m_in` and `m_out` (energies, scale-dependent; see the module)."""

    option_ranges = {"weight": NON_NEGATIVE}
    needs_outliers = True

    def __init__(self, weight: float = ENERGY_WEIGHT, m_in: float = ENERGY_M_IN,
                 m_out: float = ENERGY_M_OUT) -> None:
        super().__init__()
        self.weight, self.m_in, self.m_out = weight, m_in, m_out

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        f_in, y, f_out = split_outliers(logits, targets)
        ce = _mean_or_zero(F.cross_entropy(f_in, y, reduction="none"), logits)
        e_in, e_out = -torch.logsumexp(f_in, dim=1), -torch.logsumexp(f_out, dim=1)
        hinge_in = _mean_or_zero(F.relu(e_in - self.m_in) ** 2, logits)
        hinge_out = _mean_or_zero(F.relu(self.m_out - e_out) ** 2, logits)
        return ce + self.weight * (hinge_in + hinge_out)
