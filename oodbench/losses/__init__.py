"""Loss registry. Importing this registers every loss."""

from oodbench.losses import dismax, softmax  # noqa: F401  (registers the losses)
from oodbench.losses.base import LOSSES, Criterion, LossSpec

__all__ = ["LOSSES", "Criterion", "LossSpec"]
