from oodbench.losses import (  # noqa: F401  (registers)
    dismax,
    isomax,
    logitnorm,
    logsoftmax_resnet,
    outliers,
    softmax,
    t2fnorm,
)
from oodbench.losses.base import LOSSES, OUTLIER_TARGET, Criterion, LossSpec

__all__ = ["LOSSES", "OUTLIER_TARGET", "Criterion", "LossSpec"]
