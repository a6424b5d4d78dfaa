"""Dataset registry and the uint8 tensor pipeline. Importing this registers every dataset."""

from oodbench.data import embedded  # noqa: F401  (registers the embedded datasets)
from oodbench.data.base import DATASETS, DataContext, DatasetInfo, DatasetSource, ImageSet
from oodbench.data.transforms import InputTransform, augment

__all__ = ["DATASETS", "DataContext", "DatasetInfo", "DatasetSource", "ImageSet",
           "InputTransform", "augment"]
