"""Model registry. Importing this registers every model."""

from oodbench.models import densenet, resnet, resnet_he, small, wideresnet  # noqa: F401
from oodbench.models.base import (
    MODELS,
    Backbone,
    Classifier,
    ModelOutput,
    ModelSpec,
    build_classifier,
    check_block_activation,
)
from oodbench.models.hooked import HookedClassifier

__all__ = ["MODELS", "Backbone", "Classifier", "HookedClassifier", "ModelOutput", "ModelSpec",
           "build_classifier", "check_block_activation"]
