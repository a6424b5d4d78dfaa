"""Detectors that compare a sample with per-class templates stored from the train set.

- `she` (Zhang et al., "Out-of-Distribution Detection based on In-Distribution Data Patterns
  Memorization with Modern Hopfield Energy", ICLR 2023), the simplified Hopfield energy:
  patterns S_c = mean penultimate feature of the train samples of class c that the model
  classifies correctly; score(x) = ⟨f(x), S_ŷ(x)⟩ with ŷ = argmax logits (OpenOOD's
  "inner_product" metric). A class with no correctly classified sample falls back to the mean
  of all its samples. No hyperparameter.
- `kl-matching` (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
  Settings", ICML 2022): templates d_k = mean softmax p(·|x) of the train samples PREDICTED as
  class k; score(x) = −min_k KL[p(·|x) ‖ d_k], KL[p‖q] = Σ_j p_j log(p_j / q_j). The paper
  builds templates on held-out data; here on the train split (the only data `fit` sees).
  Classes never predicted have no template and are skipped. The softmax uses logits / T, the
  run's temperature (1 unless calibrated), for templates and queries alike.
- `openmax` (Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016), on the logits as
  activation vectors (AV): mean AV μ_c of the correctly classified train samples of class c;
  per class, a Weibull fitted to the `tail` largest distances ‖AV − μ_c‖ of those samples
  (EVT "fit high"). At test time, for the α top-ranked classes s(1..α) of v = AV(x):
  ω_s(i) = 1 − (α − i + 1)/α · W_s(i)(dist(v, μ_s(i))), ω = 1 elsewhere;
  v̂_c = v_c ω_c, v̂_0 = Σ_c v_c (1 − ω_c); OpenMax P = softmax(v̂_0, v̂_1, …, v̂_C).
  Score = max_c P(c) over the known classes (the paper rejects when the unknown class wins or
  max P < ε; this is the continuous form of that rule). Defaults from OpenOOD's CIFAR
  implementation: α = 3, tail = 20, Euclidean distance ("eucos" = ‖·‖/200 + cosine distance,
  the paper's ImageNet code, is a choice). Weibull: scipy's weibull_min maximum-likelihood fit
  with location 0 (distances are ≥ 0), where libMR shifts the tail by a fixed translation; W is
  its CDF. `fit` reads `tail` and `distance`; α is used at scoring. α > C is clamped to C.

All three read logits (no linear head): they apply to prototype heads, whose logits are
negative distances, unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from oodbench.detectors.base import DETECTORS, Detector, DetectorInput, HParam
from oodbench.detectors.streaming import features_of, logits_of, num_classes, rows
from oodbench.errors import OodbenchError


def _logit_rows(data: DetectorInput, who: str) -> Any:
    return rows(logits_of(data, who))


@DETECTORS.register("she", paper="Zhang et al., ICLR 2023 (SHE)")
class SHE(Detector):
    """⟨f(x), mean correct-train feature of the predicted class⟩ (Zhang et al. 2023)."""

    summary = "SHE: inner product with the stored pattern of the predicted class"
    needs = frozenset({"logits", "features"})
    requires_fit = True
    applies_to_prototype_heads: ClassVar[bool | str] = True
    grid: ClassVar[dict[str, list]] = {}

    def fit(self, train: DetectorInput) -> SHE:
        feats, logits = features_of(train, "she"), logits_of(train, "she")
        c, d = num_classes(train), feats.shape[1]
        sums = torch.zeros(2, c, d, dtype=torch.float64)  # [0]: correct only, [1]: all
        counts = torch.zeros(2, c, dtype=torch.float64)
        for i, x in rows(feats):
            y = train.labels[i:i + len(x)].long().cpu()
            pred = torch.as_tensor(np.asarray(logits[i:i + len(x)])).argmax(1)
            ok = pred == y
            sums[0].index_add_(0, y[ok], x[ok])
            counts[0] += torch.bincount(y[ok], minlength=c).double()
            sums[1].index_add_(0, y, x)
            counts[1] += torch.bincount(y, minlength=c).double()
        if (counts[1] == 0).any():
            raise OodbenchError("she needs at least one training sample of every class",
                                "check the in-distribution training split")
        use = (counts[0] > 0).long()  # correct-only where there are any
        idx = torch.arange(c)
        self.patterns = sums[1 - use, idx] / counts[1 - use, idx][:, None]
        self.fitted = True
        return self

    def score(self, data: DetectorInput) -> np.ndarray:
        logits = logits_of(data, "she")
        out = []
        for i, x in rows(features_of(data, "she")):
            pred = torch.as_tensor(np.asarray(logits[i:i + len(x)])).argmax(1)
            out.append((x * self.patterns[pred]).sum(1))
        return torch.cat(out).numpy() if out else np.empty(0)


@DETECTORS.register("kl-matching", paper="Hendrycks et al., ICML 2022 (KL matching)")
class KLMatching(Detector):
    """−min_k KL[softmax(x) ‖ mean train softmax of class-k predictions] (Hendrycks 2022)."""

    summary = "KL matching: minus the KL divergence to the closest class-mean softmax template"
    needs = frozenset({"logits"})
    requires_fit = True
    applies_to_prototype_heads: ClassVar[bool | str] = True
    grid: ClassVar[dict[str, list]] = {}

    def fit(self, train: DetectorInput) -> KLMatching:
        c = num_classes(train)
        sums = torch.zeros(c, c, dtype=torch.float64)
        counts = torch.zeros(c, dtype=torch.float64)
        for _, z in _logit_rows(train, "kl-matching"):
            p = torch.softmax(z / train.temperature, dim=1)
            pred = p.argmax(1)
            sums.index_add_(0, pred, p)
            counts += torch.bincount(pred, minlength=c).double()
        seen = counts > 0
        if not seen.any():
            raise OodbenchError("kl-matching needs training samples", "check the train split")
        self.log_templates = torch.log((sums[seen] / counts[seen][:, None]).clamp_min(
            torch.finfo(torch.float64).tiny))
        self.fitted = True
        return self

    def score(self, data: DetectorInput) -> np.ndarray:
        out = []
        for _, z in _logit_rows(data, "kl-matching"):
            log_p = torch.log_softmax(z / data.temperature, dim=1)
            p = log_p.exp()
            kl = (p * log_p).sum(1, keepdim=True) - p @ self.log_templates.T
            out.append(-kl.min(1).values)
        return torch.cat(out).numpy() if out else np.empty(0)


def _distances(v: torch.Tensor, means: torch.Tensor, kind: str) -> torch.Tensor:
    """N×C distances between activation vectors and class means ("euclidean" or "eucos")."""
    eu = torch.cdist(v, means)
    if kind == "euclidean":
        return eu
    cos = torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(
        means, dim=1).T
    return eu / 200 + (1 - cos)


@DETECTORS.register("openmax", paper="Bendale & Boult, CVPR 2016 (OpenMax)")
class OpenMax(Detector):
    """Max known-class OpenMax probability: top-α logits recalibrated by per-class Weibull CDFs
    of the distance to the class mean AV (Bendale & Boult 2016)."""

    summary = "OpenMax: max known-class probability after Weibull (EVT) recalibration"
    needs = frozenset({"logits"})
    requires_fit = True
    applies_to_prototype_heads: ClassVar[bool | str] = True
    hparams = {
        "alpha": HParam(3, int, ge=1, doc="top-ranked classes recalibrated (OpenOOD: 3; paper "
                                          "10 for ImageNet)"),
        "tail": HParam(20, int, ge=2, doc="largest train distances per class fitted (Weibull)"),
        "distance": HParam("euclidean", str, choices=("euclidean", "eucos"),
                           doc="AV-to-mean distance (eucos: euclidean/200 + cosine)"),
    }
    # `tail` shapes the Weibull fit (set it with -p); alpha only re-weights at scoring
    grid: ClassVar[dict[str, list]] = {"alpha": [1, 2, 3, 5, 10]}

    def fit(self, train: DetectorInput) -> OpenMax:
        from scipy.stats import weibull_min

        logits = logits_of(train, "openmax")
        c = num_classes(train)
        tail, kind = int(self.params["tail"]), str(self.params["distance"])
        sums = torch.zeros(2, c, c, dtype=torch.float64)  # [0]: correct only, [1]: all
        counts = torch.zeros(2, c, dtype=torch.float64)
        for i, v in rows(logits):
            y = train.labels[i:i + len(v)].long().cpu()
            ok = v.argmax(1) == y
            sums[0].index_add_(0, y[ok], v[ok])
            counts[0] += torch.bincount(y[ok], minlength=c).double()
            sums[1].index_add_(0, y, v)
            counts[1] += torch.bincount(y, minlength=c).double()
        if (counts[1] == 0).any():
            raise OodbenchError("openmax needs at least one training sample of every class",
                                "check the in-distribution training split")
        correct_only = counts[0] > 0  # classes without a correct sample use all of theirs
        idx = torch.arange(c)
        use = 1 - correct_only.long()
        self.means = sums[use, idx] / counts[use, idx][:, None]
        # running per-class top-`tail` distances (memory C × tail)
        top = torch.full((c, tail), -torch.inf, dtype=torch.float64)
        for i, v in rows(logits):
            y = train.labels[i:i + len(v)].long().cpu()
            keep = (v.argmax(1) == y) | ~correct_only[y]
            v, y = v[keep], y[keep]
            d = _distances(v, self.means, kind).gather(1, y[:, None])[:, 0]
            for k in y.unique().tolist():
                top[k] = torch.cat([top[k], d[y == k]]).topk(tail).values
        self.weibull = []
        for k in range(c):
            t = top[k][torch.isfinite(top[k])].numpy()
            if len(t) < 2 or np.ptp(t) == 0:  # degenerate tail: a step at its value
                self.weibull.append((np.inf, float(t.max()) if len(t) else 0.0))
                continue
            shape, _, scale = weibull_min.fit(t, floc=0)
            self.weibull.append((float(shape), float(scale)))
        self.fit_params = (tail, kind)
        self.fitted = True
        return self

    def weibull_cdf(self, d: torch.Tensor) -> torch.Tensor:
        """N×C: W_c(d[:, c]) = 1 − exp(−(d / scale_c)^shape_c)."""
        shape = torch.tensor([s for s, _ in self.weibull], dtype=torch.float64)
        scale = torch.tensor([max(s, 1e-300) for _, s in self.weibull], dtype=torch.float64)
        step = torch.isinf(shape)
        ratio = d.clamp_min(0) / scale
        w = -torch.expm1(-ratio.pow(torch.where(step, torch.ones_like(shape), shape)))
        return torch.where(step, (ratio >= 1).double(), w)

    def probabilities(self, v: torch.Tensor) -> torch.Tensor:
        """N×(C+1) OpenMax probabilities, the unknown class LAST."""
        c = v.shape[1]
        alpha = min(int(self.params["alpha"]), c)
        ranks = v.argsort(dim=1, descending=True)[:, :alpha]
        weights = torch.zeros_like(v)
        weights.scatter_(1, ranks, ((alpha - torch.arange(alpha, dtype=v.dtype)) / alpha)
                         .expand(len(v), alpha))
        omega = 1 - weights * self.weibull_cdf(_distances(v, self.means, self.fit_params[1]))
        vhat = v * omega
        unknown = (v * (1 - omega)).sum(1, keepdim=True)
        return torch.softmax(torch.cat([vhat, unknown], dim=1), dim=1)

    def score(self, data: DetectorInput) -> np.ndarray:
        if self.fit_params != (int(self.params["tail"]), str(self.params["distance"])):
            raise OodbenchError("openmax's tail / distance changed after fit",
                                "call fit() again after changing them")
        out = [self.probabilities(v)[:, :-1].max(1).values
               for _, v in _logit_rows(data, "openmax")]
        return torch.cat(out).numpy() if out else np.empty(0)
