"""Mahalanobis detectors (Lee et al., NeurIPS 2018).

Per layer: class means and ONE shared (tied) covariance of the spatially mean-pooled features of
the in-distribution training set; score = max_c −(x − μ_c)ᵀ Σ⁺ (x − μ_c).

- Statistics are accumulated in a streaming way (per-class sums and counts, one D×D scatter
  matrix, in float64, around a shift taken from the first chunk), so memory does not grow with
  N. Σ⁺ is the pseudo-inverse through an eigendecomposition (eigenvalues under D·eps·λ_max are
  dropped, as scipy's pinvh does); optional shrinkage Σ + α·tr(Σ)/D·I. Scores are computed in
  the whitened space z = xW (W Wᵀ = Σ⁺): one matmul per sample, then distances to C points.
- Optional input preprocessing (ε > 0): x̃ = x − ε·sign(∇ₓ d²_closest)/std, then the score at x̃
  (one forward + backward + forward per layer; needs the model).
- `mahalanobis`: one layer ("features" = the penultimate features, default, or a block name);
  with `selection` fgsm / ood, ε is chosen on a grid by validation AUROC.
- `mahalanobis-ensemble`: all blocks; the per-layer scores are combined with logistic-regression
  weights fitted on in-distribution validation samples vs FGSM-perturbed copies of them
  (default, no OOD data) or vs a user OOD validation set ("ood", only when asked). With ε = 0
  (default) scoring reads only the cached block summaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from oodbench.detectors.base import DETECTORS, Detector, DetectorInput
from oodbench.detectors.gradients import (
    GRAD_BATCH,
    choose,
    frozen,
    input_batches,
    input_gradient,
    negatives,
    require_model,
    signed_step,
    subsample,
)
from oodbench.errors import OodbenchError

CHUNK = 4096
EPS_GRID = [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01]  # Lee et al.'s grid


@dataclass
class ClassGaussian:
    """Class means and the whitening of the shared covariance of one layer."""

    means: torch.Tensor  # C×D float64
    whiten: torch.Tensor  # D×k float64, W Wᵀ = Σ⁺

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances N×C (float64; differentiable in x)."""
        z = x.double() @ self.whiten
        m = self.means @ self.whiten
        return ((z * z).sum(1, keepdim=True) - 2 * z @ m.T + (m * m).sum(1)).clamp_min(0)

    def scores(self, x: torch.Tensor) -> np.ndarray:
        out = [(-self.distances(x[i:i + CHUNK]).min(dim=1).values) for i in
               range(0, len(x), CHUNK)]
        return torch.cat(out).numpy()


def fit_class_gaussian(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       shrinkage: float = 0.0) -> ClassGaussian:
    """Streaming estimate over chunks of a (possibly memory-mapped) N×D tensor."""
    d = features.shape[1]
    sums = torch.zeros(num_classes, d, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    scatter = torch.zeros(d, d, dtype=torch.float64)
    shift = None
    for i in range(0, len(features), CHUNK):
        x = torch.as_tensor(np.asarray(features[i:i + CHUNK]), dtype=torch.float64)
        y = labels[i:i + CHUNK].long().cpu()
        if shift is None:
            shift = x.mean(0)
        x = x - shift
        sums.index_add_(0, y, x)
        counts += torch.bincount(y, minlength=num_classes).double()
        scatter += x.T @ x
    if shift is None or (counts == 0).any():
        raise OodbenchError("Mahalanobis needs at least one training sample of every class",
                            "check the in-distribution training split")
    centred_means = sums / counts[:, None]
    cov = (scatter - (centred_means.T * counts) @ centred_means) / counts.sum()
    if shrinkage:
        cov = cov + shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=torch.float64)
    lam, vec = torch.linalg.eigh((cov + cov.T) / 2)
    keep = lam > lam.max().clamp_min(0) * d * torch.finfo(torch.float64).eps
    if not keep.any():
        raise OodbenchError("the feature covariance is zero", "the features are constant")
    return ClassGaussian(centred_means + shift, vec[:, keep] / lam[keep].sqrt())


def _layer_features(data: DetectorInput, layer: str) -> torch.Tensor:
    if layer == "features":
        if data.features is None:
            raise RuntimeError("features were not passed to the detector")
        return data.features
    key = f"{layer}.mean"
    if key not in data.blocks:
        have = [k.rsplit(".", 1)[0] for k in data.blocks if k.endswith(".mean")]
        if not have:
            raise OodbenchError(
                "this model exposes no block outputs for Mahalanobis",
                "use a model with named blocks (smallcnn8, smallcnn28, resnet18...), or "
                "layer=features")
        raise OodbenchError(f"no block {layer!r} in this model", f"choose from {have}")
    return data.blocks[key]


def _pooled(model: Any, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The layer's spatially mean-pooled output, differentiably."""
    if layer == "features":
        return model.backbone.forward_features(x)[0]
    return model.forward_all(x, taps=(layer,)).blocks[layer].mean(dim=(2, 3))


def preprocessed_scores(data: DetectorInput, gauss: ClassGaussian, layer: str,
                        epsilons: list[float], batch_size: int = GRAD_BATCH) -> np.ndarray:
    """len(ε) × N scores after the input step towards the closest class mean (Lee et al.)."""
    require_model(data, "Mahalanobis preprocessing")
    model = data.model
    out = np.empty((len(epsilons), len(data)))
    with frozen(model):
        for sl, x in input_batches(data, batch_size):
            g = input_gradient(
                lambda z: gauss.distances(_pooled(model, z, layer)).min(dim=1).values.sum(), x)
            with torch.no_grad():
                for i, eps in enumerate(epsilons):
                    z = signed_step(data, x, g, eps) if eps else x
                    d = gauss.distances(_pooled(model, z, layer).cpu())
                    out[i, sl] = (-d.min(dim=1).values).numpy()
    return out


def _num_classes(train: DetectorInput) -> int:
    if train.logits is not None:
        return int(train.logits.shape[1])
    return int(train.labels.max()) + 1


@DETECTORS.register("mahalanobis")
class Mahalanobis(Detector):
    summary = "Mahalanobis: tied-covariance class Gaussians on one layer (layer=features)"
    needs = frozenset({"features"})
    requires_fit = True
    hparams: dict[str, Any] = {"layer": "features", "epsilon": 0.0, "selection": "none",
                               "eps_grid": EPS_GRID, "search_samples": 1000, "shrinkage": 0.0,
                               "batch_size": GRAD_BATCH}
    selection_modes = ("none", "fgsm", "ood")

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        needs = {"features"} if self.params["layer"] == "features" else {"blocks"}
        if float(self.params["epsilon"]) or self.selection_mode != "none":
            needs.add("grad")
        self.needs = frozenset(needs)
        self.gauss: ClassGaussian | None = None

    @property
    def scores_with_model(self) -> bool:
        return bool(float(self.params["epsilon"]))

    def fit(self, train: DetectorInput) -> Mahalanobis:
        layer = str(self.params["layer"])
        self.gauss = fit_class_gaussian(_layer_features(train, layer), train.labels,
                                        _num_classes(train), float(self.params["shrinkage"]))
        self.fitted = True
        return self

    def _scores(self, data: DetectorInput, epsilons: list[float]) -> np.ndarray:
        assert self.gauss is not None
        layer = str(self.params["layer"])
        if epsilons == [0.0]:
            return self.gauss.scores(_layer_features(data, layer))[None]
        return preprocessed_scores(data, self.gauss, layer, epsilons,
                                   int(self.params["batch_size"]))

    def select(self, val: DetectorInput, ood_val: DetectorInput | None = None) -> None:
        mode = self.selection_mode
        if mode == "none":
            return
        n = int(self.params["search_samples"])
        val = subsample(val, n)
        neg = negatives(mode, val, None if ood_val is None else subsample(ood_val, n))
        assert neg is not None
        eps = [float(e) for e in self.params["eps_grid"]]
        pos, negs = self._scores(val, eps), self._scores(neg, eps)
        best, table = choose({e: (pos[i], negs[i]) for i, e in enumerate(eps)}, mode)
        self.params["epsilon"] = best
        self.selection = {"mode": mode, "chosen": {"epsilon": best}, "criterion": "AUROC",
                          "validation": val.name, "n": len(val), "negatives": neg.name,
                          "table": table}

    def score(self, data: DetectorInput) -> np.ndarray:
        return self._scores(data, [float(self.params["epsilon"])])[0]


@DETECTORS.register("mahalanobis-ensemble")
class MahalanobisEnsemble(Detector):
    summary = ("Mahalanobis over every block, logistic-regression weights from in-dist vs "
               "FGSM samples")
    needs = frozenset({"blocks", "grad"})
    requires_fit = True
    hparams: dict[str, Any] = {"epsilon": 0.0, "selection": "fgsm", "search_samples": 1000,
                               "shrinkage": 0.0, "batch_size": GRAD_BATCH}
    selection_modes = ("none", "fgsm", "ood")

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        grad = float(self.params["epsilon"]) or self.selection_mode != "none"
        self.needs = frozenset({"blocks", "grad"} if grad else {"blocks"})
        self.layers: list[str] = []
        self.gauss: dict[str, ClassGaussian] = {}
        self.weights: np.ndarray | None = None  # per layer, on standardised scores
        self.bias = 0.0
        self.centre: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    @property
    def scores_with_model(self) -> bool:
        return bool(float(self.params["epsilon"]))

    def fit(self, train: DetectorInput) -> MahalanobisEnsemble:
        self.layers = [k.rsplit(".", 1)[0] for k in train.blocks if k.endswith(".mean")]
        if not self.layers:
            _layer_features(train, "?")  # raises the "no block outputs" error
        c = _num_classes(train)
        shrink = float(self.params["shrinkage"])
        self.gauss = {b: fit_class_gaussian(train.blocks[f"{b}.mean"], train.labels, c, shrink)
                      for b in self.layers}
        self.fitted = True
        self.weights = np.ones(len(self.layers))  # until `select` fits them
        return self

    def layer_scores(self, data: DetectorInput) -> np.ndarray:
        """N × layers matrix of per-layer Mahalanobis scores."""
        eps = float(self.params["epsilon"])
        cols = []
        for b in self.layers:
            if eps:
                cols.append(preprocessed_scores(data, self.gauss[b], b, [eps],
                                                int(self.params["batch_size"]))[0])
            else:
                cols.append(self.gauss[b].scores(_layer_features(data, b)))
        return np.stack(cols, axis=1)

    def select(self, val: DetectorInput, ood_val: DetectorInput | None = None) -> None:
        from sklearn.linear_model import LogisticRegression

        mode = self.selection_mode
        n = int(self.params["search_samples"])
        val = subsample(val, n)
        pos = self.layer_scores(val)
        self.centre, self.scale = pos.mean(0), pos.std(0) + 1e-12
        if mode == "none":  # equal weights on standardised per-layer scores
            self.selection = {"mode": "none", "weights": "equal", "validation": val.name}
            return
        neg_data = negatives(mode, val, None if ood_val is None else subsample(ood_val, n),
                             taps=tuple(self.layers))
        assert neg_data is not None
        neg = self.layer_scores(neg_data)
        x = (np.concatenate([pos, neg]) - self.centre) / self.scale
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        if not np.isfinite(x).all():
            raise OodbenchError("non-finite Mahalanobis scores on the validation data",
                                "try shrinkage=0.01")
        lr = LogisticRegression(max_iter=1000).fit(x, y)
        self.weights, self.bias = lr.coef_[0].astype(np.float64), float(lr.intercept_[0])
        self.selection = {"mode": mode, "criterion": "logistic regression (in-dist = 1)",
                          "validation": val.name, "n": len(val), "negatives": neg_data.name,
                          "weights": dict(zip(self.layers, self.weights.tolist(), strict=True))}

    def score(self, data: DetectorInput) -> np.ndarray:
        s = self.layer_scores(data)
        if self.centre is None:  # scored without `select`: equal weights, raw scale
            return s.sum(axis=1)
        assert self.weights is not None and self.scale is not None
        return ((s - self.centre) / self.scale) @ self.weights + self.bias
