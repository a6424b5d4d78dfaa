"""Detector registry. Importing this registers every detector."""

from oodbench.detectors import logit_scores  # noqa: F401  (registers the detectors)
from oodbench.detectors.base import DETECTORS, Detector, DetectorInput, create

__all__ = ["DETECTORS", "Detector", "DetectorInput", "create"]
