"""Detector registry. Importing this registers every detector (one family per module)."""

from oodbench.detectors import (  # noqa: F401  (each module registers its detectors)
    gaussians,
    intermediate,
    knn,
    logit_scores,
    mahalanobis,
    odin,
    shaping,
    templates,
    vim,
)
from oodbench.detectors.base import DETECTORS, Detector, DetectorInput, NotApplicable, create

__all__ = ["DETECTORS", "Detector", "DetectorInput", "NotApplicable", "create"]
