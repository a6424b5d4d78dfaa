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

from oodbench.detectors.base import DETECTORS, Detector, DetectorInput, HParam


def neg_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """Σ p log p (≤ 0); exact for p → 0 because p·log p is computed as exp(l)·l."""
    return (log_p.exp() * log_p).sum(dim=1)


class _LogitScore(Detector):
    def compute(self, logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, data: DetectorInput) -> np.ndarray:
        assert data.logits is not None
        logits = data.logits.double() / data.temperature
        return self.compute(logits, torch.log_softmax(logits, dim=1)).numpy()


@DETECTORS.register("msp", paper="Hendrycks & Gimpel, ICLR 2017")
class MSP(_LogitScore):
    summary = "maximum softmax probability"

    def compute(self, logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        return log_p.max(dim=1).values.exp()


@DETECTORS.register("maxlogit", paper="Hendrycks et al., ICML 2022 (Scaling OOD detection)")
class MaxLogit(_LogitScore):
    summary = "maximum logit"

    def compute(self, logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        return logits.max(dim=1).values


@DETECTORS.register("entropy",
                    paper="negative predictive entropy (e.g. Macêdo et al., IsoMax, 2021)")
class Entropy(_LogitScore):
    summary = "negative entropy of the softmax"

    def compute(self, logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        return neg_entropy(log_p)


@DETECTORS.register("misp",
                    paper="minimum softmax probability (MiSP, the intermediate-layer thesis)")
class MiSP(_LogitScore):
    summary = "minus the minimum softmax probability (last layer)"

    def compute(self, logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        return -log_p.min(dim=1).values.exp()


@DETECTORS.register("energy", paper="Liu et al., NeurIPS 2020 (Energy-based OOD detection)")
class Energy(Detector):
    """Negative free energy T · logsumexp(logits / T) (Liu et al. 2020)."""

    summary = "T · logsumexp(logits / T)"
    hparams = {"T": HParam(1.0, float, gt=0, doc="energy temperature; T <= 0 is undefined or "
                                                 "inverts the scores")}

    def score(self, data: DetectorInput) -> np.ndarray:
        t = float(self.params["T"])
        return (t * torch.logsumexp(data.logits.double() / t, dim=1)).numpy()


@DETECTORS.register("mps", paper="Macêdo et al., 2022 (DisMax)")
class MPS(MSP):
    summary = "DisMax maximum probability score"


@DETECTORS.register("es", paper="Macêdo et al., 2022 (DisMax)")
class ES(Entropy):
    summary = "DisMax negative entropy score"


@DETECTORS.register("mds", paper="Macêdo et al., 2022 (DisMax)")
class MDS(MaxLogit):
    summary = "DisMax minimum distance score (max logit)"


@DETECTORS.register("mmls", paper="Macêdo et al., 2022 (DisMax)")
class MMLS(_LogitScore):
    summary = "DisMax max + mean logit score"

    def compute(self, logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        return logits.max(dim=1).values + logits.mean(dim=1)


@DETECTORS.register("mmles", paper="Macêdo et al., 2022 (DisMax)")
class MMLES(_LogitScore):
    summary = "DisMax max + mean logit − entropy score"

    def compute(self, logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        return logits.max(dim=1).values + logits.mean(dim=1) + neg_entropy(log_p)


@DETECTORS.register("mmleps", paper="Macêdo et al., 2022 (DisMax)")
class MMLEPS(_LogitScore):
    summary = "DisMax max + mean logit − entropy + max probability score"

    def compute(self, logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        return (logits.max(dim=1).values + logits.mean(dim=1) + neg_entropy(log_p)
                + log_p.max(dim=1).values.exp())
