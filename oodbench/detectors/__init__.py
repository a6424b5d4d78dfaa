"""Detector registry. Importing this registers every detector (one family per module)."""

import oodbench.detectors.shaping  # noqa: F401  (activation shaping and head geometry)
from oodbench.detectors import intermediate, logit_scores, mahalanobis, odin  # noqa: F401
from oodbench.detectors.base import DETECTORS, Detector, DetectorInput, create

# isort: split
# feature-distance / density family (knn, nnguide, mahalanobis++, rmds, gmm, vim, she,
# kl-matching, openmax)
from oodbench.detectors import gaussians, knn, templates, vim  # noqa: F401

__all__ = ["DETECTORS", "Detector", "DetectorInput", "create"]
