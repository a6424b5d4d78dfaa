"""Image-folder datasets: `cifar10-jpeg`, the Tiny-ImageNet views of ODIN, the ODIN / Lee et al.
LSUN and iSUN folders, and `folder:PATH` for any folder a user has.

A folder is either *labelled* (one subfolder per class, images anywhere below it; classes in
sorted order) or *flat* (images directly in it, or below it for unlabelled sets; label -1).
Every image is decoded once (PIL, a few threads) into the uint8 decode cache; later loads are a
memory-map. Grayscale images in a colour set are replicated to three channels (lossless, and
Tiny-ImageNet holds some); images of a different size are an error naming the file, since
adaptation is a whole-set, explicit step of the benchmark (`adapt: true`). A folder is walked
without leaving it: links to directories outside it, and link loops, are not followed; a link to
an image outside it is an error. A file that is not an image is an error naming it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from oodbench.data.base import DATASETS, DataContext, DatasetInfo, DatasetSource, ImageSet
from oodbench.data.decoded import cached_decode
from oodbench.data.files import FileSource, Resource
from oodbench.data.transforms import crop_windows
from oodbench.errors import OodbenchError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                            ".ppm", ".pgm"})
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
VIEW_SEED = 20170625  # fixes the Tiny-ImageNet crop positions (any constant; never changes)


@dataclass
class Listing:
    files: list[str]
    labels: np.ndarray
    classes: tuple[str, ...]
    signature: str  # changes when any image is added, removed, resized or rewritten


class _Walk:
    """One walk of a dataset folder that stays inside it.

    The dataset is what lies inside its root folder. Symlinked *directories* are followed only
    when they resolve inside the root, and each real directory is walked once, so a `loop -> .`
    link ends and an `escape -> /` link is skipped (it would walk /proc). A symlinked *image
    file* that resolves outside the root is refused with an error naming it, rather than
    silently dropped: a folder that shrinks unnoticed would change the benchmark's numbers.
    """

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self.seen = {self.root}

    def inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)

    def enter(self, entry: os.DirEntry) -> bool:
        """Whether to descend into `entry`: a directory inside the root, not walked yet."""
        if entry.name.startswith(".") or not entry.is_dir():
            return False
        real = os.path.realpath(entry.path)  # through every link on the way
        if not self.inside(real) or real in self.seen:
            return False
        self.seen.add(real)
        return True

    def check_file(self, entry: os.DirEntry) -> None:
        if entry.is_symlink() and not self.inside(real := os.path.realpath(entry.path)):
            raise OodbenchError(
                f"image {entry.path} is a link to {real}, outside the dataset folder {self.root}",
                "copy the image into the folder (or delete the link); oodbench reads only files "
                "inside a dataset's folder")

    def scan(self, folder: str, out: list[tuple[str, int, int]]) -> None:
        """(path, size, mtime_ns) of every image below `folder`; one scandir pass per folder."""
        for e in _entries(folder):
            if e.name.startswith("."):
                continue
            if e.is_dir():
                if self.enter(e):
                    self.scan(e.path, out)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file():
                self.check_file(e)
                st = e.stat()
                out.append((e.path, st.st_size, st.st_mtime_ns))


def _entries(folder: str | Path) -> list[os.DirEntry]:
    """The entries of `folder` in name order (so which of two links to one directory is
    walked never depends on the filesystem's order); an unreadable folder is a user error."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise OodbenchError(f"cannot read folder {folder}: {e.strerror or e}",
                            "make it readable (permissions) or point to another folder") from None


def list_folder(folder: Path, labelled: bool | None = None) -> Listing:
    """The images of `folder` and their labels. `labelled=None` decides from the layout: class
    subfolders and no loose images → labelled; otherwise every image below, unlabelled.
    Only files inside `folder` are read (see `_Walk`)."""
    if not folder.is_dir():
        raise OodbenchError(f"image folder {folder} does not exist",
                            "check the path (and --data-root / $OODBENCH_DATA)")
    walk = _Walk(folder)
    entries = _entries(folder)
    subdirs = sorted(e.name for e in entries if walk.enter(e))
    loose = any(e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
                for e in entries)
    if labelled is None:
        labelled = bool(subdirs) and not loose
    found: list[tuple[str, int, int]] = []
    labels: list[int] = []
    if labelled:
        for k, c in enumerate(subdirs):
            part: list[tuple[str, int, int]] = []
            walk.scan(os.path.join(folder, c), part)
            part.sort()
            found.extend(part)
            labels.extend([k] * len(part))
        classes = tuple(subdirs)
    else:
        walk.seen = {walk.root}  # walk from the top again
        walk.scan(str(folder), found)
        found.sort()
        labels = [-1] * len(found)
        classes = ()
    if not found:
        raise OodbenchError(f"image folder {folder} holds no images",
                            f"put images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it, directly "
                            "or in one subfolder per class")
    h = hashlib.sha256(repr(classes).encode())
    h.update("\n".join(f"{p}\0{s}\0{m}" for p, s, m in found).encode())
    return Listing([p for p, _, _ in found], np.array(labels, dtype=np.int64), classes,
                   h.hexdigest())


TORCH_DECODABLE = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp"})


@lru_cache(maxsize=1)
def _torch_decoder():
    """torchvision's decode_image, or None where this torchvision no longer has it (its image
    codecs are deprecated since 0.29 in favour of TorchCodec); PIL then decodes everything."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None

    def decode(data: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # the deprecation warning is raised on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(data, mode=ImageReadMode.UNCHANGED)

    return decode


def _decode_one(path: str) -> np.ndarray:
    """One image as uint8 C×H×W, C = 1 (gray) or 3 (colour; alpha dropped). torchvision's
    decoder for JPEG / PNG / GIF / WebP (about twice as fast as PIL on small images), PIL for
    the rest and for whatever torchvision refuses. A failure names the file and says why."""
    arr = None
    decode = _torch_decoder()
    if decode is not None and os.path.splitext(path)[1].lower() in TORCH_DECODABLE:
        try:
            with open(path, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            x = decode(data)
            arr = (x[0] if x.dim() == 4 else x).numpy()  # animated GIF: first frame
        except Exception:  # PIL below decides, and its errors say what is wrong
            arr = None
    if arr is None:
        arr = _decode_pil(path)
    if arr.shape[0] in (2, 4):  # gray + alpha, RGB + alpha
        arr = arr[:arr.shape[0] - 1]
    return arr


def _decode_pil(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "RGB"):
                im = im.convert("L" if im.mode in ("1", "I", "I;16", "F") else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise _not_an_image(path) from None
    except Exception as e:  # decoders raise many types for damaged files
        raise OodbenchError(f"cannot decode image {path}: it is damaged or truncated ({e})",
                            f"replace {path} with an intact copy, or delete it") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


HEIF_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC",
               b"mif1": "HEIF", b"msf1": "HEIF"}


def _not_an_image(path: str) -> OodbenchError:
    """The error for a file no decoder recognises: an AVIF / HEIC image this Pillow cannot
    read (the one case where codec support is the fix), else a file that is not an image."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as e:
        return OodbenchError(f"cannot read image {path}: {e.strerror or e}",
                             f"make {path} readable, or delete it")
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        kind = HEIF_BRANDS[head[8:12]]
        return OodbenchError(f"image {path} is an {kind} image, which this installation "
                             "cannot decode",
                             f"convert it to PNG or JPEG (or install Pillow with {kind} "
                             "support), or delete it")
    what = "is empty (0 bytes)" if not head else "is not an image (no known image format)"
    return OodbenchError(f"file {path} {what}",
                         f"delete {path} or replace it with a real image (JPEG, PNG, ...)")


def decode_files(files: list[str], crop_to: int | None = None) -> np.ndarray:
    """Decode images into one uint8 N×C×H×W array. Colour if any image is colour (gray images
    are replicated); every image must have the first one's size (after the optional centre crop
    to `crop_to`, for sets published slightly larger than their nominal size)."""
    arrays = [_decode_one(f) for f in files]
    if crop_to is not None:
        arrays = [_centre_crop(a, crop_to, f) for a, f in zip(arrays, files, strict=True)]
    h, w = arrays[0].shape[1:]
    channels = 3 if any(a.shape[0] == 3 for a in arrays) else 1
    out = np.empty((len(arrays), channels, h, w), dtype=np.uint8)
    for i, (a, f) in enumerate(zip(arrays, files, strict=True)):
        if a.shape[1:] != (h, w):
            raise OodbenchError(
                f"image {f} is {a.shape[2]}×{a.shape[1]} but {files[0]} is {w}×{h}",
                "every image of a dataset must have one size: resize the folder's images "
                "(a benchmark can adapt a whole set to the model with `adapt: true`)")
        out[i] = a  # broadcasts a gray channel to three
    return out


def _centre_crop(a: np.ndarray, size: int, path: str) -> np.ndarray:
    h, w = a.shape[1:]
    if h < size or w < size:
        raise OodbenchError(f"image {path} is {w}×{h}, smaller than {size}×{size}",
                            "this dataset needs images of at least that size")
    y, x = (h - size) // 2, (w - size) // 2
    return a[:, y:y + size, x:x + size]


def load_folder(ctx: DataContext, cache_name: str, folder: Path, labelled: bool | None = None,
                crop_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Images, labels and class names of an image folder, through the decode cache."""
    listing = list_folder(folder, labelled)
    sig = f"{listing.signature}|crop={crop_to}"
    images, labels = cached_decode(ctx, cache_name, sig,
                                   lambda: (decode_files(listing.files, crop_to), listing.labels))
    return images, labels, listing.classes


def _check_shape(name: str, images: torch.Tensor, info: DatasetInfo, where: Path) -> None:
    c, h, w = images.shape[1:]
    if (c, h, w) != (info.channels, info.image_size, info.image_size):
        raise OodbenchError(
            f"dataset {name!r} in {where} holds {c}×{h}×{w} images, expected "
            f"{info.channels}×{info.image_size}×{info.image_size}",
            "use the original files of this dataset, or load the folder as `folder:PATH`")


class ImageFolderSource(FileSource):
    """A registered folder dataset under the data root: `split_dirs` maps split → folder."""

    name = ""
    split_dirs: dict[str, str] = {}
    labelled: bool | None = True
    crop_to: int | None = None

    def load(self, split: str, ctx: DataContext, like: DatasetInfo | None = None) -> ImageSet:
        self.check_split(self.name, split)
        self.require(ctx, self.name, only=(self.split_dirs[split],))
        folder = self.locate(ctx, self.split_dirs[split])
        images, labels, classes = load_folder(ctx, f"{self.name}-{split}", folder,
                                              self.labelled, self.crop_to)
        info = self.info_for(like)
        _check_shape(self.name, images, info, folder)
        if self.labelled and info.class_names and classes != info.class_names:
            raise OodbenchError(f"{folder} has class folders {list(classes)}, expected "
                                f"{list(info.class_names)}", "restore the original layout")
        return ImageSet(self.name, images, labels, info)


@DATASETS.register("cifar10-jpeg")
class Cifar10Jpeg(ImageFolderSource):
    summary = ("CIFAR-10 re-encoded as JPEG quality 75 (lossy; image folder "
               "cifar10-jpeg/{train,test}/<class>/); 50k + 10k, 10 classes")
    name = "cifar10-jpeg"
    splits = ("train", "test")
    split_dirs = {"train": "cifar10-jpeg/train", "test": "cifar10-jpeg/test"}
    # mean / std measured on this JPEG copy's training images (JPEG smooths: std ~0.001 lower
    # than official CIFAR-10's)
    info = DatasetInfo(3, 32, 10, CIFAR10_CLASSES, mean=(0.4913, 0.4821, 0.4465),
                       std=(0.2452, 0.2428, 0.2606))
    resources = (Resource("cifar10-jpeg/train", "35d5a6dd89874d00a5f4aca631a0a84f", folder=True),
                 Resource("cifar10-jpeg/test", "c0aa028a85fb5b913916be91e71f3612", folder=True))
    obtain = ("the JPEG copy of CIFAR-10 shared with this project (../shared/data/cifar10-jpeg); "
              "or write the official CIFAR-10 images as JPEG quality 75 into "
              "cifar10-jpeg/{train,test}/<class>/NNNN.jpg under the data root")


TINY_DIR = "tiny-imagenet-200/test/images"


class TinyImageNetView(FileSource):
    """ODIN's OOD views of the 10k Tiny-ImageNet test images, derived deterministically:
    `resize` averages each 2×2 block (64→32); `crop` takes one seeded random 32×32 window."""

    view = ""
    info = DatasetInfo(3, 32, 0, (), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    resources = (Resource(TINY_DIR, "7f24c0fd5897ab5b9e69da39c3607614", folder=True),)
    obtain = ("download tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
              f"and unzip it into the data root, so {TINY_DIR}/test_N.JPEG exist")

    def load(self, split: str, ctx: DataContext, like: DatasetInfo | None = None) -> ImageSet:
        name = f"tinyimagenet-{self.view}"
        self.check_split(name, split)
        self.require(ctx, name)
        folder = self.locate(ctx, TINY_DIR)
        listing = list_folder(folder, labelled=False)

        def derive() -> tuple[np.ndarray, np.ndarray]:
            images, _, _ = load_folder(ctx, "tiny-imagenet-200-test", folder, labelled=False)
            if images.shape[1:] != (3, 64, 64):
                raise OodbenchError(f"{folder} holds {tuple(images.shape[1:])} images, expected "
                                    "3×64×64 Tiny-ImageNet test images", self.obtain)
            v = downsample2(images) if self.view == "resize" else seeded_crops(images, 32)
            return v.numpy(), listing.labels

        # The view itself is cached too, so a later load is one memory-map.
        views, _ = cached_decode(ctx, name, f"{listing.signature}|seed={VIEW_SEED}", derive)
        return ImageSet(name, views, torch.full((len(views),), -1, dtype=torch.long), self.info)


def downsample2(images: torch.Tensor) -> torch.Tensor:
    """Exact 2× downsampling by averaging 2×2 blocks (area interpolation), rounded to uint8."""
    n, c, h, w = images.shape
    blocks = images.reshape(n, c, h // 2, 2, w // 2, 2).to(torch.int16).sum(dim=(3, 5))
    return ((blocks + 2) // 4).to(torch.uint8)  # round half up


def seeded_crops(images: torch.Tensor, size: int, seed: int = VIEW_SEED) -> torch.Tensor:
    """One random size×size window per image; positions depend only on `seed` and the count."""
    n, _, h, w = images.shape
    g = torch.Generator().manual_seed(seed)
    dy = torch.randint(0, h - size + 1, (n,), generator=g)
    dx = torch.randint(0, w - size + 1, (n,), generator=g)
    return crop_windows(images, dy, dx, size, size).contiguous()


@DATASETS.register("tinyimagenet-resize")
class TinyImageNetResize(TinyImageNetView):
    summary = "Tiny-ImageNet test images downsampled 64→32 (ODIN's TinyImageNet (resize)); 10k"
    view = "resize"


@DATASETS.register("tinyimagenet-crop")
class TinyImageNetCrop(TinyImageNetView):
    summary = "seeded random 32×32 crops of the Tiny-ImageNet test images (ODIN's (crop)); 10k"
    view = "crop"


class OdinFolder(ImageFolderSource):
    """An OOD folder published with ODIN (Liang et al. 2018), unpacked into the data root."""

    labelled = False
    info = DatasetInfo(3, 32, 0, (), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        folder = cls.split_dirs["test"]
        cls.resources = (Resource(folder, None, folder=True),)
        cls.obtain = (f"download {folder}.tar.gz (links in the README of "
                      "github.com/facebookresearch/odin) and extract it into the data root "
                      f"as {folder}/")


@DATASETS.register("lsun-resize")
class LsunResize(OdinFolder):
    summary = "LSUN test images downsampled to 32×32 (ODIN's LSUN_resize); user-supplied"
    name = "lsun-resize"
    split_dirs = {"test": "LSUN_resize"}


@DATASETS.register("lsun-crop")
class LsunCrop(OdinFolder):
    summary = "32×32 crops of LSUN test images (ODIN's LSUN); user-supplied"
    name = "lsun-crop"
    split_dirs = {"test": "LSUN"}
    crop_to = 32  # centre crop when the published files are a little larger


@DATASETS.register("isun")
class ISun(OdinFolder):
    summary = "iSUN images downsampled to 32×32 (ODIN's iSUN); user-supplied"
    name = "isun"
    split_dirs = {"test": "iSUN"}


FOLDER_PREFIX = "folder:"


class UserFolder(FileSource):
    """`folder:PATH`: any image folder (class subfolders → labelled, else unlabelled OOD data).
    PATH is absolute or relative to the current directory (a run stores it absolute: see
    `absolute_dataset_name`). Only files inside PATH are read (see `_Walk`). One split, "test",
    unless the folder has `train/` and `test/` subfolders, which then are the splits."""

    def __init__(self, path: str) -> None:
        self.path = Path(path).expanduser()
        self.name = f"{FOLDER_PREFIX}{path}"
        self.summary = f"images in {self.path}"
        split_root = (self.path / "train").is_dir() and (self.path / "test").is_dir()
        self.splits = ("train", "test") if split_root else ("test",)
        self._split_root = split_root
        self.obtain = f"create {self.path} with images (one subfolder per class, or flat)"

    def locate(self, ctx: DataContext, rel: str) -> Path:
        return self.path

    def resources_for(self, ctx: DataContext) -> tuple[Resource, ...]:
        return (Resource(str(self.path), None, folder=True),)

    def missing(self, ctx: DataContext) -> list[Path]:
        return [] if self.path.is_dir() else [self.path]  # an empty folder fails at load

    def _folder(self, split: str) -> Path:
        return self.path / split if self._split_root else self.path

    def info_for(self, like: DatasetInfo | None = None) -> DatasetInfo:
        """Shape from the first image, classes from the subfolders (cheap: decodes one image)."""
        listing = list_folder(self._folder(self.splits[0]))
        c, h, _ = _decode_one(listing.files[0]).shape
        return DatasetInfo(c, h, len(listing.classes), listing.classes,
                           mean=(0.5,) * c, std=(0.5,) * c)

    def load(self, split: str, ctx: DataContext, like: DatasetInfo | None = None) -> ImageSet:
        self.check_split(self.name, split)
        self.require(ctx, self.name)
        key = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:12]
        images, labels, classes = load_folder(ctx, f"folder-{key}-{split}", self._folder(split))
        c, h, w = images.shape[1:]
        if h != w:
            raise OodbenchError(f"{self.path}: images are {w}×{h}; oodbench needs square images",
                                "crop or resize the images to a square size")
        info = DatasetInfo(c, h, len(classes), classes, mean=(0.5,) * c, std=(0.5,) * c)
        return ImageSet(self.name, images, labels, info)


def absolute_dataset_name(name: str, base: Path | None = None) -> str:
    """`folder:rel/path` → `folder:/abs/path` (relative to `base`, default the current
    directory; `~` expanded, links and `..` resolved); every other name unchanged.

    A run stores this form in its config when it is created, so calibrating or scoring it
    later from another directory reads the same images as training did."""
    if not name.startswith(FOLDER_PREFIX) or not name[len(FOLDER_PREFIX):]:
        return name  # `folder:` alone stays an error for get_dataset to report
    path = Path(name[len(FOLDER_PREFIX):]).expanduser()
    if not path.is_absolute():
        path = (base if base is not None else Path.cwd()) / path
    return f"{FOLDER_PREFIX}{path.resolve()}"


def get_dataset(name: str) -> DatasetSource:
    """The source registered as `name`, or a `UserFolder` for a parametric `folder:PATH`."""
    if name.startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX):]
        if not path:
            raise OodbenchError("`folder:` needs a path", "write folder:/path/to/images")
        return UserFolder(path)
    return DATASETS.get(name)
