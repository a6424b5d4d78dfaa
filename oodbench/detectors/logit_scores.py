"""Scores computed from logits alone (post hoc, gradient-free, no fitting).

Baselines: MSP (Hendrycks & Gimpel 2017), max-logit (Hendrycks et al. 2022), negative entropy,
energy (Liu et al. 2020). DisMax scores (Macêdo et al. 2022), defined on the DisMax logits:
MPS (max probability), ES (negative entropy), MDS (max logit, i.e. minus the minimum distance up
to the shared mean term), MMLS (max + mean logit), MMLES (MMLS − entropy), MMLEPS (MMLES + MPS).
MiSP (the intermediate-layer thesis, here at the last layer): minimum softmax probability.

Temperature: every score here sees logits / T, T = the run's calibrated temperature when asked
(else 1). This is what the DisMax code does (its head divides the logits by the temperature
before any score), so MMLES / MMLEPS mix logits and entropy on the same scale; for MSP, entropy
and MiSP it is ordinary temperature scaling, and for max-logit / MDS / MMLS it changes no
ranking. Entropies use log_softmax (p · log p computed as exp(l) · l), never log(softmax).

Orientation (higher = more in-distribution): MiSP is NEGATED. A confident (in-distribution)
prediction puts almost no mass on its least likely class, so a small minimum probability means
in-distribution; OOD inputs give flatter softmaxes with larger minima.
"""

from __future__ import annotations

import numpy as np
import torch

from oodbench.detectors.base import DETECTORS, Detector, DetectorInput


def neg_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """Σ p log p (≤ 0); exact for p → 0 because p·log p is computed as exp(l)·l."""
    return (log_p.exp() * log_p).sum(dim=1)


class _LogitScore(Detector):
    def compute(self, logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, data: DetectorInput) -> np.ndarray:
        logits = data.logits.double() / data.temperature
        return self.compute(logits, torch.log_softmax(logits, dim=1)).numpy()


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


@_register("misp", "minus the minimum softmax probability (last layer)")
class MiSP(_LogitScore):
    def compute(self, logits, log_p):
        return -log_p.min(dim=1).values.exp()


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
