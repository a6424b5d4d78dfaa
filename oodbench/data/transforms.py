"""Turning uint8 batches into model inputs, on the device, as batched tensor operations.

`InputTransform` is the whole deterministic path from stored pixels to network input (explicit
adaptation, then normalisation); its `key()` enters the output-cache key. `augment` is the
training-time random part (crop with padding, horizontal flip), done for a whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from oodbench.data.base import DatasetInfo


@dataclass(frozen=True)
class InputTransform:
    """uint8 N×C×H×W → float input: optional resize / channel adaptation, then normalisation.

    Adaptation exists for cross-domain OOD sets (MNIST as OOD for a 32×32 RGB model); it is
    never implicit: a benchmark must ask for it, and a shape mismatch without it is an error.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int | None = None
    channels: int | None = None

    @classmethod
    def for_model(cls, info: DatasetInfo) -> InputTransform:
        return cls(tuple(info.mean), tuple(info.std))

    def adapted(self, size: int | None, channels: int | None) -> InputTransform:
        return InputTransform(self.mean, self.std, size, channels)

    def key(self) -> str:
        return (f"InputTransform(mean={self.mean},std={self.std},size={self.size},"
                f"ch={self.channels})")

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Resize / change channels of a float batch in [0, 1]."""
        if self.channels is not None and x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"cannot adapt {x.shape[1]} channels to {self.channels}")
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              antialias=True, align_corners=False)
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.adapt(images.float().div_(255.0))
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


def crop_windows(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int
                 ) -> torch.Tensor:
    """Window h×w at (dy[i], dx[i]) of each image i, as one batched gather (any dtype/device)."""
    dev = images.device
    rows = (dy.to(dev)[:, None] + torch.arange(h, device=dev))[:, :, None]  # N×h×1
    cols = (dx.to(dev)[:, None] + torch.arange(w, device=dev))[:, None, :]  # N×1×w
    batch = torch.arange(images.shape[0], device=dev)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def augment(images: torch.Tensor, crop_padding: int = 0, flip: bool = False,
            generator: torch.Generator | None = None,
            rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole batch at once.

    Works on any dtype (uint8 included) and device; no per-sample Python. `rows` = (offset,
    total): `images` are rows offset.. of a batch of `total`; the random numbers of the whole
    batch are drawn and this part's used, so a rank's shard gets the crops and flips it would
    get in the undivided batch (and the generator advances as for the whole batch).
    """
    n, _, h, w = images.shape
    offset, total = rows if rows is not None else (0, n)
    part = slice(offset, offset + n)
    dev = images.device
    out = images
    if crop_padding > 0:
        p = crop_padding
        padded = F.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (total,), generator=generator)[part]
        dx = torch.randint(0, 2 * p + 1, (total,), generator=generator)[part]
        out = crop_windows(padded, dy, dx, h, w)
    if flip:
        mask = (torch.rand(total, generator=generator)[part] < 0.5).to(dev).view(n, 1, 1, 1)
        out = torch.where(mask, out.flip(3), out)
    return out.contiguous()
