"""Post-hoc detectors that reshape the penultimate features (or read the classifier's geometry)
and score with the linear head: logits are recomputed as z = f Wᵀ + b from the cached features
f (N×D, after global pooling) and the head (W: C×D, b: C), in float64, chunk by chunk.

Activation shaping, then the energy logsumexp(z) (Liu et al. 2020, T = 1):
- `react` (Sun, Guo & Li, NeurIPS 2021): f̄ = min(f, c), c = the p-th percentile of the TRAIN
  activations (all N×D values), p = 90 (paper and OpenOOD).
- `vra` (Xu, Lian, Liu & Tao, NeurIPS 2023, VRA-P, the piecewise form of the variational
  rectified activation): g(f) = 0 if f < α, f + γ if α ≤ f ≤ β, β if f > β; α, β = the
  p_low-th / p_high-th percentiles of the train activations. Defaults p_low = 10, p_high = 90
  (OpenOOD's CIFAR config) and γ = 0. NOTE: OpenOOD implements VRA as the two-sided clip
  clamp(f, α, β); this is the paper's VRA-P form (values below α are zeroed, not raised to α).
- `bfact` (Kong & Li 2022, BFAct): the Butterworth-filter rectified activation
  g(f) = f / sqrt(1 + (f / T)^(2n)), T = the p-th percentile of the train activations (p = 90,
  ReAct's threshold), order n = 2. n = 1 is a smooth ReAct (g → T); n > 1 decays above T. The
  paper's CIFAR defaults could not be checked here: the grid covers p ∈ {80..99}, n ∈ {1..4}.
- `ash-p`, `ash-b`, `ash-s` (Djurisic, Bozanic, Ashok & Liu, ICLR 2023), per sample, on the
  PENULTIMATE POOLED vector (the cache holds no feature maps; the paper applies ASH before the
  pooling of ResNets): keep the k = D − round(D·p/100) largest activations (k ≥ 1), p = 90
  (OpenOOD's ash.yml, used for its CIFAR benchmarks; the paper tunes p per model).
  ASH-P zeroes the others; ASH-B sets the k kept ones to s1/k and the others to 0
  (s1 = Σ f); ASH-S zeroes the others and multiplies the kept ones by exp(s1 / s2),
  s2 = the sum of the kept ones.
- `scale` (Xu, Chen, Franchi & Yao, ICLR 2024, SCALE): f · exp(s1 / s2), s1 = Σ f, s2 = the
  sum of the k largest activations (k as in ASH), p = 85 (OpenOOD's scale.yml). No pruning.
- `lts` (Djurisic, Liu & Nikolić, "Logit Scaling for Out-of-Distribution Detection", arXiv
  2409.01175, 2024): a = max(f, 0), s1 = Σ a, s2 = the sum of the k largest a (k as in ASH,
  p = 95: the authors' CIFAR config `lts@95`), S = (s1 / s2)²; score = logsumexp(S · z) with z
  the model's own logits (the cached ones, T = 1), as the authors' `lts.py` + `get_score(logits
  * s)`. The ReLU is theirs (a no-op on post-ReLU pooled features); S = 1 when s2 = 0. No train
  statistics, no W, b: it reads logits and features only, so it applies to prototype heads too
  (their logits are scaled the same way).
- `dice` (Sun & Li, ECCV 2022): contributions V = W ⊙ μ (C×D), μ = the mean train feature;
  keep the weights whose contribution exceeds the p-th percentile of V (p = 90: the top 10%),
  z = f (W ⊙ M)ᵀ + b.

Classifier-geometry and logit scores:
- `gradnorm` (Huang, Geng & Li, NeurIPS 2021), in closed form: the loss is the KL divergence
  (cross-entropy up to a constant) between the uniform u = 1/C and softmax(z / T); its
  gradient w.r.t. the logits is (p − u) / T, so ∂L/∂W = (p − u) fᵀ / T and
  ‖∂L/∂W‖₁ = ‖p − u‖₁ · ‖f‖₁ / T (an outer product's entrywise L1 norm factorises).
  The paper scores the weight gradient only; `include_bias` adds ‖∂L/∂b‖₁ = ‖p − u‖₁ / T.
  T = 1 (paper). No backward pass is run.
- `fdbd` (Liu & Qin, ICML 2024): mean over c ≠ ĉ of the distance of f to the decision
  boundary of (ĉ, c), |z_ĉ − z_c| / ‖w_ĉ − w_c‖₂, divided by ‖f − μ‖₂ (μ = mean train feature;
  `distance_as_normalizer`, OpenOOD's default).
- `nci` (Liu & Qin, "Detecting out-of-distribution through the lens of neural collapse",
  arXiv 2311.01479, CVPR 2025):
  w_ĉ · (f − μ) / ‖f − μ‖₂ + α ‖f‖₁, μ = mean train feature, ĉ = the predicted class,
  α = 1e-4 (OpenOOD's nci.yml). As in the authors' OpenOOD code, the proximity is not
  divided by ‖w_ĉ‖.
- `gen` (Liu, Lochman & Zach, CVPR 2023): −Σ_{j ≤ min(M, C)} p_(j)^γ (1 − p_(j))^γ over the
  M largest softmax probabilities, γ = 0.1, M = 100 (paper / OpenOOD); the softmax sees
  logits / T (the run's calibrated temperature, as every score in logit_scores.py). Reads
  the logits only, so it applies to every head.
- `neco` (Ammar, Belkhir, Popescu, Manzanera & Franchi, ICLR 2024): features standardised with
  the train mean and std (the reference code's StandardScaler), P_d = the d leading principal
  directions of the standardised train features; score ‖P_dᵀ z‖₂ / ‖z‖₂, times the max logit
  when `use_max_logit` (the paper does so for transformers, not for ResNets: default off).
  d = 0 (default) picks the smallest d explaining 90% of the train variance (the paper's rule
  of thumb); larger d are clamped to D. Reads features (and logits), not the head.

Train statistics are streamed over chunks of CHUNK rows (memory does not grow with N):
- means and the scatter matrix (dice, fdbd, nci, neco) are accumulated in float64;
- percentiles over all N×D train activations (react, vra, bfact) are read from a fixed-size
  uniform sample of them (ACTIVATION_SAMPLE values, bottom-k of seeded uniform keys, i.e. a
  seeded reservoir): exact when N·D ≤ ACTIVATION_SAMPLE, otherwise a uniform subsample (the
  percentile's standard error is then about sqrt(q(1−q)/K) in quantile units, < 0.0003 for
  K = 10⁶). np.percentile's linear interpolation, as in the ReAct / OpenOOD code. The sample
  is kept, so every percentile of a selection grid is read without another pass.

Selection grids (`grid`, searched by the generic `Detector.select` on cached outputs):
react percentile {80, 85, 90, 95, 99}; vra percentile_high {85, 90, 95, 99} × percentile_low
{1, 5, 10, 15} (OpenOOD's sweep); bfact percentile {80..99} × order {1..4}; ash-* and scale
percentile {65, 70, ..., 95} (OpenOOD's sweep; lts the same, its default 95
included); dice p {10, 30, 50, 70, 90}; fdbd
distance_as_normalizer {true, false}; nci alpha {1e-4, 1e-3, 1e-2, 1e-1}; gen gamma
{0.01, 0.1, 0.5, 1}; neco d {0 (auto), 4, 8, ..., 128}. gradnorm has none (T = 1 is the paper's).

Heads: every detector that reads W, b refuses a prototype head (IsoMax, IsoMax+, DisMax) with
NotApplicable: their logits are (scaled, possibly normalised) distances to prototypes, there is
no W, b to recompute logits from, reweight, or measure hyperplane boundaries with.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from oodbench.detectors.base import (
    DETECTORS,
    Detector,
    DetectorInput,
    HParam,
    NotApplicable,
    grid_selection_hparams,
)
from oodbench.errors import OodbenchError

CHUNK = 4096  # rows per chunk when streaming train statistics and scores
ACTIVATION_SAMPLE = 1_000_000  # train activations kept for percentiles (see module docstring)
SAMPLE_SEED = 0
NECO_VARIANCE = 0.9  # d = 0: smallest d explaining this share of the train variance

_LINEAR_ONLY = ("{what}; this model's head is a distance to prototypes (IsoMax / IsoMax+ / "
                "DisMax), with no W, b")


def rows(x: Any) -> Iterator[torch.Tensor]:
    """Float64 CPU chunks of CHUNK rows of a (possibly memory-mapped) N×D array or tensor."""
    for i in range(0, len(x), CHUNK):
        yield torch.tensor(np.asarray(x[i:i + CHUNK]), dtype=torch.float64)  # a copy


def _features(data: DetectorInput) -> Any:
    if data.features is None:
        raise RuntimeError(f"features of {data.name!r} were not passed to the detector")
    return data.features


def activation_sample(features: Any, size: int | None = None, seed: int = SAMPLE_SEED
                      ) -> np.ndarray:
    """A sorted uniform sample (without replacement) of at most `size` of all N×D values:
    each value gets a seeded uniform key and the `size` smallest keys are kept, chunk by chunk
    (memory: size + one chunk). All values, exactly, when N·D ≤ size."""
    size = ACTIVATION_SAMPLE if size is None else size
    g = torch.Generator().manual_seed(seed)
    vals = torch.empty(0, dtype=torch.float64)
    keys = torch.empty(0, dtype=torch.float64)
    for x in rows(features):
        v = x.reshape(-1)
        vals = torch.cat([vals, v])
        keys = torch.cat([keys, torch.rand(v.numel(), generator=g, dtype=torch.float64)])
        if len(vals) > size:
            keep = torch.topk(keys, size, largest=False).indices
            vals, keys = vals[keep], keys[keep]
    if not len(vals):
        raise OodbenchError("no training features to fit on", "check the training split")
    return np.sort(vals.numpy())


def feature_moments(features: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, scatter Σ (f − mean)(f − mean)ᵀ, N), streamed in float64 around a shift."""
    total = scatter = shift = None
    n = 0
    for x in rows(features):
        if shift is None:
            shift = x.mean(0)
            total = torch.zeros_like(shift)
            scatter = torch.zeros(len(shift), len(shift), dtype=torch.float64)
        x = x - shift
        total += x.sum(0)
        scatter += x.T @ x
        n += len(x)
    if shift is None or total is None or scatter is None:
        raise OodbenchError("no training features to fit on", "check the training split")
    centred = total / n
    return centred + shift, scatter - n * torch.outer(centred, centred), n


def feature_mean(features: Any) -> torch.Tensor:
    """The mean train feature (D,), streamed in float64."""
    total, n = None, 0
    for x in rows(features):
        total = x.sum(0) if total is None else total + x.sum(0)
        n += len(x)
    if total is None:
        raise OodbenchError("no training features to fit on", "check the training split")
    return total / n


def energy(z: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z, dim=1)


def kept(d: int, percentile: float) -> int:
    """ASH / SCALE: the number of activations above the p-th percentile, at least 1."""
    return max(1, d - int(np.round(d * percentile / 100.0)))


def _percent(doc: str, default: float) -> HParam:
    return HParam(default, float, ge=0, le=100, doc=doc)


class _HeadDetector(Detector):
    """Reads the linear head; refuses a prototype head. Scores chunk by chunk."""

    needs = frozenset({"features", "head"})
    applies_to_prototype_heads = False
    what = "it recomputes the logits with the linear head's W, b"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.prototype_head_reason = _LINEAR_ONLY.format(what=cls.what)

    def fit(self, train: DetectorInput) -> Detector:
        self.check_head(train.head)  # refuse before a pass over the train set
        self.fit_statistics(train)
        self.fitted = True
        return self

    def fit_statistics(self, train: DetectorInput) -> None:
        """Train statistics (streamed); nothing by default."""

    def chunk_scores(self, f: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                     ) -> torch.Tensor:
        raise NotImplementedError

    def score(self, data: DetectorInput) -> np.ndarray:
        w, b = self.linear_head(data)
        parts = [self.chunk_scores(f, w, b) for f in rows(_features(data))]
        return torch.cat(parts).numpy() if parts else np.empty(0)


class _ShapedEnergy(_HeadDetector):
    """energy(shape(f) Wᵀ + b)."""

    def shape(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def chunk_scores(self, f: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                     ) -> torch.Tensor:
        return energy(self.shape(f) @ w.T + b)


class _TrainPercentiles(_ShapedEnergy):
    """Shaping with thresholds at percentiles of the train activations (a kept sample)."""

    requires_fit = True

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.sample: np.ndarray | None = None
        self._thresholds: dict[float, float] = {}

    def fit_statistics(self, train: DetectorInput) -> None:
        self.sample = activation_sample(_features(train))
        self._thresholds = {}

    def threshold(self, percentile: float) -> float:
        """The percentile of the kept train activations (memoised: grid points reuse it)."""
        assert self.sample is not None, "fit first"
        if percentile not in self._thresholds:
            self._thresholds[percentile] = float(np.percentile(self.sample, percentile))
        return self._thresholds[percentile]


@DETECTORS.register("react", paper="Sun, Guo & Li, NeurIPS 2021 (ReAct)")
class ReAct(_TrainPercentiles):
    summary = "ReAct: features clipped at the 90th train percentile, then energy"
    hparams = {"percentile": _percent("clip at this percentile of the train activations", 90.0),
               **grid_selection_hparams()}
    grid = {"percentile": [80.0, 85.0, 90.0, 95.0, 99.0]}
    what = "ReAct recomputes the logits of clipped features with the linear head's W, b"

    def shape(self, f: torch.Tensor) -> torch.Tensor:
        return f.clamp(max=self.threshold(self.params["percentile"]))


@DETECTORS.register("vra", paper="Xu, Lian, Liu & Tao, NeurIPS 2023 (VRA)")
class VRA(_TrainPercentiles):
    summary = "VRA-P: zero below the 10th, clip above the 90th train percentile, then energy"
    hparams = {
        "percentile_low": _percent("α: activations below this train percentile are zeroed", 10.0),
        "percentile_high": _percent("β: activations above this train percentile are clipped",
                                    90.0),
        "gamma": HParam(0.0, float, ge=0, doc="γ added to the activations kept in [α, β]"),
        **grid_selection_hparams(),
    }
    grid = {"percentile_high": [85.0, 90.0, 95.0, 99.0], "percentile_low": [1.0, 5.0, 10.0, 15.0]}
    what = "VRA recomputes the logits of rectified features with the linear head's W, b"

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        p = self.params
        if p["percentile_low"] >= p["percentile_high"]:
            raise OodbenchError("vra.percentile_low must be below vra.percentile_high",
                                "e.g. -p vra.percentile_low=10 -p vra.percentile_high=90")

    def shape(self, f: torch.Tensor) -> torch.Tensor:
        p = self.params
        lo, hi = self.threshold(p["percentile_low"]), self.threshold(p["percentile_high"])
        mid = torch.where(f < lo, torch.zeros_like(f), f + p["gamma"])
        return torch.where(f > hi, torch.full_like(f, hi), mid)


@DETECTORS.register("bfact", paper="Kong & Li, 2022 (BFAct)")
class BFAct(_TrainPercentiles):
    summary = "BFAct: Butterworth-filter bounded activations (T = 90th train percentile), energy"
    hparams = {"percentile": _percent("T at this percentile of the train activations", 90.0),
               "order": HParam(2, int, ge=1, doc="Butterworth order n"),
               **grid_selection_hparams()}
    grid = {"percentile": [80.0, 85.0, 90.0, 95.0, 99.0], "order": [1, 2, 3, 4]}
    what = "BFAct recomputes the logits of filtered features with the linear head's W, b"

    def fit_statistics(self, train: DetectorInput) -> None:
        """The filter bounds non-negative (post-ReLU) activations by a positive T: on features
        with no positive train value (a log-softmax network's) no percentile gives a T > 0."""
        super().fit_statistics(train)
        assert self.sample is not None
        if self.sample.size and float(self.sample.max()) <= 0:
            raise NotApplicable("bfact", "its Butterworth filter needs non-negative (post-ReLU) "
                                "penultimate features; this model's are all <= 0 (e.g. a "
                                "log-softmax network)")

    def shape(self, f: torch.Tensor) -> torch.Tensor:
        t = self.threshold(self.params["percentile"])
        if t <= 0:
            raise OodbenchError(f"bfact: the train activations' threshold is {t:g} (<= 0)",
                                "choose a higher -p bfact.percentile")
        return f / torch.sqrt(1 + (f / t) ** (2 * self.params["order"]))


class _PerSample(_ShapedEnergy):
    hparams = {"percentile": _percent("per-sample percentile of the activations kept above",
                                      90.0),
               **grid_selection_hparams()}
    grid = {"percentile": [65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0]}  # OpenOOD's sweep

    def top(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mask of the k largest activations per row, s1 = row sums, k)."""
        k = kept(f.shape[1], self.params["percentile"])
        idx = torch.topk(f, k, dim=1).indices
        mask = torch.zeros_like(f, dtype=torch.bool).scatter_(1, idx, True)
        return mask, f.sum(1, keepdim=True), k


@DETECTORS.register("ash-p", paper="Djurisic et al., ICLR 2023 (ASH)")
class ASHP(_PerSample):
    summary = "ASH-P: keep the top 10% of each feature vector, zero the rest, energy"
    what = "ASH recomputes the logits of shaped features with the linear head's W, b"

    def shape(self, f: torch.Tensor) -> torch.Tensor:
        mask, _, _ = self.top(f)
        return torch.where(mask, f, torch.zeros_like(f))


@DETECTORS.register("ash-b", paper="Djurisic et al., ICLR 2023 (ASH)")
class ASHB(_PerSample):
    summary = "ASH-B: top 10% set to (sum of the features)/k, the rest 0, energy"
    what = "ASH recomputes the logits of shaped features with the linear head's W, b"

    def shape(self, f: torch.Tensor) -> torch.Tensor:
        mask, s1, k = self.top(f)
        return torch.where(mask, (s1 / k).expand_as(f), torch.zeros_like(f))


@DETECTORS.register("ash-s", paper="Djurisic et al., ICLR 2023 (ASH)")
class ASHS(_PerSample):
    summary = "ASH-S: top 10% scaled by exp(sum all / sum kept), the rest 0, energy"
    what = "ASH recomputes the logits of shaped features with the linear head's W, b"

    def shape(self, f: torch.Tensor) -> torch.Tensor:
        mask, s1, _ = self.top(f)
        pruned = torch.where(mask, f, torch.zeros_like(f))
        s2 = pruned.sum(1, keepdim=True)
        ratio = torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, 1.0), 1.0)
        return pruned * torch.exp(ratio)


@DETECTORS.register("scale", paper="Xu, Chen, Franchi & Yao, ICLR 2024 (SCALE)")
class SCALE(_PerSample):
    summary = "SCALE: features times exp(sum all / sum of the top 15%), energy"
    hparams = {"percentile": _percent("per-sample percentile of the activations in s2", 85.0),
               **grid_selection_hparams()}
    what = "SCALE recomputes the logits of scaled features with the linear head's W, b"

    def shape(self, f: torch.Tensor) -> torch.Tensor:
        mask, s1, _ = self.top(f)
        s2 = torch.where(mask, f, torch.zeros_like(f)).sum(1, keepdim=True)
        ratio = torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, 1.0), 1.0)
        return f * torch.exp(ratio)


@DETECTORS.register("lts", paper="Djurisic, Liu & Nikolić, 2024 (LTS)")
class LTS(Detector):
    """Logit scaling: the logits times (Σ relu(f) / Σ its top (100 − p) %)², then energy."""

    summary = "LTS: logits times (sum of ReLU features / sum of their top 5%)², energy"
    needs = frozenset({"features", "logits"})
    hparams = {"percentile": _percent("per-sample percentile of the activations in s2", 95.0),
               **grid_selection_hparams()}
    grid = {"percentile": [65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0]}

    def factor(self, f: torch.Tensor) -> torch.Tensor:
        """S = (s1 / s2)² per row (1 where every activation is ≤ 0)."""
        a = f.clamp_min(0)
        s1 = a.sum(1)
        s2 = torch.topk(a, kept(a.shape[1], self.params["percentile"]), dim=1).values.sum(1)
        ok = s2 > 0
        return torch.where(ok, s1 / torch.where(ok, s2, 1.0), 1.0) ** 2

    def score(self, data: DetectorInput) -> np.ndarray:
        if data.logits is None:
            raise RuntimeError(f"logits of {data.name!r} were not passed to the detector")
        out = [energy(self.factor(f)[:, None] * z)
               for f, z in zip(rows(_features(data)), rows(data.logits), strict=True)]
        return torch.cat(out).numpy() if out else np.empty(0)


@DETECTORS.register("dice", paper="Sun & Li, ECCV 2022 (DICE)")
class DICE(_HeadDetector):
    summary = "DICE: head weights sparsified by train contribution (keep top 10%), energy"
    requires_fit = True
    hparams = {"p": _percent("sparsity: weights whose contribution W ⊙ mean(f) is below this "
                             "percentile are dropped", 90.0),
               **grid_selection_hparams()}
    grid = {"p": [10.0, 30.0, 50.0, 70.0, 90.0]}
    what = "DICE sparsifies the linear head's W by contribution W ⊙ mean(f)"

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.mean: torch.Tensor | None = None

    def fit_statistics(self, train: DetectorInput) -> None:
        self.mean = feature_mean(_features(train))

    def mask(self, w: torch.Tensor) -> torch.Tensor:
        assert self.mean is not None, "fit first"
        contrib = w * self.mean
        keep = contrib > float(np.percentile(contrib.numpy(), self.params["p"]))
        if not keep.any():  # e.g. p = 100: every sample would score the bias's energy alone
            problem = (f"dice.p = {self.params['p']:g} keeps no weight of the head (no "
                       "contribution exceeds that percentile)")
            if "p" in self.given:
                raise OodbenchError(problem, "pass a smaller -p dice.p (the paper's is 90)")
            raise NotApplicable("dice", problem)
        return keep

    def score(self, data: DetectorInput) -> np.ndarray:
        w, b = self.linear_head(data)
        ws = w * self.mask(w)
        return torch.cat([energy(f @ ws.T + b) for f in rows(_features(data))]).numpy()


@DETECTORS.register("gradnorm", paper="Huang, Geng & Li, NeurIPS 2021 (GradNorm)")
class GradNorm(_HeadDetector):
    summary = "GradNorm: ‖∂KL(u‖softmax)/∂W‖₁ = ‖p − u‖₁·‖f‖₁/T in closed form"
    hparams = {"T": HParam(1.0, float, gt=0, doc="softmax temperature of the KL loss"),
               "include_bias": HParam(False, bool, doc="add the bias gradient's L1 norm")}
    what = ("GradNorm's closed form is the gradient w.r.t. a linear head's W "
            "(‖p − u‖₁·‖f‖₁)")

    def chunk_scores(self, f: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                     ) -> torch.Tensor:
        t = self.params["T"]
        p = torch.softmax((f @ w.T + b) / t, dim=1)
        dev = (p - 1.0 / p.shape[1]).abs().sum(1)
        return dev * (f.abs().sum(1) + (1.0 if self.params["include_bias"] else 0.0)) / t


class _TrainMean(_HeadDetector):
    requires_fit = True

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.mean: torch.Tensor | None = None

    def fit_statistics(self, train: DetectorInput) -> None:
        self.mean = feature_mean(_features(train))


@DETECTORS.register("fdbd", paper="Liu & Qin, ICML 2024 (fDBD)")
class FDBD(_TrainMean):
    summary = "fDBD: mean distance to the decision boundaries / distance to the train mean"
    hparams = {"distance_as_normalizer": HParam(True, bool, doc="divide by ‖f − train mean‖₂"),
               **grid_selection_hparams()}
    grid = {"distance_as_normalizer": [True, False]}
    what = "fDBD measures distances to the linear head's hyperplane decision boundaries"

    def chunk_scores(self, f: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                     ) -> torch.Tensor:
        assert self.mean is not None, "fit first"
        z = f @ w.T + b
        top, pred = z.max(1)
        wdist = torch.cdist(w, w)[pred]  # ‖w_ĉ − w_c‖₂, N×C
        others = torch.arange(z.shape[1])[None] != pred[:, None]
        ok = others & (wdist > 0)
        dist = torch.where(ok, (top[:, None] - z) / torch.where(ok, wdist, 1.0), 0.0)
        s = dist.sum(1) / max(1, z.shape[1] - 1)
        if self.params["distance_as_normalizer"]:
            s = s / (f - self.mean).norm(dim=1).clamp_min(1e-12)
        return s


@DETECTORS.register("nci", paper="Liu & Qin, CVPR 2025 (NCI)")
class NCI(_TrainMean):
    summary = "NCI: w_ĉ·(f − μ)/‖f − μ‖ + α‖f‖₁ (neural-collapse proximity + norm)"
    hparams = {"alpha": HParam(1e-4, float, ge=0, doc="weight of the L1 feature norm"),
               **grid_selection_hparams()}
    grid = {"alpha": [1e-4, 1e-3, 1e-2, 1e-1]}
    what = "NCI reads the predicted class's weight vector w_ĉ of the linear head"

    def chunk_scores(self, f: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                     ) -> torch.Tensor:
        assert self.mean is not None, "fit first"
        pred = (f @ w.T + b).argmax(1)
        c = f - self.mean
        prox = (w[pred] * c).sum(1) / c.norm(dim=1).clamp_min(1e-12)
        return prox + self.params["alpha"] * f.abs().sum(1)


@DETECTORS.register("gen", paper="Liu, Lochman & Zach, CVPR 2023 (GEN)")
class GEN(Detector):
    summary = "GEN: minus the generalized entropy Σ p^γ(1−p)^γ of the top-M probabilities"
    needs = frozenset({"logits"})
    hparams = {"gamma": HParam(0.1, float, gt=0, doc="γ of the generalized entropy"),
               "M": HParam(100, int, ge=1, doc="top-M probabilities (min(M, classes))"),
               **grid_selection_hparams()}
    grid = {"gamma": [0.01, 0.1, 0.5, 1.0]}

    def score(self, data: DetectorInput) -> np.ndarray:
        assert data.logits is not None
        out = []
        for z in rows(data.logits):
            p = torch.softmax(z / data.temperature, dim=1)
            m = min(self.params["M"], p.shape[1])
            top = torch.topk(p, m, dim=1).values
            g = self.params["gamma"]
            out.append(-(top ** g * (1 - top) ** g).sum(1))
        return torch.cat(out).numpy() if out else np.empty(0)


@DETECTORS.register("neco", paper="Ammar et al., ICLR 2024 (NECO)")
class NECO(Detector):
    summary = "NECO: share of the standardised feature's norm in the train principal subspace"
    needs = frozenset({"features"})
    requires_fit = True
    hparams = {"d": HParam(0, int, ge=0, doc="principal directions kept (0: explain 90% of "
                                             "the train variance)"),
               "use_max_logit": HParam(False, bool, doc="multiply by the max logit "
                                                        "(the paper's choice for transformers)"),
               **grid_selection_hparams()}
    grid = {"d": [0, 4, 8, 16, 32, 64, 128]}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        if self.params["use_max_logit"]:
            self.needs = self.needs | {"logits"}
        self.centre: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.components: torch.Tensor | None = None  # D×D, columns by decreasing variance
        self.explained: torch.Tensor | None = None  # cumulative share of the variance

    def fit(self, train: DetectorInput) -> NECO:
        mean, scatter, n = feature_moments(_features(train))
        var = scatter.diagonal().clamp_min(0) / n  # ddof = 0, as StandardScaler
        std = var.sqrt()
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        corr = scatter / n / torch.outer(std, std)  # covariance of the standardised features
        lam, vec = torch.linalg.eigh((corr + corr.T) / 2)
        order = torch.argsort(lam, descending=True)
        lam = lam[order].clamp_min(0)
        self.centre, self.scale, self.components = mean, std, vec[:, order]
        self.explained = torch.cumsum(lam, 0) / lam.sum().clamp_min(1e-300)
        self.fitted = True
        return self

    @property
    def dim(self) -> int:
        assert self.components is not None and self.explained is not None, "fit first"
        d = int(self.params["d"])
        if d == 0:
            d = int(torch.searchsorted(self.explained, torch.tensor(NECO_VARIANCE,
                                                                   dtype=torch.float64))) + 1
        full = self.components.shape[1]
        if d >= full and self.params["d"]:  # all D directions: every ratio is exactly 1
            problem = (f"neco.d = {d} must be below the feature dimension D = {full} (with all "
                       "D directions every sample scores 1)")
            if "d" in self.given:  # the user's value: bad input (exit 2), nothing written
                raise OodbenchError(problem, "pass a smaller -p neco.d, or 0 (90 % of the "
                                    "train variance)")
            raise NotApplicable("neco", problem)  # a grid point: not a candidate
        return min(d, full)

    def score(self, data: DetectorInput) -> np.ndarray:
        assert self.components is not None and self.centre is not None
        assert self.scale is not None
        proj = self.components[:, :self.dim]
        out = []
        for f in rows(_features(data)):
            z = (f - self.centre) / self.scale
            out.append((z @ proj).norm(dim=1) / z.norm(dim=1).clamp_min(1e-12))
        s = torch.cat(out) if out else torch.empty(0, dtype=torch.float64)
        if self.params["use_max_logit"]:
            assert data.logits is not None
            s = s * data.logits.double().max(dim=1).values
        return s.numpy()
