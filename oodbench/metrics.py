"""OOD-detection and classification metrics, as the OOD literature computes them.

Conventions (Lee et al. 2018, used by ODIN, Mahalanobis, IsoMax, DisMax): in-distribution is the
POSITIVE class and a higher score means more in-distribution. A sample is accepted as
in-distribution when score >= t. TPR = accepted in-dist / all in-dist, FPR = accepted OOD / all
OOD, TNR = 1 − FPR.

Ties (the default, `convention="threshold"`): the ROC curve has one point per distinct score
value, so tied samples are accepted or rejected together — only operating points a real
threshold can reach. With this convention AUROC and AUPR equal scikit-learn's `roc_auc_score`
and `average_precision_score`.

- `tnr_at_tpr95`: TNR at the ROC point whose TPR is closest to 0.95 (Lee et al.'s rule);
  when two TPRs are equally close (within 1e-9) the higher wins, as in Lee et al.'s `argmin`
  over a curve ordered from TPR 1 down; among the thresholds giving that TPR the lowest (highest
  FPR, the threshold just above the highest rejected in-distribution score) is taken, again as
  Lee et al.'s walk does; at TPR = 1 the threshold is the lowest in-distribution score. Without
  ties and below TPR 1 this is exactly their number. `fpr_at_tpr95` = 1 − `tnr_at_tpr95`.
- `auroc`: trapezoidal area under the ROC curve = P(s_in > s_out) + ½ P(s_in = s_out).
- `dtacc`: max over thresholds of ½(TPR + TNR), the best balanced detection accuracy.
- `aupr_in`: average precision (step-wise sum over recall steps of precision) with in-dist
  positive; `aupr_out`: the same with OOD positive and negated scores.

`convention="lee"` reproduces the reference script of Lee et al. (`calculate_log.py` of the
Mahalanobis code) instead: its ROC walk removes samples one at a time from the lowest score up
and, on equal scores, rejects in-distribution samples before OOD ones, so inside a block of ties
it passes through points no threshold reaches (TPR lowered, FPR not yet): TNR@95 can land there,
AUROC counts ties as errors (P(s_in > s_out)), and AUPR integrates precision over recall with the
trapezoid rule (not average precision). Without ties both conventions give the same TNR@95,
AUROC and DTACC; AUPR differs by the integration rule (about 0.1 point).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

OOD_METRICS = ("tnr_at_tpr95", "fpr_at_tpr95", "auroc", "dtacc", "aupr_in", "aupr_out")
CLASSIFICATION_METRICS = ("accuracy", "ece", "nll")
# For each metric: True if higher is better (used to highlight bests and to read gates).
HIGHER_IS_BETTER = {"tnr_at_tpr95": True, "fpr_at_tpr95": False, "auroc": True, "dtacc": True,
                    "aupr_in": True, "aupr_out": True, "accuracy": True, "ece": False,
                    "nll": False, "cost": False}
CONVENTIONS = ("threshold", "lee")
TPR_TARGET = 0.95


def roc_curve(in_scores: np.ndarray, out_scores: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FPR, TPR and thresholds (one point per distinct score, from (0, 0) at t = +inf up to
    (1, 1)), for 'in-distribution if score >= t'."""
    pos = _check("in-distribution scores", in_scores)
    neg = _check("OOD scores", out_scores)
    tpr, fpr, thresholds = _roc(pos, neg)
    return fpr, tpr, thresholds


def _roc(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TPR, FPR (starting at 0, 0) and the thresholds, for 'positive if score >= t'."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(is_pos)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr = np.r_[0.0, tp / len(pos)]
    fpr = np.r_[0.0, fp / len(neg)]
    return tpr, fpr, np.r_[np.inf, scores[last_of_tie]]


def operating_point(tpr: np.ndarray, target: float = TPR_TARGET) -> int:
    """Index of the ROC point whose TPR is closest to `target` (the higher TPR on a tie). Of the
    points with that TPR: the last (lowest threshold, just above the highest rejected
    in-distribution score), as Lee et al.; at TPR = 1 no in-distribution score is rejected and
    the first is taken (threshold = the lowest in-distribution score), where Lee et al.'s walk
    would accept every OOD sample."""
    dist = np.abs(tpr - target)
    best = np.flatnonzero(dist <= dist.min() + 1e-9)
    same = best[tpr[best] == tpr[best].max()]
    return int(same[0] if tpr[same[0]] >= 1.0 else same[-1])


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    tpr, fpr, _ = _roc(pos, neg)
    tp, fp = tpr * len(pos), fpr * len(neg)
    precision = np.divide(tp[1:], tp[1:] + fp[1:])
    return float(np.sum(np.diff(tpr) * precision))


def _check(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{name} holds {int(bad.sum())} NaN/infinite value(s) of {a.size}; "
                         "a metric of such scores would be meaningless")
    return a


def ood_metrics(in_scores: np.ndarray, out_scores: np.ndarray,
                convention: str = "threshold") -> dict[str, float]:
    """All OOD metrics as fractions in [0, 1]. Higher score = more in-distribution.
    `convention`: "threshold" (default, tie-aware) or "lee" (the reference script; see module)."""
    pos = _check("in-distribution scores", in_scores)
    neg = _check("OOD scores", out_scores)
    if convention == "lee":
        return _lee_metrics(pos, neg)
    if convention != "threshold":
        raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")
    tpr, fpr, _ = _roc(pos, neg)
    i95 = operating_point(tpr)
    return {
        "tnr_at_tpr95": float(1.0 - fpr[i95]),
        "fpr_at_tpr95": float(fpr[i95]),
        "auroc": float(np.trapezoid(tpr, fpr)),
        "dtacc": float(np.max(0.5 * (tpr + 1.0 - fpr))),
        "aupr_in": _average_precision(pos, neg),
        "aupr_out": _average_precision(-neg, -pos),
    }


def _lee_metrics(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """Lee et al.'s reference computation, vectorised: walk from 'accept all' upwards, rejecting
    the lowest remaining sample at each step (in-distribution first among equal scores)."""
    k, n = len(pos), len(neg)
    scores = np.concatenate([pos, neg])
    is_ood = np.r_[np.zeros(k, dtype=bool), np.ones(n, dtype=bool)]
    order = np.lexsort((is_ood, scores))  # ascending score; in-dist before OOD on ties
    removed_ood = np.cumsum(is_ood[order])
    removed_in = np.arange(1, k + n + 1) - removed_ood
    tp = np.r_[k, k - removed_in].astype(np.float64)
    fp = np.r_[n, n - removed_ood].astype(np.float64)
    tpr, fpr = tp / k, fp / n
    i95 = int(np.abs(tpr - TPR_TARGET).argmin())
    tpr_e, fpr_e = np.r_[1.0, tpr, 0.0], np.r_[1.0, fpr, 0.0]
    with np.errstate(invalid="ignore", divide="ignore"):
        prec_in = tp / (tp + fp)
        prec_out = (n - fp) / ((k - tp) + (n - fp))
    keep_in = np.r_[True, tp + fp > 0, True]
    keep_out = np.r_[True, (k - tp) + (n - fp) > 0, True]
    p_in = np.r_[0.5, prec_in, 0.0][keep_in]
    p_out = np.r_[0.0, prec_out, 0.5][keep_out]
    return {
        "tnr_at_tpr95": float(1.0 - fpr[i95]),
        "fpr_at_tpr95": float(fpr[i95]),
        "auroc": float(-np.trapezoid(1.0 - fpr_e, tpr_e)),
        "dtacc": float(np.max(0.5 * (tpr + 1.0 - fpr))),
        "aupr_in": float(-np.trapezoid(p_in, tpr_e[keep_in])),
        "aupr_out": float(np.trapezoid(p_out, 1.0 - fpr_e[keep_out])),
    }


def bootstrap_auroc(in_scores: np.ndarray, out_scores: np.ndarray, n_boot: int = 1000,
                    seed: int = 0) -> np.ndarray:
    """`n_boot` bootstrap replicates of the AUROC, resampling the in-distribution and the OOD
    scores independently (each with replacement, same size). Each replicate costs O(n): the
    AUROC is a weighted Mann-Whitney count over precomputed rank positions."""
    pos = _check("in-distribution scores", in_scores)
    neg = _check("OOD scores", out_scores)
    rng = np.random.default_rng(seed)
    neg_u, neg_idx = np.unique(neg, return_inverse=True)
    below = np.searchsorted(neg_u, pos, "left")  # distinct OOD values < each in-dist score
    upto = np.searchsorted(neg_u, pos, "right")  # ... <= each in-dist score
    k, n = len(pos), len(neg)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        counts = np.bincount(neg_idx[rng.integers(0, n, n)], minlength=len(neg_u))
        cum = np.r_[0, np.cumsum(counts)]
        wins = cum[below] + 0.5 * (cum[upto] - cum[below])
        reps[b] = np.bincount(rng.integers(0, k, k), minlength=k) @ wins / (k * n)
    return reps


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean())


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels))


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                     bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin (equal width, bin b = (b/bins, (b+1)/bins]): mean confidence,
    accuracy and count (NaN confidence/accuracy for empty bins)."""
    probs = torch.softmax(torch.as_tensor(logits).double() / temperature, dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == torch.as_tensor(labels)).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1], right=False)  # right-closed bins, as Guo et al.
    zero = torch.zeros(bins, dtype=torch.float64)
    count = zero.index_add(0, idx, torch.ones_like(conf))
    with np.errstate(invalid="ignore"):
        mean_conf = (zero.index_add(0, idx, conf) / count).numpy()
        acc = (zero.index_add(0, idx, correct) / count).numpy()
    return mean_conf, acc, count.numpy()


def ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
        bins: int = 15) -> float:
    """Expected calibration error with `bins` equal-width confidence bins (Guo et al. 2017):
    Σ_b (n_b / n) |accuracy_b − confidence_b|."""
    conf, acc, count = reliability_bins(logits, labels, temperature, bins)
    used = count > 0
    return float(np.sum(count[used] * np.abs(acc[used] - conf[used])) / count.sum())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor,
                           temperature: float = 1.0) -> dict[str, float]:
    return {"accuracy": accuracy(logits, labels), "ece": ece(logits, labels, temperature),
            "nll": nll(logits, labels, temperature)}


# ------------------------------------------------------------------ selective classification
# A detector's score is also a confidence: accept a prediction when score ≥ t. Coverage = the
# accepted fraction; selective risk = errors among the accepted / accepted; generalized risk
# (Traub et al. 2024) = errors accepted / all. Tied scores are accepted together (one point per
# distinct threshold), as in the OOD metrics; without ties the areas equal the usual mean over
# k = 1..n of the top-k risk (Geifman et al. 2019).
SELECTIVE_METRICS = ("misclassification_auroc", "aurc", "e_aurc", "augrc", "risk_at_80",
                     "risk_at_95")
HIGHER_IS_BETTER.update(misclassification_auroc=True, aurc=False, e_aurc=False, augrc=False,
                        risk_at_80=False, risk_at_95=False)


def _risk_curve(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, ...]:
    """(coverage, selective risk, generalized risk) at each distinct threshold, high to low."""
    order = np.argsort(-scores, kind="stable")
    s, e = scores[order], errors[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each block of ties
    accepted = last + 1.0
    wrong = np.cumsum(e)[last]
    return accepted / len(s), wrong / accepted, wrong / len(s)


def selective_metrics(scores: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Misclassification detection and risk–coverage figures of one confidence score.

    misclassification_auroc: P(score of a correct prediction > a wrong one) (+ ½ ties);
    aurc: ∫ selective risk d coverage; e_aurc: aurc − the optimal aurc for the same error rate
    (r + (1 − r) ln(1 − r)); augrc: ∫ generalized risk d coverage; risk_at_c: selective risk
    at the first threshold whose coverage reaches c."""
    s = _check("scores", np.asarray(scores, dtype=np.float64))
    ok = np.asarray(correct, dtype=bool)
    if ok.shape != s.shape:
        raise ValueError("one correctness flag per score is needed")
    cov, risk, grisk = _risk_curve(s, ~ok)
    steps = np.diff(np.r_[0.0, cov])
    r = 1.0 - ok.mean()
    optimal = r + (1.0 - r) * np.log(1.0 - r) if r < 1.0 else 1.0
    out = {"misclassification_auroc": float("nan") if ok.all() or not ok.any()
           else float(ood_metrics(s[ok], s[~ok])["auroc"]),
           "aurc": float(np.sum(risk * steps)), "augrc": float(np.sum(grisk * steps))}
    out["e_aurc"] = out["aurc"] - float(optimal)
    for c in (80, 95):
        out[f"risk_at_{c}"] = float(risk[np.searchsorted(cov, c / 100 - 1e-12)])
    return out


def selective_with_ood(in_scores: np.ndarray, correct: np.ndarray,
                       out_scores: np.ndarray) -> dict[str, float]:
    """The same figures when OOD samples are mixed into the test stream and every accepted OOD
    sample counts as an error (selective classification with OOD inputs)."""
    scores = np.concatenate([np.asarray(in_scores, float), np.asarray(out_scores, float)])
    ok = np.concatenate([np.asarray(correct, bool), np.zeros(len(out_scores), bool)])
    return selective_metrics(scores, ok)


# ------------------------------------------------------------------ paired bootstrap (AUROC)
def _weighted_aurocs(pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray,
                     w_neg: np.ndarray) -> np.ndarray:
    """AUROC (P(s_in > s_out) + ½ P(=)) under per-sample weights, one per row of `w_pos` (B×k)
    and `w_neg` (B×n): the weights are bootstrap counts, so row b is the AUROC of replicate b."""
    order = np.argsort(neg, kind="stable")
    below = np.searchsorted(neg[order], pos, "left")  # OOD samples < each in-dist score
    upto = np.searchsorted(neg[order], pos, "right")  # ... <= each in-dist score
    cum = np.zeros((w_neg.shape[0], len(neg) + 1))
    np.cumsum(w_neg[:, order], axis=1, out=cum[:, 1:])
    wins = 0.5 * (cum[:, below] + cum[:, upto])
    return np.einsum("bk,bk->b", w_pos, wins) / (w_pos.sum(1) * w_neg.sum(1))


def paired_bootstrap_auroc(in_a: np.ndarray, outs_a: list[np.ndarray], in_b: np.ndarray,
                           outs_b: list[np.ndarray], n_boot: int = 1000, seed: int = 0,
                           chunk: int = 64) -> np.ndarray:
    """`n_boot` replicates of mean_sets AUROC(b) − mean_sets AUROC(a) for two score functions
    on the SAME samples (`in_a[i]` and `in_b[i]` score one test sample; `outs_a[j]`, `outs_b[j]`
    one OOD set each, in one sample order). Each replicate resamples the in-distribution indices
    once (shared by every set and both rows) and each OOD set's indices (shared by both rows),
    so what the two rows have in common cancels out of the difference."""
    pa, pb = _check("in-distribution scores", in_a), _check("in-distribution scores", in_b)
    if len(pa) != len(pb) or len(outs_a) != len(outs_b) or not outs_a:
        raise ValueError("paired rows need scores of the same samples")
    na = [_check("OOD scores", o) for o in outs_a]
    nb = [_check("OOD scores", o) for o in outs_b]
    if any(len(x) != len(y) for x, y in zip(na, nb, strict=True)):
        raise ValueError("paired rows need scores of the same samples")
    rng = np.random.default_rng(seed)
    k = len(pa)
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w_in = _counts(rng, k, b)
        diff = np.zeros(b)
        for oa, ob in zip(na, nb, strict=True):
            w_out = _counts(rng, len(oa), b)
            diff += _weighted_aurocs(pb, ob, w_in, w_out) - _weighted_aurocs(pa, oa, w_in, w_out)
        out[start:start + b] = diff / len(na)
    return out


def _counts(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """`b` bootstrap resamples of n indices, each as how often every index was drawn (b×n)."""
    draws = rng.integers(0, n, (b, n)) + n * np.arange(b)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
