"""Synthetic auxiliary-outlier data, built in so Outlier Exposure needs no download.

`blobs`: the "Blobs" set of Hendrycks et al. (Outlier Exposure, ICLR 2019, appendix / their
`test.py`): "algorithmically generated amorphous shapes with definite edges". Per image and
channel: Bernoulli(0.7) pixels, a Gaussian blur of σ = 1.5 pixels, then every value below 0.75
set to 0 (values kept otherwise), scaled to 0..255. Shaped like the in-distribution set
(`like`), as the noise sets are. Spatially correlated shapes with hard edges are a different
distribution from the i.i.d. `gaussian` / `uniform` noise and from photo `patches`, which is
why it is the digits / MNIST benchmarks' auxiliary outlier set while those are OOD test sets.
Splits `train` / `val` / `test` use distinct seeds, so their images differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oodbench.data.base import DATASETS, DataContext, DatasetInfo, DatasetSource, ImageSet

BLOBS_SEED = 20190101
BLOBS_COUNTS = {"train": 5000, "val": 1000, "test": 1000}
BLOBS_P, BLOBS_SIGMA, BLOBS_THRESHOLD = 0.7, 1.5, 0.75


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an N×C×H×W float batch (radius 4σ, edge-replicating pad)."""
    radius = max(1, math.ceil(4 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


@DATASETS.register("blobs")
class Blobs(DatasetSource):
    summary = ("blurred, thresholded Bernoulli blobs (Hendrycks et al. 2019); shaped like the "
               "in-dist set; auxiliary outliers")
    splits = ("train", "val", "test")

    def info_for(self, like: DatasetInfo | None = None) -> DatasetInfo:
        from oodbench.data.embedded import DIGITS_INFO

        like = like or DIGITS_INFO
        return DatasetInfo(like.channels, like.image_size, 0, (), like.mean, like.std)

    def load(self, split: str, ctx: DataContext, like: DatasetInfo | None = None) -> ImageSet:
        self.check_split("blobs", split)
        info = self.info_for(like)
        n = BLOBS_COUNTS[split]
        g = torch.Generator().manual_seed(BLOBS_SEED + self.splits.index(split))
        shape = (n, info.channels, info.image_size, info.image_size)
        x = gaussian_blur(torch.bernoulli(torch.full(shape, BLOBS_P), generator=g), BLOBS_SIGMA)
        x = torch.where(x < BLOBS_THRESHOLD, torch.zeros_like(x), x)
        images = (x * 255.0).round().clamp(0, 255).to(torch.uint8)
        return ImageSet("blobs", images, torch.full((n,), -1, dtype=torch.long), info)
