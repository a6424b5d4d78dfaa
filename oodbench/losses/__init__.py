"""Loss registry. Importing this registers every loss."""

from oodbench.losses import dismax, isomax, logsoftmax_resnet, softmax  # noqa: F401  (registers)
from oodbench.losses.base import LOSSES, Criterion, LossSpec

__all__ = ["LOSSES", "Criterion", "LossSpec"]
