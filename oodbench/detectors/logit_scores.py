"""Scores computed from logits alone (post hoc, gradient-free, no fitting).

Baselines: MSP (Hendrycks & Gimpel 2017), max-logit (Hendrycks et al. 2022), negative entropy,
energy (Liu et al. 2020). DisMax scores (Macêdo et al. 2022), defined on the DisMax logits:
MPS (max probability), ES (negative entropy), MDS (max logit, i.e. minus the minimum distance up
to the shared mean term), MMLS (max + mean logit), MMLES (MMLS − entropy), MMLEPS (MMLES + MPS).
All probabilities use the run's temperature; entropies use xlogy-safe log_softmax.
"""

from __future__ import annotations

import numpy as np
import torch

from oodbench.detectors.base import DETECTORS, Detector, DetectorInput


def _log_probs(data: DetectorInput) -> torch.Tensor:
    return torch.log_softmax(data.logits.double() / data.temperature, dim=1)


def neg_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """Σ p log p (≤ 0); exact for p → 0 because p·log p is computed as exp(l)·l."""
    return (log_p.exp() * log_p).sum(dim=1)


class _LogitScore(Detector):
    def compute(self, logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, data: DetectorInput) -> np.ndarray:
        return self.compute(data.logits.double(), _log_probs(data)).numpy()


def _register(name: str, summary: str):
    def decorate(cls: type[_LogitScore]) -> type[_LogitScore]:
        cls.summary = summary
        return DETECTORS.add(name, cls)

    return decorate


@_register("msp", "maximum softmax probability")
class MSP(_LogitScore):
    def compute(self, logits, log_p):
        return log_p.max(dim=1).values.exp()


@_register("maxlogit", "maximum logit")
class MaxLogit(_LogitScore):
    def compute(self, logits, log_p):
        return logits.max(dim=1).values


@_register("entropy", "negative entropy of the softmax")
class Entropy(_LogitScore):
    def compute(self, logits, log_p):
        return neg_entropy(log_p)


@DETECTORS.register("energy")
class Energy(Detector):
    """Negative free energy T · logsumexp(logits / T) (Liu et al. 2020)."""

    summary = "T · logsumexp(logits / T)"
    hparams = {"T": 1.0}

    def score(self, data: DetectorInput) -> np.ndarray:
        t = float(self.params["T"])
        return (t * torch.logsumexp(data.logits.double() / t, dim=1)).numpy()


@_register("mps", "DisMax maximum probability score")
class MPS(MSP):
    pass


@_register("es", "DisMax negative entropy score")
class ES(Entropy):
    pass


@_register("mds", "DisMax minimum distance score (max logit)")
class MDS(MaxLogit):
    pass


@_register("mmls", "DisMax max + mean logit score")
class MMLS(_LogitScore):
    def compute(self, logits, log_p):
        return logits.max(dim=1).values + logits.mean(dim=1)


@_register("mmles", "DisMax max + mean logit − entropy score")
class MMLES(_LogitScore):
    def compute(self, logits, log_p):
        return logits.max(dim=1).values + logits.mean(dim=1) + neg_entropy(log_p)


@_register("mmleps", "DisMax max + mean logit − entropy + max probability score")
class MMLEPS(_LogitScore):
    def compute(self, logits, log_p):
        return (logits.max(dim=1).values + logits.mean(dim=1) + neg_entropy(log_p)
                + log_p.max(dim=1).values.exp())
