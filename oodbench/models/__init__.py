"""Model registry. Importing this registers every model."""

from oodbench.models import resnet, small  # noqa: F401  (registers the models)
from oodbench.models.base import (
    MODELS,
    Backbone,
    Classifier,
    ModelOutput,
    ModelSpec,
    build_classifier,
)

__all__ = ["MODELS", "Backbone", "Classifier", "ModelOutput", "ModelSpec", "build_classifier"]
