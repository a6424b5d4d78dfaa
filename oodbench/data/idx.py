"""The MNIST family in the idx format, torchvision's layout:
`<Folder>/raw/<split>-images-idx3-ubyte` (and `-labels-idx1-ubyte`), uncompressed or `.gz`.

idx files already hold raw uint8 pixels, so they are parsed straight into tensors (no decode
cache needed). `mnist`, `fashionmnist` and `kmnist` can be downloaded by torchvision when the
user allows it (`oodbench data --download NAME`); `notmnist` (test split only) cannot.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from oodbench.data.base import DATASETS, DataContext, DatasetInfo, ImageSet
from oodbench.data.files import FileSource, Resource
from oodbench.errors import OodbenchError

IDX_UBYTE = 0x08
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (or `path.gz`) as a uint8 array of its declared shape."""
    if not path.is_file() and Path(f"{path}.gz").is_file():
        path = Path(f"{path}.gz")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise OodbenchError(f"cannot read idx file {path}: {e}",
                            "the file is missing or corrupt: fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise OodbenchError(f"{path} is not an idx file (bad magic number)",
                            "fetch the original file again")
    if raw[2] != IDX_UBYTE:
        raise OodbenchError(f"{path}: idx element type 0x{raw[2]:02x} is not unsigned byte",
                            "oodbench reads uint8 idx files (the MNIST family)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise OodbenchError(f"{path} is truncated (incomplete header)", "fetch it again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise OodbenchError(f"{path} is truncated or padded: {len(raw)} bytes, the header "
                            f"{dims} implies {expected}", "fetch the original file again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


class IdxSource(FileSource):
    """A 28×28 gray idx dataset in `folder/raw/` under the data root."""

    name = ""
    folder = ""
    splits = ("train", "test")
    md5s: dict[str, str] = {}  # file name → md5 of the uncompressed reference file
    torchvision_class = ""

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        cls.resources = tuple(Resource(f"{cls.folder}/raw/{f}", cls.md5s.get(f))
                              for s in cls.splits for f in idx_names(s))
        cls.can_download = bool(cls.torchvision_class)

    def missing(self, ctx: DataContext) -> list[Path]:
        # a gzipped copy counts as present
        return [p for p in super().missing(ctx) if not Path(f"{p}.gz").is_file()]

    def status(self, ctx: DataContext) -> str:
        if not self.missing(ctx) and any(not self.locate(ctx, r.path).is_file()
                                         for r in self.resources):
            return "present"  # only .gz copies: the checksums are of uncompressed files
        return super().status(ctx)

    def load(self, split: str, ctx: DataContext, like: DatasetInfo | None = None) -> ImageSet:
        self.check_split(self.name, split)
        img_name, lab_name = idx_names(split)
        self.require(ctx, self.name, only=tuple(f"{self.folder}/raw/{f}"
                                                for f in (img_name, lab_name)))
        images = read_idx(self.locate(ctx, f"{self.folder}/raw/{img_name}"))
        labels = read_idx(self.locate(ctx, f"{self.folder}/raw/{lab_name}"))
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise OodbenchError(f"{self.name} {split}: images {images.shape} and labels "
                                f"{labels.shape} are not N×28×28 and N",
                                "the idx files do not match: fetch them again")
        if labels.size and int(labels.max()) >= self.info.num_classes:
            raise OodbenchError(f"{self.name} {split}: label {int(labels.max())} out of range",
                                "the labels file is corrupt: fetch it again")
        return ImageSet(self.name, torch.from_numpy(images.copy())[:, None],
                        torch.from_numpy(labels.astype(np.int64)), self.info)

    def download(self, ctx: DataContext) -> None:
        import torchvision.datasets as tvd

        try:
            getattr(tvd, self.torchvision_class)(str(ctx.root), train=True, download=True)
            getattr(tvd, self.torchvision_class)(str(ctx.root), train=False, download=True)
        except Exception as e:  # network and archive errors of every kind
            raise OodbenchError(f"downloading {self.name} failed: {e}",
                                self.how_to_get_by_hand()) from e


def idx_names(split: str) -> tuple[str, str]:
    p = SPLIT_PREFIX[split]
    return f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"


def _tv_how(cls: str, folder: str) -> str:
    return (f"`oodbench data --download {cls.lower()}` (torchvision, needs internet), or put the "
            f"four idx files (optionally .gz) in {folder}/raw/ under the data root")


@DATASETS.register("mnist")
class Mnist(IdxSource):
    summary = "MNIST handwritten digits, 28×28 gray, 60k + 10k (idx)"
    name, folder, torchvision_class = "mnist", "MNIST", "MNIST"
    info = DatasetInfo(1, 28, 10, tuple(str(d) for d in range(10)), (0.1307,), (0.3081,))
    md5s = {"t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624"}
    obtain = _tv_how("MNIST", "MNIST")


@DATASETS.register("fashionmnist")
class FashionMnist(IdxSource):
    summary = "Fashion-MNIST clothing images, 28×28 gray, 60k + 10k (idx)"
    name, folder, torchvision_class = "fashionmnist", "FashionMNIST", "FashionMNIST"
    info = DatasetInfo(1, 28, 10, ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
                       (0.2860,), (0.3530,))
    md5s = {"t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9"}
    obtain = _tv_how("FashionMNIST", "FashionMNIST")


@DATASETS.register("kmnist")
class Kmnist(IdxSource):
    summary = "Kuzushiji-MNIST cursive Japanese characters, 28×28 gray, 60k + 10k (idx)"
    name, folder, torchvision_class = "kmnist", "KMNIST", "KMNIST"
    info = DatasetInfo(1, 28, 10, ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
                       (0.1918,), (0.3483,))
    obtain = _tv_how("KMNIST", "KMNIST")


@DATASETS.register("notmnist")
class NotMnist(IdxSource):
    summary = "notMNIST letters A-J in many fonts, 28×28 gray, test split only, 10k (idx)"
    name, folder = "notmnist", "notMNIST"
    splits = ("test",)
    info = DatasetInfo(1, 28, 10, tuple("ABCDEFGHIJ"), (0.4266,), (0.4589,))
    md5s = {"t10k-images-idx3-ubyte": "1e78b07d677d6e4de2c8857bafff012e",
            "t10k-labels-idx1-ubyte": "b10b3ef34b4e468313a7b24c216c6a53"}
    obtain = ("no official download exists: convert the notMNIST_small test letters to idx "
              "files notMNIST/raw/t10k-{images-idx3,labels-idx1}-ubyte under the data root")
