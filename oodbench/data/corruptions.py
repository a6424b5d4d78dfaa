"""Covariate shift: corrupted copies of an image set, as in CIFAR-10-C (Hendrycks & Dietterich,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019).

A corrupted in-distribution test set keeps its labels: it is in-distribution data under
covariate shift ("full-spectrum" OOD evaluation asks a detector to accept it, or at least to
rank it between the clean test set and the semantic OOD sets).

Each corruption is a batched torch function of uint8 N×C×H×W images (any device) returning
uint8 images of the same shape; `corrupt(images, name, severity, seed)` picks the parameter of
severity 1..5 from the table below. Work is in float32 on [0, 1] and the result is rounded to
the nearest integer once at the end (CIFAR-10-C truncates with `np.uint8`, which darkens every
image by half a level on average; rounding does not).

Parameters per severity 1..5 (CIFAR-10-C's `make_cifar_c.py` values, for 32×32 images):

* gaussian_noise: clip(x + N(0, σ²)) on [0, 1]; σ = .04, .06, .08, .09, .10.
* gaussian_blur: Gaussian filter of σ pixels, radius int(4σ + .5), edge pixels repeated
  (scipy / skimage's defaults, which CIFAR-10-C uses); σ = .4, .6, .7, .8, 1.0 (see sizes below).
* contrast: clip((x − m)·c + m), m = the image's mean per channel; c = .75, .5, .4, .3, .15.
* jpeg_compression: JPEG encode then decode with Pillow (libjpeg, Pillow's defaults: 4:2:0
  chroma subsampling for RGB), as CIFAR-10-C does; quality = 80, 65, 58, 50, 40.
* pixelate: box (area) downsample to int(s·f) pixels a side, nearest upsample back to s;
  f = .95, .90, .85, .75, .65.

Image size (`s` = the smaller side): CIFAR-10-C's spatial parameters are for s = 32.

* pixelate's factor `f` is relative to the image, so it scales by construction: the
  low-resolution side is `max(1, int(s·f))`: 30, 28, 27, 24, 20 px at 32 (CIFAR-10-C's), 26, 25,
  23, 21, 18 at 28, and 7, 7, 6, 6, 5 at 8, where severities 1 and 2 (and 3 and 4) coincide.
  The mean pixel change of pixelate does not grow with severity (resampling to a grid that is
  not a divisor of s shifts edges by up to half a pixel at every severity, CIFAR-10-C's rule
  included); what grows is the detail lost: the output is an int(s·f)-pixel image.
* gaussian_blur's σ is in pixels and scales with the image above 32 px only:
  σ_s = σ·max(s, 32)/32 (×2 at 64 px, ×7 at 224 px; as is at 28 px and 8 px). Shrinking it for
  smaller images (σ·8/32 = .1 to .25 px on 8×8 digits) leaves every pixel within half a level of
  the clean image after rounding, i.e. no corruption at all at any severity; a σ of .4 to 1 px is
  already the smallest blur a pixel grid can show.
* gaussian_noise, contrast and jpeg_compression have no spatial parameter and are used as is.

Determinism: the result is a pure function of (pixels, corruption, severity, seed,
`CORRUPTION_VERSION`). Random corruptions draw from a CPU `torch.Generator` seeded with
`noise_seed(name, severity, seed)`, in chunks of `CHUNK` images in order, so the same call gives
the same bytes on any device and machine. A set is recomputed when needed, not stored
(`oodbench.experiment.load_shifted`): 10,000 CIFAR images take 0.1 to 2.5 s per corruption and
severity on two busy CPU cores (blur and JPEG the slowest).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from oodbench.errors import OodbenchError
from oodbench.registry import Registry

CORRUPTION_VERSION = 1  # bump when any corruption's output changes
SHIFT_SEED = 0  # the fixed seed of the benchmark's corrupted sets
SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 32  # the image side CIFAR-10-C's spatial parameters are given for
CHUNK = 2048  # images corrupted (and noise drawn) per step, bounding float memory

# A corruption function: (uint8 images N×C×H×W, the severity's parameter, generator) → uint8.
CorruptionFn = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Corruption:
    """A registered corruption: its function and its parameter at severities 1..5."""

    fn: CorruptionFn
    levels: tuple[float, ...]
    summary: str = ""

    def level(self, severity: int) -> float:
        return self.levels[check_severity(severity) - 1]


def _entry(fn: CorruptionFn, *, levels: tuple[float, ...], summary: str = "") -> Corruption:
    if len(levels) != len(SEVERITIES):
        raise ValueError(f"{fn.__name__}: needs one level per severity {SEVERITIES}")
    return Corruption(fn, tuple(levels), summary)


# `@CORRUPTIONS.register("name", levels=(...), summary=...)` on a corruption function.
CORRUPTIONS: Registry[Corruption] = Registry("corruption", entry=_entry)


# ---------------------------------------------------------------------------------------------
# Helpers.


def check_severity(severity: object) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise OodbenchError(f"corruption severity must be an integer 1..5, got {severity!r}",
                            "use a severity from 1 (mild) to 5 (strongest)")
    return severity


def check_corruption_names(names: Iterable[str], where: str = "shift.corruptions") -> None:
    """Every name is a registered corruption; one error listing all unknown ones otherwise."""
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise OodbenchError(f"`{where}`: unknown corruption(s) {', '.join(map(repr, unknown))}",
                            f"valid corruptions: {', '.join(CORRUPTIONS.names())}")


def noise_seed(name: str, severity: int, seed: int) -> int:
    """The generator seed of (corruption, severity, seed): the first 8 bytes of
    sha256("<name>|<severity>|<seed>"), as an integer below 2**63."""
    digest = hashlib.sha256(f"{name}|{severity}|{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def shifted_name(corruption: str, severity: int) -> str:
    """The name of a corrupted set (a plain file name): `shift-<corruption>-<severity>`."""
    return f"shift-{corruption}-{severity}"


def side(images: torch.Tensor) -> int:
    return int(min(images.shape[-2:]))


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """scipy / skimage's 1-D Gaussian: radius int(4σ + 0.5), weights normalised to sum 1."""
    radius = int(4.0 * sigma + 0.5)
    i = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (i / sigma) ** 2)
    return (k / k.sum()).float()


def blur_sigma(sigma32: float, size: int) -> float:
    """A CIFAR-10-C blur σ (pixels at 32 px) for images of side `size`: σ·max(size, 32)/32."""
    return sigma32 * max(size, REFERENCE_SIZE) / REFERENCE_SIZE


def pixelate_size(factor: float, size: int) -> int:
    """The low-resolution side of pixelate: max(1, int(size·factor)) (CIFAR-10-C's rule)."""
    return max(1, int(size * factor + 1e-9))


# ---------------------------------------------------------------------------------------------
# The corruptions (uint8 in, uint8 out, batched).


@CORRUPTIONS.register("gaussian_noise", levels=(0.04, 0.06, 0.08, 0.09, 0.10),
                      summary="additive Gaussian noise, σ on the [0, 1] scale")
def gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator
                   ) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
    return _to_uint8(_to_float(images) + sigma * noise.to(images.device))


@CORRUPTIONS.register("gaussian_blur", levels=(0.4, 0.6, 0.7, 0.8, 1.0),
                      summary="Gaussian blur, σ in pixels of a 32 px image (scaled with size)")
def gaussian_blur(images: torch.Tensor, sigma32: float, generator: torch.Generator
                  ) -> torch.Tensor:
    h, w = images.shape[-2:]
    k = gaussian_kernel(blur_sigma(sigma32, side(images))).tolist()
    r = (len(k) - 1) // 2
    x = _to_float(images)
    if r > 0:  # separable: a weighted sum of shifted copies (≤ 9 taps; faster than conv2d)
        x = F.pad(x, (r, r, 0, 0), mode="replicate")
        x = sum(k[i] * x[..., :, i:i + w] for i in range(len(k)))
        x = F.pad(x, (0, 0, r, r), mode="replicate")
        x = sum(k[i] * x[..., i:i + h, :] for i in range(len(k)))
    return _to_uint8(x)


@CORRUPTIONS.register("contrast", levels=(0.75, 0.5, 0.4, 0.3, 0.15),
                      summary="contrast scaled by c around each image's per-channel mean")
def contrast(images: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    x = _to_float(images)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return _to_uint8((x - mean).mul_(c).add_(mean))


@CORRUPTIONS.register("jpeg_compression", levels=(80, 65, 58, 50, 40),
                      summary="JPEG encode and decode at this quality")
def jpeg_compression(images: torch.Tensor, quality: float, generator: torch.Generator
                     ) -> torch.Tensor:
    # Pillow (libjpeg, as CIFAR-10-C): torchvision.io's JPEG codec is deprecated since 0.29
    # (and gives the same bytes). One image at a time, in C: ~0.3 s per 10,000 CIFAR images.
    from PIL import Image

    cpu = images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
    out = np.empty_like(cpu)
    for i, img in enumerate(cpu):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
            buf, format="JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(buf))
        out[i] = decoded.reshape(img.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


@CORRUPTIONS.register("pixelate", levels=(0.95, 0.90, 0.85, 0.75, 0.65),
                      summary="box downsample to int(side·f) px, nearest upsample back")
def pixelate(images: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    h, w = images.shape[-2:]
    small = (pixelate_size(factor, h), pixelate_size(factor, w))
    # on the 0..255 scale, so a block mean that ends in .5 is exactly .5 (rounded to even)
    x = F.interpolate(images.float(), size=small, mode="area")
    x = F.interpolate(x, size=(h, w), mode="nearest-exact")
    return x.round_().clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The entry point.


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = SHIFT_SEED
            ) -> torch.Tensor:
    """`images` (uint8 N×C×H×W) with corruption `name` at `severity` (1..5), deterministic
    given `seed`; same shape, dtype and device."""
    spec = CORRUPTIONS.get(name)
    level = spec.level(severity)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"corrupt needs uint8 N×C×H×W images, got {images.dtype} "
                         f"{tuple(images.shape)}")
    generator = torch.Generator().manual_seed(noise_seed(name, severity, seed))
    n = images.shape[0]
    parts = [spec.fn(images[i:i + CHUNK], level, generator)
             for i in range(0, n, CHUNK)]
    out = torch.cat(parts) if len(parts) != 1 else parts[0]
    if out.shape != images.shape or out.dtype != torch.uint8:  # a registration bug
        raise AssertionError(f"corruption {name!r} returned {out.dtype} {tuple(out.shape)}")
    return out


def corruption_key(name: str, severity: int, seed: int = SHIFT_SEED) -> str:
    """What identifies a corrupted set besides its source pixels (for cache keys)."""
    return f"{name}|{severity}|{seed}|v{CORRUPTION_VERSION}"


__all__ = ["CORRUPTIONS", "CORRUPTION_VERSION", "SEVERITIES", "SHIFT_SEED", "Corruption",
           "check_corruption_names", "check_severity", "corrupt", "corruption_key",
           "noise_seed", "shifted_name"]
