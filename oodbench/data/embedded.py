"""Datasets that ship with the dependencies, so the default benchmark runs with no download.

- `digits`: scikit-learn's 1,797 8×8 handwritten digits (values 0..16, rescaled to 0..255),
  split once, stratified and seeded, into train / val / test.
- `patches`: 8×8 gray patches of scikit-learn's two bundled photographs (china, flower),
  each stretched to the full 0..255 range as the digits are: natural-image OOD data.
- `gaussian`, `uniform`: synthetic noise shaped like the in-distribution set.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from oodbench.data.base import (
    DATASETS,
    DataContext,
    DatasetInfo,
    DatasetSource,
    ImageSet,
)

DIGITS_INFO = DatasetInfo(
    channels=1, image_size=8, num_classes=10, class_names=tuple(str(d) for d in range(10)),
    mean=(0.3053,), std=(0.3740,),
)
SPLIT_SEED = 20260101
NOISE_COUNT = 1000


@lru_cache(maxsize=1)
def _digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.3, stratify=labels, random_state=SPLIT_SEED)
    train, val = train_test_split(rest, test_size=0.15, stratify=labels[rest],
                                  random_state=SPLIT_SEED)
    return {s: (images[i], labels[i]) for s, i in (("train", train), ("val", val), ("test", test))}


@DATASETS.register("digits")
class Digits(DatasetSource):
    summary = "scikit-learn 8×8 handwritten digits (embedded; 1,797 images, 10 classes)"
    splits = ("train", "val", "test")
    info = DIGITS_INFO

    def load(self, split: str, ctx: DataContext, like: DatasetInfo | None = None) -> ImageSet:
        self.check_split("digits", split)
        images, labels = _digits_splits()[split]
        return ImageSet("digits", torch.from_numpy(images.copy()), torch.from_numpy(labels.copy()),
                        self.info)


@DATASETS.register("patches")
class NaturalPatches(DatasetSource):
    summary = "8×8 gray patches of scikit-learn's bundled photos (embedded; natural-image OOD)"
    info = DatasetInfo(channels=1, image_size=8, num_classes=0, mean=(0.5,), std=(0.5,))
    count = 1000

    def load(self, split: str, ctx: DataContext, like: DatasetInfo | None = None) -> ImageSet:
        from sklearn.datasets import load_sample_images

        self.check_split("patches", split)
        rng = np.random.default_rng(SPLIT_SEED)
        photos = []
        for img in load_sample_images().images:
            gray = torch.from_numpy(img.astype(np.float32).mean(axis=2))[None, None]
            # Shrink 4× first so an 8×8 patch spans object-scale structure, like a digit does.
            photos.append(F.avg_pool2d(gray, 4)[0, 0].numpy())
        patches = np.empty((self.count, 1, 8, 8), dtype=np.uint8)
        for k in range(self.count):
            photo = photos[k % len(photos)]
            y = rng.integers(0, photo.shape[0] - 8)
            x = rng.integers(0, photo.shape[1] - 8)
            p = photo[y:y + 8, x:x + 8]
            lo, hi = p.min(), p.max()
            p = (p - lo) / (hi - lo) if hi > lo else np.zeros_like(p)
            patches[k, 0] = np.rint(p * 255).astype(np.uint8)
        return ImageSet("patches", torch.from_numpy(patches),
                        torch.full((self.count,), -1, dtype=torch.long), self.info)


class _Noise(DatasetSource):
    """Seeded noise with the in-distribution set's shape (`like`). The "val" split is drawn
    with another seed, so OOD validation never reuses a test image."""

    kind = ""
    splits = ("test", "val")

    def info_for(self, like: DatasetInfo | None = None) -> DatasetInfo:
        like = like or DIGITS_INFO
        return DatasetInfo(like.channels, like.image_size, 0, (), like.mean, like.std)

    def load(self, split: str, ctx: DataContext, like: DatasetInfo | None = None) -> ImageSet:
        self.check_split(self.kind, split)
        info = self.info_for(like)
        g = torch.Generator().manual_seed(SPLIT_SEED + (split == "val"))
        shape = (NOISE_COUNT, info.channels, info.image_size, info.image_size)
        if self.kind == "gaussian":
            x = torch.randn(shape, generator=g) * 64.0 + 127.5
        else:
            x = torch.rand(shape, generator=g) * 256.0
        images = x.clamp(0, 255).to(torch.uint8)
        return ImageSet(self.kind, images, torch.full((NOISE_COUNT,), -1, dtype=torch.long), info)


@DATASETS.register("gaussian")
class GaussianNoise(_Noise):
    summary = "Gaussian noise, mean 127.5, std 64 (of 255), clipped; shaped like the in-dist set"
    kind = "gaussian"


@DATASETS.register("uniform")
class UniformNoise(_Noise):
    summary = "uniform noise over 0..255; shaped like the in-distribution set"
    kind = "uniform"
