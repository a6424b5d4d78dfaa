"""OOD-detection and classification metrics, as the OOD literature computes them.

Conventions (Lee et al. 2018, used by ODIN, Mahalanobis, IsoMax, DisMax): in-distribution is the
POSITIVE class and a higher score means more in-distribution. A sample is accepted as
in-distribution when score >= threshold; every distinct score value is a candidate threshold, so
tied scores always move together (no arbitrary tie order).

- TPR = accepted in-distribution / all in-distribution; FPR = accepted OOD / all OOD.
- `tnr_at_tpr95` = 1 − FPR at the operating point whose TPR is closest to 0.95 (Lee et al.'s
  choice; ties in |TPR − 0.95| go to the higher TPR). `fpr_at_tpr95` = 1 − `tnr_at_tpr95`.
  Some tools (e.g. OpenOOD) treat OOD as positive for FPR95; with in-dist positive this is the
  FPR of accepting OOD samples while keeping 95 % of in-distribution ones.
- `auroc`: area under the ROC curve (trapezoidal, ties as one step) = P(s_in > s_out) + ½P(=).
- `dtacc` = max over thresholds of ½(TPR + 1 − FPR): the best balanced detection accuracy.
- `aupr_in`: average precision with in-distribution positive (scikit-learn's definition);
  `aupr_out`: the same with OOD positive and negated scores.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

OOD_METRICS = ("tnr_at_tpr95", "fpr_at_tpr95", "auroc", "dtacc", "aupr_in", "aupr_out")
# For each metric: True if higher is better (used to highlight bests and to gate).
HIGHER_IS_BETTER = {"tnr_at_tpr95": True, "fpr_at_tpr95": False, "auroc": True, "dtacc": True,
                    "aupr_in": True, "aupr_out": True, "accuracy": True, "ece": False,
                    "nll": False}


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


def ood_metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    """All OOD metrics as fractions in [0, 1]. Higher score = more in-distribution."""
    pos = _check("in-distribution scores", in_scores)
    neg = _check("OOD scores", out_scores)
    tpr, fpr, _ = _roc(pos, neg)
    dist = np.abs(tpr - 0.95)
    best = np.flatnonzero(dist == dist.min())
    i95 = best[np.argmax(tpr[best])]
    return {
        "tnr_at_tpr95": float(1.0 - fpr[i95]),
        "fpr_at_tpr95": float(fpr[i95]),
        "auroc": float(np.trapezoid(tpr, fpr)),
        "dtacc": float(np.max(0.5 * (tpr + 1.0 - fpr))),
        "aupr_in": _average_precision(pos, neg),
        "aupr_out": _average_precision(-neg, -pos),
    }


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean())


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels))


def ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
        bins: int = 15) -> float:
    """Expected calibration error with `bins` equal-width confidence bins (Guo et al. 2017)."""
    probs = torch.softmax(logits.double() / temperature, dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1], right=True)  # bin b holds (edges[b], edges[b+1]]
    total = torch.zeros(bins, dtype=torch.float64)
    gap = total.index_add(0, idx, conf - correct)
    count = total.index_add(0, idx, torch.ones_like(conf))
    return float(gap.abs().sum() / count.sum())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor,
                           temperature: float = 1.0) -> dict[str, float]:
    return {"accuracy": accuracy(logits, labels), "ece": ece(logits, labels, temperature),
            "nll": nll(logits, labels, temperature)}
