"""Mahalanobis detectors (Lee et al., NeurIPS 2018).

Per layer: class means and ONE shared (tied) covariance of the spatially mean-pooled features of
the in-distribution training set; score = max_c −(x − μ_c)ᵀ Σ⁺ (x − μ_c).

- Statistics are accumulated in a streaming way (per-class sums and counts, one D×D scatter
  matrix, in float64, around a shift taken from the first chunk), so memory does not grow with
  N. Σ⁺ is the pseudo-inverse through an eigendecomposition (eigenvalues under D·eps·λ_max are
  dropped, as scipy's pinvh does); optional shrinkage Σ + α·tr(Σ)/D·I. Scores are computed in
  the whitened space z = xW (W Wᵀ = Σ⁺): one matmul per sample, then distances to C points.
- Optional input preprocessing (ε > 0): x̃ = x − ε·sign(∇ₓ d²_closest)/std, then the score at x̃
  (one forward + backward + forward per layer; needs the model). The fitted statistics live on
  the CPU and are moved to the input's device once (`ClassGaussian.on`), so CUDA inputs work.
- `mahalanobis`: one layer ("features" = the penultimate features, default, or a block name);
  with `selection` fgsm / ood, ε is chosen on a grid by validation AUROC.
- `mahalanobis-ensemble`: all blocks; the per-layer scores are combined with logistic-regression
  weights fitted on in-distribution validation samples vs FGSM-perturbed copies of them
  (default, no OOD data) or vs a user OOD validation set ("ood", only when asked). With ε = 0
  (default) scoring reads only the cached block summaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from oodbench.detectors.base import (
    DETECTORS,
    NO_BLOCKS_HINT,
    Detector,
    DetectorInput,
    HParam,
    selection_hparam,
)
from oodbench.detectors.gradients import (
    GRAD_BATCH,
    batched_forward,
    choose,
    input_grad,
    negatives,
    require_model,
    signed_step,
    subsample,
)
from oodbench.errors import OodbenchError
from oodbench.summaries import block_key

if TYPE_CHECKING:
    from oodbench.models.base import ModelOutput

CHUNK = 4096
EPS_GRID = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)  # Lee et al.'s grid
SELECTION_MODES = ("none", "fgsm", "ood")


@dataclass
class ClassGaussian:
    """Class means and the whitening of the shared covariance of one layer."""

    means: torch.Tensor  # C×D float64 (CPU)
    whiten: torch.Tensor  # D×k float64 (CPU), W Wᵀ = Σ⁺
    _on: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, whitened class means) on `device`: computed once on the CPU (the same numbers on
        every device), moved and cached per device, so a CUDA input meets CUDA statistics."""
        key = str(device)
        if key not in self._on:
            self._on[key] = (self.whiten.to(device), (self.means @ self.whiten).to(device))
        return self._on[key]

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances N×C (float64, on x's device; differentiable in x)."""
        w, m = self.on(x.device)
        z = x.double() @ w
        return ((z * z).sum(1, keepdim=True) - 2 * z @ m.T + (m * m).sum(1)).clamp_min(0)

    def scores(self, x: torch.Tensor) -> np.ndarray:
        out = [(-self.distances(x[i:i + CHUNK]).min(dim=1).values) for i in
               range(0, len(x), CHUNK)]
        return torch.cat(out).cpu().numpy()


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
    key = block_key(layer, "mean")
    if key not in data.blocks:
        have = [k.rsplit(".", 1)[0] for k in data.blocks if k.endswith(".mean")]
        _check_layer(layer, tuple(have))
        raise RuntimeError(f"{key} was not passed to the detector")
    return data.blocks[key]


def _check_layer(layer: str, block_names: tuple[str, ...]) -> None:
    if not block_names:
        raise OodbenchError("this model exposes no block outputs for Mahalanobis",
                            NO_BLOCKS_HINT + ", or layer=features")
    if layer not in block_names:
        raise OodbenchError(f"no block {layer!r} in this model",
                            f"choose from {list(block_names)}, or layer=features")


def _pooled(model: Any, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The layer's spatially mean-pooled output, differentiably."""
    if layer == "features":
        return model.backbone.forward_features(x)[0]
    return model.forward_all(x, taps=(layer,)).blocks[layer].mean(dim=(2, 3))


def _pooled_output(out: ModelOutput, layer: str) -> torch.Tensor:
    """The same as `_pooled`, read from a forward already run (with layer tapped)."""
    return out.features if layer == "features" else out.blocks[layer].mean(dim=(2, 3))


def preprocessed_batch(data: DetectorInput, x: torch.Tensor, pooled: torch.Tensor,
                       gauss: ClassGaussian, layer: str, epsilons: list[float]) -> np.ndarray:
    """len(ε) × B scores of one batch after the input step towards the closest class mean
    (Lee et al.); `pooled` = the layer's pooled output of x, computed with gradients."""
    g = None
    if any(epsilons):
        g = input_grad(gauss.distances(pooled).min(dim=1).values.sum(), x)
    out = np.empty((len(epsilons), len(x)))
    with torch.no_grad():
        for i, eps in enumerate(epsilons):
            z = _pooled(data.model, signed_step(data, x, g, eps), layer) if eps else pooled
            d = gauss.distances(z.detach().cpu())
            out[i] = (-d.min(dim=1).values).numpy()
    return out


def preprocessed_scores(data: DetectorInput, gauss: ClassGaussian, layer: str,
                        epsilons: list[float], batch_size: int = GRAD_BATCH) -> np.ndarray:
    """len(ε) × N scores after the input step (one gradient per batch for the whole ε list)."""
    require_model(data, "Mahalanobis preprocessing")
    taps = () if layer == "features" else (layer,)
    return batched_forward(data, taps, batch_size, lambda x, out: preprocessed_batch(
        data, x, _pooled_output(out, layer), gauss, layer, epsilons).T).T


def _num_classes(train: DetectorInput) -> int:
    if train.logits is not None:
        return int(train.logits.shape[1])
    return int(train.labels.max()) + 1


def _eps_hparam(doc: str) -> HParam:
    return HParam(0.0, float, ge=0, doc=doc)


COMMON = {
    "search_samples": HParam(1000, int, ge=1, doc="validation samples used by selection"),
    "shrinkage": HParam(0.0, float, ge=0, doc="covariance shrinkage α (Σ + α·tr(Σ)/D·I)"),
    "batch_size": HParam(GRAD_BATCH, int, ge=1, doc="samples per gradient batch"),
}
@DETECTORS.register("mahalanobis", paper="Lee et al., NeurIPS 2018")
class Mahalanobis(Detector):
    summary = "Mahalanobis: tied-covariance class Gaussians on one layer (layer=features)"
    needs = frozenset({"features"})
    requires_fit = True
    hparams = {
        "layer": HParam("features", str, doc="features (penultimate) or a block name"),
        "epsilon": _eps_hparam("input step in [0, 1] pixel units (0: no preprocessing)"),
        "selection": selection_hparam("none", SELECTION_MODES),
        "eps_grid": HParam(EPS_GRID, list, ge=0, doc="input steps tried by selection"),
        **COMMON,
    }
    selection_modes = SELECTION_MODES

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        needs = {"features"} if self.layer == "features" else {"blocks"}
        if self.params["epsilon"] or self.selection_mode != "none":
            needs.add("grad")
        self.needs = frozenset(needs)
        self.gauss: ClassGaussian | None = None

    @property
    def layer(self) -> str:
        return str(self.params["layer"])

    @property
    def uses_shared_forward(self) -> bool:
        return bool(self.params["epsilon"])  # read after `select`, which may choose ε > 0

    def required_outputs(self, block_names: tuple[str, ...]) -> frozenset[str]:
        if self.layer == "features":
            return frozenset({"features"})
        _check_layer(self.layer, block_names)
        return frozenset({block_key(self.layer, "mean")})

    def grad_taps(self, block_names: tuple[str, ...]) -> tuple[str, ...]:
        return () if self.layer == "features" else (self.layer,)

    def fit(self, train: DetectorInput) -> Mahalanobis:
        self.gauss = fit_class_gaussian(_layer_features(train, self.layer), train.labels,
                                        _num_classes(train), self.params["shrinkage"])
        self.fitted = True
        return self

    def _scores(self, data: DetectorInput, epsilons: list[float]) -> np.ndarray:
        assert self.gauss is not None
        if epsilons == [0.0]:
            return self.gauss.scores(_layer_features(data, self.layer))[None]
        return preprocessed_scores(data, self.gauss, self.layer, epsilons,
                                   self.params["batch_size"])

    def select(self, val: DetectorInput, ood_val: DetectorInput | None = None) -> None:
        mode = self.selection_mode
        if mode == "none":
            return
        n = self.params["search_samples"]
        val = subsample(val, n)
        neg = negatives(mode, val, None if ood_val is None else subsample(ood_val, n))
        assert neg is not None
        eps = list(self.params["eps_grid"])
        pos, negs = self._scores(val, eps), self._scores(neg, eps)
        best, table = choose({e: (pos[i], negs[i]) for i, e in enumerate(eps)}, mode)
        self.selected = {"epsilon": best}
        self.selection = {"mode": mode, "chosen": {"epsilon": best}, "criterion": "AUROC",
                          "validation": val.name, "n": len(val), "negatives": neg.name,
                          "table": table}

    def score_batch(self, x: torch.Tensor, out: ModelOutput, data: DetectorInput) -> np.ndarray:
        assert self.gauss is not None
        return preprocessed_batch(data, x, _pooled_output(out, self.layer), self.gauss,
                                  self.layer, [self.params["epsilon"]])[0]

    def score(self, data: DetectorInput) -> np.ndarray:
        if not self.uses_shared_forward:
            return self._scores(data, [0.0])[0]
        require_model(data, "Mahalanobis preprocessing")
        return batched_forward(data, self.grad_taps(data.block_names), self.params["batch_size"],
                               lambda x, out: self.score_batch(x, out, data))


@DETECTORS.register("mahalanobis-ensemble", paper="Lee et al., NeurIPS 2018")
class MahalanobisEnsemble(Detector):
    summary = ("Mahalanobis over every block, logistic-regression weights from in-dist vs "
               "FGSM samples")
    needs = frozenset({"blocks", "grad"})
    requires_fit = True
    hparams = {
        "epsilon": _eps_hparam("input step in [0, 1] pixel units (0: cached outputs only)"),
        "selection": selection_hparam("fgsm", SELECTION_MODES),
        **COMMON,
    }
    selection_modes = SELECTION_MODES
    validates_in_none_mode = True  # standardises the per-layer scores on validation data

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        grad = self.params["epsilon"] or self.selection_mode != "none"
        self.needs = frozenset({"blocks", "grad"} if grad else {"blocks"})
        self.layers: list[str] = []
        self.gauss: dict[str, ClassGaussian] = {}
        self.weights: np.ndarray | None = None  # per layer, on standardised scores
        self.bias = 0.0
        self.centre: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    @property
    def uses_shared_forward(self) -> bool:
        return bool(self.params["epsilon"])

    def required_outputs(self, block_names: tuple[str, ...]) -> frozenset[str]:
        if not block_names:
            _check_layer("?", block_names)  # raises the "no block outputs" error
        return frozenset(block_key(b, "mean") for b in block_names)

    def grad_taps(self, block_names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(self.layers or block_names) if self.uses_shared_forward else ()

    def fit(self, train: DetectorInput) -> MahalanobisEnsemble:
        have = [k.rsplit(".", 1)[0] for k in train.blocks if k.endswith(".mean")]
        self.layers = [b for b in train.block_names if b in have] or have
        if not self.layers:
            _check_layer("?", ())
        c = _num_classes(train)
        shrink = self.params["shrinkage"]
        self.gauss = {b: fit_class_gaussian(train.blocks[block_key(b, "mean")], train.labels, c,
                                            shrink) for b in self.layers}
        self.fitted = True
        self.weights = np.ones(len(self.layers))  # until `select` fits them
        return self

    def _layer_batch(self, x: torch.Tensor, out: ModelOutput, data: DetectorInput
                     ) -> np.ndarray:
        """B × layers per-layer scores of one batch after each layer's own input step."""
        eps = [self.params["epsilon"]]
        return np.stack([preprocessed_batch(data, x, _pooled_output(out, b), self.gauss[b], b,
                                            eps)[0] for b in self.layers], axis=1)

    def layer_scores(self, data: DetectorInput) -> np.ndarray:
        """N × layers matrix of per-layer Mahalanobis scores."""
        if self.uses_shared_forward:
            require_model(data, "Mahalanobis preprocessing")
            return batched_forward(data, tuple(self.layers), self.params["batch_size"],
                                   lambda x, out: self._layer_batch(x, out, data))
        return np.stack([self.gauss[b].scores(_layer_features(data, b)) for b in self.layers],
                        axis=1)

    def select(self, val: DetectorInput, ood_val: DetectorInput | None = None) -> None:
        from sklearn.linear_model import LogisticRegression

        mode = self.selection_mode
        n = self.params["search_samples"]
        val = subsample(val, n)
        pos = self.layer_scores(val)
        self.centre, self.scale = pos.mean(0), pos.std(0) + 1e-12
        if mode == "none":  # equal weights on standardised per-layer scores
            self.selection = {"mode": "none", "weights": "equal", "validation": val.name,
                              "n": len(val)}
            return
        neg_data = negatives(mode, val, None if ood_val is None else subsample(ood_val, n),
                             taps=tuple(self.layers))
        assert neg_data is not None
        neg = self.layer_scores(neg_data)
        x = (np.concatenate([pos, neg]) - self.centre) / self.scale
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        if not np.isfinite(x).all():
            raise OodbenchError("non-finite Mahalanobis scores on the validation data",
                                "try -p mahalanobis-ensemble.shrinkage=0.01")
        lr = LogisticRegression(max_iter=1000).fit(x, y)
        self.weights, self.bias = lr.coef_[0].astype(np.float64), float(lr.intercept_[0])
        self.selection = {"mode": mode, "criterion": "logistic regression (in-dist = 1)",
                          "validation": val.name, "n": len(val), "negatives": neg_data.name,
                          "weights": dict(zip(self.layers, self.weights.tolist(), strict=True))}

    def _combine(self, s: np.ndarray) -> np.ndarray:
        if self.centre is None:  # scored without `select`: equal weights, raw scale
            return s.sum(axis=1)
        assert self.weights is not None and self.scale is not None
        return ((s - self.centre) / self.scale) @ self.weights + self.bias

    def score_batch(self, x: torch.Tensor, out: ModelOutput, data: DetectorInput) -> np.ndarray:
        return self._combine(self._layer_batch(x, out, data))

    def score(self, data: DetectorInput) -> np.ndarray:
        return self._combine(self.layer_scores(data))
