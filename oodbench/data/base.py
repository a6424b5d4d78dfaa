"""What a dataset is to oodbench: uint8 image tensors plus labels, and a source that loads them.

Every dataset, whatever its file format, ends up as one `ImageSet`: an N×C×H×W uint8 tensor and
an int64 label vector (-1 where unlabeled). Keeping raw uint8 (not normalised floats) makes the
set 4× smaller, lets it live on the training device whole, and gives a stable content fingerprint
for the output cache.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from oodbench.errors import OodbenchError
from oodbench.registry import Registry

DATA_ENV = "OODBENCH_DATA"
CACHE_ENV = "OODBENCH_CACHE"


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: shape, classes, and the normalisation its models use."""

    channels: int
    image_size: int
    num_classes: int
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean/std need one entry per channel")


@dataclass
class ImageSet:
    """A whole dataset split in memory: uint8 images N×C×H×W and int64 labels (-1 = unlabeled)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be uint8 N×C×H×W, got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: need one label per image")
        if len(self) == 0:
            raise OodbenchError(f"dataset {self.name!r} is empty",
                                "check the data folder; it must hold at least one image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """sha256 of the pixels, labels and shape: the dataset part of every cache key."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(repr(tuple(self.images.shape)).encode())
            h.update(np.ascontiguousarray(self.images.cpu().numpy()).tobytes())
            h.update(np.ascontiguousarray(self.labels.cpu().numpy()).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def image_hashes(self) -> set[bytes]:
        """One content hash per image (its raw uint8 pixels): what "disjoint" means when a
        validation or auxiliary set is checked against the test sets."""
        rows = self.images.reshape(len(self), -1).cpu().numpy()
        return {hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows}

    def subset(self, index: torch.Tensor, name: str | None = None) -> ImageSet:
        return ImageSet(name or self.name, self.images[index], self.labels[index], self.info)

    def select_classes(self, classes: list[int], name: str | None = None) -> ImageSet:
        """Keep only `classes`, relabelled 0..k-1 in the given order (for held-out-class splits)."""
        lookup = torch.full((max(self.info.num_classes, max(classes) + 1),), -1, dtype=torch.long)
        lookup[torch.tensor(classes)] = torch.arange(len(classes))
        keep = torch.isin(self.labels, torch.tensor(classes))
        names = self.info.class_names
        info = replace(self.info, num_classes=len(classes),
                       class_names=tuple(names[c] for c in classes) if names else ())
        return ImageSet(name or self.name, self.images[keep], lookup[self.labels[keep]], info)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.name, self.images.to(device), self.labels.to(device), self.info,
                        self._fingerprint)


@dataclass(frozen=True)
class DataContext:
    """Where data is read from and where decoded tensors are cached.

    `root` may be read-only (a shared mirror); everything oodbench writes goes to `cache_root`.
    """

    root: Path
    cache_root: Path
    download: bool = False

    @classmethod
    def resolve(cls, root: str | Path | None = None, cache_root: str | Path | None = None,
                download: bool = False) -> DataContext:
        """Option beats environment variable beats the default `data/` folder."""
        r = Path(root or os.environ.get(DATA_ENV) or "data").expanduser()
        c = Path(cache_root or os.environ.get(CACHE_ENV) or Path("data") / "cache").expanduser()
        return cls(r, c, download)


class DatasetSource:
    """A registered dataset: knows its facts and how to load each split.

    Subclasses set `info` (or override `info_for`), `splits`, `summary`, and implement `load`.
    `like` is the in-distribution info, used by shape-less sources (noise) to match it.
    """

    summary: str = ""
    splits: tuple[str, ...] = ("test",)
    info: DatasetInfo | None = None
    needs_download = False

    def info_for(self, like: DatasetInfo | None = None) -> DatasetInfo:
        if self.info is None:
            raise NotImplementedError
        return self.info

    def load(self, split: str, ctx: DataContext, like: DatasetInfo | None = None) -> ImageSet:
        raise NotImplementedError

    def check_split(self, name: str, split: str) -> None:
        if split not in self.splits:
            raise OodbenchError(f"dataset {name!r} has no split {split!r}",
                                f"use one of: {', '.join(self.splits)}")

    def status(self, ctx: DataContext) -> str:
        """'present', 'missing' or 'checksum mismatch' on this machine for a dataset read from
        files; 'built in' for one embedded in oodbench or generated (no file to get)."""
        return "built in"

    def missing(self, ctx: DataContext) -> list[Path]:
        """Files or folders this dataset needs that are absent (a cheap existence check, run
        before any training so a benchmark fails up front, listing everything missing)."""
        return []

    def size_on_disk(self, ctx: DataContext) -> int:
        return 0

    def how_to_get(self) -> str:
        return "built in; nothing to download"


def _instance(cls: type[DatasetSource]) -> DatasetSource:
    """The registry entry of a decorated `DatasetSource` subclass: one instance of it."""
    return cls()


# `@DATASETS.register("name")` on a DatasetSource subclass registers one instance of it.
DATASETS: Registry[DatasetSource] = Registry("dataset", entry=_instance)
