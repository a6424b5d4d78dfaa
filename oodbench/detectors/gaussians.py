"""Class-conditional Gaussian detectors on penultimate features (streamed fits, float64).

All three reuse the streaming class-Gaussian fit of `mahalanobis.py` (per-class sums, one D×D
scatter, pseudo-inverse by eigendecomposition) and score in chunks. MD_c(x) below is the
squared Mahalanobis distance (x − μ_c)ᵀ Σ⁺ (x − μ_c) with the tied (shared) covariance Σ.

- `mahalanobis++` (Mueller & Hein, "Mahalanobis++: Improving OOD Detection via Feature
  Normalization", 2025): Mahalanobis (Lee et al. 2018) on L2-normalised features z = f/‖f‖₂:
  class means and tied covariance of the normalised train features; score = −min_c MD_c(z).
  No hyperparameter (the paper has none).
- `rmds` (Ren et al., "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection",
  2021): relative Mahalanobis RMD_c(x) = MD_c(x) − MD_0(x), where MD_0 uses a background
  Gaussian N(μ₀, Σ₀) fitted to ALL train features (their mean and covariance, classes
  ignored); score = −min_c RMD_c(x) = MD_0(x) − min_c MD_c(x) (as OpenOOD's rmds). No
  hyperparameter.
- `gmm`: the class-conditional Gaussian mixture that the Mahalanobis fit defines (Gaussian
  discriminant analysis), scored by its log-likelihood
  log p(x) = log Σ_c π_c N(x; μ_c, Σ_c),  π_c = N_c / N (train class frequencies),
  log N(x; μ, Σ) = −½ (r log 2π + log pdet Σ + (x − μ)ᵀ Σ⁺ (x − μ)),
  r = rank(Σ), pdet = product of the kept eigenvalues (the density on the span of the train
  features; eigenvalues under D·eps·λ_max are dropped, as for Mahalanobis). Unlike Mahalanobis
  (the closest class only) every class contributes. `covariance`: "tied" (default, one shared
  Σ: the Lee et al. model, well conditioned with few samples per class) or "full" (one Σ_c per
  class: C·D² float64 of memory, 210 MiB for C = 100, D = 512; use `shrinkage` > 0 when a class
  has fewer samples than D). `shrinkage` α: Σ + α·tr(Σ)/D·I. `fit` reads both hyperparameters.

All three need only features (and train labels), no linear head: they apply to prototype heads.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from oodbench.detectors.base import DETECTORS, Detector, DetectorInput, HParam
from oodbench.detectors.mahalanobis import ClassGaussian, fit_class_gaussian
from oodbench.detectors.streaming import (
    NormalisedView,
    features_of,
    l2_normalise,
    num_classes,
    rows,
)
from oodbench.errors import OodbenchError


class _Zeros:
    """Labels that are all 0 (the one 'class' of the background Gaussian), without N storage."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __getitem__(self, idx: slice) -> torch.Tensor:
        start, stop, _ = idx.indices(self.n)
        return torch.zeros(max(stop - start, 0), dtype=torch.long)


class _FeatureGaussian(Detector):
    needs = frozenset({"features"})
    requires_fit = True
    applies_to_prototype_heads: ClassVar[bool | str] = True
    grid: ClassVar[dict[str, list]] = {}


@DETECTORS.register("mahalanobis++", paper="Mueller & Hein, 2025 (Mahalanobis++)")
class MahalanobisPlusPlus(_FeatureGaussian):
    """−min_c MD_c(f/‖f‖₂), tied-covariance class Gaussians of normalised train features."""

    summary = "Mahalanobis++: Mahalanobis on L2-normalised penultimate features"

    def fit(self, train: DetectorInput) -> MahalanobisPlusPlus:
        feats = features_of(train, "mahalanobis++")
        self.gauss = fit_class_gaussian(NormalisedView(feats), train.labels, num_classes(train))
        self.fitted = True
        return self

    def score(self, data: DetectorInput) -> np.ndarray:
        out = [-self.gauss.distances(l2_normalise(x)).min(1).values
               for _, x in rows(features_of(data, "mahalanobis++"))]
        return torch.cat(out).numpy() if out else np.empty(0)


@DETECTORS.register("rmds", paper="Ren et al., 2021 (relative Mahalanobis)")
class RelativeMahalanobis(_FeatureGaussian):
    """MD_0(x) − min_c MD_c(x): class Gaussians relative to a background Gaussian."""

    summary = "RMDS: relative Mahalanobis (class Gaussians minus a background Gaussian)"

    def fit(self, train: DetectorInput) -> RelativeMahalanobis:
        feats = features_of(train, "rmds")
        self.gauss = fit_class_gaussian(feats, train.labels, num_classes(train))
        self.background = fit_class_gaussian(feats, _Zeros(len(feats)), 1)
        self.fitted = True
        return self

    def score(self, data: DetectorInput) -> np.ndarray:
        out = [self.background.distances(x)[:, 0] - self.gauss.distances(x).min(1).values
               for _, x in rows(features_of(data, "rmds"))]
        return torch.cat(out).numpy() if out else np.empty(0)


def _log_norm(whiten: torch.Tensor) -> float:
    """−½ (r log 2π + log pdet Σ) from the whitening W (columns v/√λ, so ‖col‖ = 1/√λ)."""
    log_pdet = -2 * torch.log(whiten.norm(dim=0)).sum().item()
    return -0.5 * (whiten.shape[1] * math.log(2 * math.pi) + log_pdet)


def _fit_full(feats: Any, labels: torch.Tensor, c: int, shrinkage: float) -> list[ClassGaussian]:
    """One Gaussian per class (own covariance, ML estimate), streamed: per-class sums and
    C scatter matrices around a shift from the first chunk."""
    d = feats.shape[1]
    sums = torch.zeros(c, d, dtype=torch.float64)
    counts = torch.zeros(c, dtype=torch.float64)
    scatter = torch.zeros(c, d, d, dtype=torch.float64)
    shift = None
    for i, x in rows(feats):
        y = labels[i:i + len(x)].long().cpu()
        if shift is None:
            shift = x.mean(0)
        x = x - shift
        sums.index_add_(0, y, x)
        counts += torch.bincount(y, minlength=c).double()
        for k in y.unique().tolist():
            xk = x[y == k]
            scatter[k] += xk.T @ xk
    if shift is None or (counts == 0).any():
        raise OodbenchError("gmm needs at least one training sample of every class",
                            "check the in-distribution training split")
    out = []
    for k in range(c):
        m = sums[k] / counts[k]
        cov = scatter[k] / counts[k] - torch.outer(m, m)
        if shrinkage:
            cov = cov + shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=torch.float64)
        lam, vec = torch.linalg.eigh((cov + cov.T) / 2)
        keep = lam > lam.max().clamp_min(0) * d * torch.finfo(torch.float64).eps
        if not keep.any():
            raise OodbenchError(f"gmm: the features of class {k} are constant",
                                "use -p gmm.covariance=tied, or gmm.shrinkage > 0")
        out.append(ClassGaussian((m + shift)[None], vec[:, keep] / lam[keep].sqrt()))
    return out


@DETECTORS.register("gmm",
                    paper="class-conditional Gaussian mixture (Lee et al. 2018's generative view)")
class ClassGMM(_FeatureGaussian):
    """log Σ_c π_c N(x; μ_c, Σ_c) of the class-conditional Gaussian mixture (tied or full Σ)."""

    summary = "GMM: log-likelihood of the class-conditional Gaussian mixture of train features"
    hparams = {
        "covariance": HParam("tied", str, choices=("tied", "full"),
                             doc="one shared covariance (tied) or one per class (full)"),
        "shrinkage": HParam(0.0, float, ge=0, doc="covariance shrinkage α (Σ + α·tr(Σ)/D·I)"),
    }
    # covariance and shrinkage shape the fit itself: a search over them would refit on the
    # train split per point, which `select` (validation data only) cannot; set them with -p.
    grid: ClassVar[dict[str, list]] = {}

    def fit(self, train: DetectorInput) -> ClassGMM:
        feats = features_of(train, "gmm")
        c = num_classes(train)
        shrink = float(self.params["shrinkage"])
        counts = torch.bincount(train.labels.long().cpu(), minlength=c).double()
        self.log_prior = torch.log(counts / counts.sum())
        self.fit_params = (self.params["covariance"], shrink)
        if self.params["covariance"] == "tied":
            g = fit_class_gaussian(feats, train.labels, c, shrink)
            self.parts = [(g, torch.full((c,), _log_norm(g.whiten), dtype=torch.float64))]
        else:
            self.parts = [(g, torch.tensor([_log_norm(g.whiten)], dtype=torch.float64))
                          for g in _fit_full(feats, train.labels, c, shrink)]
        self.fitted = True
        return self

    def score(self, data: DetectorInput) -> np.ndarray:
        if self.fit_params != (self.params["covariance"], float(self.params["shrinkage"])):
            raise OodbenchError("gmm's covariance / shrinkage changed after fit",
                                "call fit() again after changing them")
        out = []
        for _, x in rows(features_of(data, "gmm")):
            logp = torch.cat([norm - 0.5 * g.distances(x) for g, norm in self.parts], dim=1)
            out.append(torch.logsumexp(logp + self.log_prior, dim=1))
        return torch.cat(out).numpy() if out else np.empty(0)
