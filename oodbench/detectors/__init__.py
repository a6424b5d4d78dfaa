"""Detector registry. Importing this registers every detector (one family per module)."""

import oodbench.detectors.shaping  # noqa: F401  (activation shaping and head geometry)
from oodbench.detectors import intermediate, logit_scores, mahalanobis, odin  # noqa: F401
from oodbench.detectors.base import DETECTORS, Detector, DetectorInput, create

__all__ = ["DETECTORS", "Detector", "DetectorInput", "create"]
