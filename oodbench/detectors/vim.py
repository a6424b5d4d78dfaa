"""ViM: Virtual-logit Matching (Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with
Virtual-logit Matching", CVPR 2022).

With the linear head (W: C×D, b: C), the feature-space origin is moved to u = −W⁺ b (so that
logits = (f − u) Wᵀ when b lies in W's row space). On the train features:
  M = mean over train of (f − u)(f − u)ᵀ (second moment around u, NOT the covariance around the
      mean: the paper / official code fit EmpiricalCovariance(assume_centered=True) on f − u);
  P = the eigenvectors of the `dim` largest eigenvalues of M (the principal subspace);
  residual(f) = ‖(f − u) − P Pᵀ(f − u)‖₂ = ‖(f − u) R‖₂, R = the other D − dim eigenvectors;
  α = mean_train(max_c logit_c) / mean_train(residual)  (the paper's matching of scales).
Score (higher = in-distribution): energy − virtual logit = logsumexp_c(logit_c) − α·residual(f).
Energy uses the raw logits (T = 1), as the paper.

`dim` default 0 = the official code's rule: 1000 if D ≥ 2048, 512 if D ≥ 768, else D/2
(OpenOOD's CIFAR-10 ResNet-18 setting, D = 512, is dim = 256 = D/2). `fit` stores the whole
eigenbasis of M and the train mean residual for EVERY dim (one extra streamed pass), so
changing `dim` (e.g. a grid over it) needs no refit; a dim ≥ D is NotApplicable.

Prototype heads (IsoMax, IsoMax+, DisMax): there is no (W, b), so u is undefined; ViM refuses
with NotApplicable (an OodbenchError: "vim is not applicable: ...").
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from oodbench.detectors.base import DETECTORS, Detector, DetectorInput, HParam, NotApplicable
from oodbench.detectors.streaming import (
    features_of,
    logits_of,
    rows,
)
from oodbench.errors import OodbenchError


def auto_dim(d: int) -> int:
    """The official ViM code's principal-subspace size for feature dimension d."""
    return 1000 if d >= 2048 else 512 if d >= 768 else d // 2


@DETECTORS.register("vim", paper="Wang et al., CVPR 2022 (ViM)")
class ViM(Detector):
    """logsumexp(logits) − α·‖residual of f − u outside the principal subspace‖ (Wang 2022)."""

    summary = "ViM: energy minus the scaled residual norm outside the principal feature subspace"
    needs = frozenset({"logits", "features", "head"})
    requires_fit = True
    applies_to_prototype_heads: ClassVar[bool | str] = False
    prototype_head_reason = ("ViM's origin u = −W⁺b and its energy term need the linear head's "
                             "W, b; this model's head is a distance to prototypes")
    hparams = {"dim": HParam(0, int, ge=0, doc="principal-subspace size (0: the paper's rule: "
                                               "1000 if D>=2048, 512 if D>=768, else D/2)")}
    grid: ClassVar[dict[str, list]] = {"dim": [0, 16, 32, 64, 128, 256, 512, 1000]}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.u: torch.Tensor | None = None

    def fit(self, train: DetectorInput) -> ViM:
        w, b = self.linear_head(train)
        feats = features_of(train, "vim")
        u = -torch.linalg.pinv(w) @ b
        d = feats.shape[1]
        moment = torch.zeros(d, d, dtype=torch.float64)
        n, max_logit = 0, 0.0
        for i, x in rows(feats):
            xc = x - u
            moment += xc.T @ xc
            n += len(x)
            logits = (torch.as_tensor(np.asarray(train.logits[i:i + len(x)])).double()
                      if train.logits is not None else x @ w.T + b)
            max_logit += logits.max(1).values.sum().item()
        lam, vec = torch.linalg.eigh(moment / max(n, 1))
        basis = vec.flip(1)  # columns by decreasing eigenvalue
        res_sum = torch.zeros(d, dtype=torch.float64)
        for _, x in rows(feats):
            sq = ((x - u) @ basis) ** 2
            tail = sq.flip(1).cumsum(1).flip(1)  # tail[:, k] = Σ_{j ≥ k} z_j²
            res_sum += tail.clamp_min(0).sqrt().sum(0)
        self.u, self.basis = u, basis
        self.mean_residual = res_sum / max(n, 1)  # [k]: mean residual outside the top k
        self.mean_max_logit = max_logit / max(n, 1)
        self.fitted = True
        return self

    @property
    def dim(self) -> int:
        assert self.u is not None
        d = len(self.u)
        k = int(self.params["dim"]) or auto_dim(d)
        if not 1 <= k < d:
            problem = f"vim.dim = {k} must be in [1, D) for feature dimension D = {d}"
            if "dim" in self.given:  # the user's value: bad input (exit 2), nothing written
                raise OodbenchError(problem, f"pass e.g. -p vim.dim={auto_dim(d) or 1}")
            raise NotApplicable("vim", problem)  # a grid point or the automatic choice
        return k

    @property
    def alpha(self) -> float:
        return self.mean_max_logit / float(self.mean_residual[self.dim])

    def score(self, data: DetectorInput) -> np.ndarray:
        assert self.u is not None
        k, alpha = self.dim, self.alpha
        null = self.basis[:, k:]
        logits = logits_of(data, "vim")
        out = []
        for i, x in rows(features_of(data, "vim")):
            residual = ((x - self.u) @ null).norm(dim=1)
            energy = torch.logsumexp(
                torch.as_tensor(np.asarray(logits[i:i + len(x)])).double(), 1)
            out.append(energy - alpha * residual)
        return torch.cat(out).numpy() if out else np.empty(0)
