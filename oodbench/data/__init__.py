"""Dataset registry and the uint8 tensor pipeline. Importing this registers every dataset."""

from oodbench.data import (  # noqa: F401  (register datasets)
    embedded,
    folders,
    idx,
    standard,
    synthetic,
)
from oodbench.data.base import DATASETS, DataContext, DatasetInfo, DatasetSource, ImageSet
from oodbench.data.folders import absolute_dataset_name, get_dataset
from oodbench.data.transforms import InputTransform, augment

__all__ = ["DATASETS", "DataContext", "DatasetInfo", "DatasetSource", "ImageSet",
           "InputTransform", "absolute_dataset_name", "augment", "get_dataset"]
