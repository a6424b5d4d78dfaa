"""CIFAR-10 / CIFAR-100 (python pickles) and SVHN (.mat), in torchvision's layout under the
data root: `cifar-10-batches-py/`, `cifar-100-python/`, `SVHN/{train,test}_32x32.mat`.

Files are read by oodbench itself (so a bad file is an error naming it) and decoded once into
the uint8 decode cache; torchvision only downloads, and only when the user asks
(`oodbench data --download NAME`). The CIFAR pickles are read with an unpickler that admits
nothing but numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from oodbench.data.base import DATASETS, DataContext, DatasetInfo, ImageSet
from oodbench.data.decoded import cached_decode, stat_signature
from oodbench.data.files import FileSource, Resource
from oodbench.data.folders import CIFAR10_CLASSES
from oodbench.errors import OodbenchError

_CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain "
    "mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain "
    "plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
    "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree "
    "wolf woman worm")
CIFAR100_CLASSES = tuple(_CIFAR100_NAMES.split())
assert len(CIFAR100_CLASSES) == 100


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays; refuses every other global."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: uint8 N×3×32×32 images and int64 labels."""
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except FileNotFoundError:
        raise OodbenchError(f"missing CIFAR file {path}", "download the dataset again") from None
    except Exception as e:  # truncated / corrupt pickles raise many types
        raise OodbenchError(f"cannot read CIFAR batch {path}: {type(e).__name__}: {e}",
                            "the file is corrupt or truncated: download the dataset again"
                            ) from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise OodbenchError(f"{path}: data {data.shape} / labels {labels.shape} are not a CIFAR "
                            "batch (N×3072 and N)", "download the dataset again")
    return data.reshape(-1, 3, 32, 32), labels


class CifarSource(FileSource):
    name = ""
    folder = ""
    files: dict[str, tuple[str, ...]] = {}
    md5s: dict[str, str] = {}
    label_key = ""
    torchvision_class = ""
    splits = ("train", "test")
    can_download = True

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        cls.resources = tuple(Resource(f"{cls.folder}/{f}", cls.md5s.get(f))
                              for s in cls.splits for f in cls.files[s])
        cls.obtain = (f"`oodbench data --download {cls.name}` (torchvision, needs internet), or "
                      f"extract the official {cls.folder} archive into the data root")

    def load(self, split: str, ctx: DataContext, like: DatasetInfo | None = None) -> ImageSet:
        self.check_split(self.name, split)
        rels = tuple(f"{self.folder}/{f}" for f in self.files[split])
        self.require(ctx, self.name, only=rels)
        paths = [self.locate(ctx, r) for r in rels]

        def decode() -> tuple[np.ndarray, np.ndarray]:
            parts = [read_cifar_batch(p, self.label_key) for p in paths]
            labels = np.concatenate([lab for _, lab in parts])
            if labels.size and (labels.min() < 0 or labels.max() >= self.info.num_classes):
                raise OodbenchError(f"{self.name}: labels outside 0..{self.info.num_classes - 1}",
                                    "the files are corrupt: download the dataset again")
            return np.concatenate([img for img, _ in parts]), labels

        images, labels = cached_decode(ctx, f"{self.name}-{split}", stat_signature(paths), decode)
        return ImageSet(self.name, images, labels, self.info)

    def download(self, ctx: DataContext) -> None:
        import torchvision.datasets as tvd

        try:
            for train in (True, False):
                getattr(tvd, self.torchvision_class)(str(ctx.root), train=train, download=True)
        except Exception as e:  # network and archive errors of every kind
            raise OodbenchError(f"downloading {self.name} failed: {e}",
                                self.how_to_get_by_hand()) from e


@DATASETS.register("cifar10")
class Cifar10(CifarSource):
    summary = "CIFAR-10 (official python pickles), 32×32 colour, 50k + 10k, 10 classes"
    name, folder, label_key, torchvision_class = "cifar10", "cifar-10-batches-py", "labels", \
        "CIFAR10"
    files = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
    md5s = {"data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e"}
    info = DatasetInfo(3, 32, 10, CIFAR10_CLASSES, mean=(0.4914, 0.4822, 0.4465),
                       std=(0.2470, 0.2435, 0.2616))


@DATASETS.register("cifar100")
class Cifar100(CifarSource):
    summary = "CIFAR-100 (official python pickles), 32×32 colour, 50k + 10k, 100 classes"
    name, folder, label_key, torchvision_class = "cifar100", "cifar-100-python", "fine_labels", \
        "CIFAR100"
    files = {"train": ("train",), "test": ("test",)}
    md5s = {"train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}
    info = DatasetInfo(3, 32, 100, CIFAR100_CLASSES, mean=(0.5071, 0.4865, 0.4409),
                       std=(0.2673, 0.2564, 0.2762))


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN cropped-digits .mat file: uint8 N×3×32×32 and labels 0..9 (the file's 10 is 0)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), variable_names=("X", "y"))
        x, y = mat["X"], mat["y"]
    except Exception as e:  # scipy raises many types for bad files
        raise OodbenchError(f"cannot read SVHN file {path}: {type(e).__name__}: {e}",
                            "the file is corrupt or truncated: download it again") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise OodbenchError(f"{path}: X {x.shape} / y {y.shape} are not SVHN 32×32×3×N and N",
                            "use the cropped-digits files train_32x32.mat / test_32x32.mat")
    labels = y.reshape(-1).astype(np.int64) % 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8), labels


@DATASETS.register("svhn")
class Svhn(FileSource):
    summary = "SVHN cropped house-number digits (.mat), 32×32 colour, 73,257 + 26,032, 10 classes"
    splits = ("train", "test")
    can_download = True
    info = DatasetInfo(3, 32, 10, tuple(str(d) for d in range(10)),
                       mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970))
    resources = (Resource("SVHN/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
                 Resource("SVHN/test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"))
    obtain = ("`oodbench data --download svhn` (torchvision, needs internet), or put "
              "train_32x32.mat and test_32x32.mat (ufldl.stanford.edu/housenumbers) in SVHN/ "
              "under the data root")

    def load(self, split: str, ctx: DataContext, like: DatasetInfo | None = None) -> ImageSet:
        self.check_split("svhn", split)
        self.require(ctx, "svhn", only=(f"SVHN/{split}_32x32.mat",))
        path = self.locate(ctx, f"SVHN/{split}_32x32.mat")
        images, labels = cached_decode(ctx, f"svhn-{split}", stat_signature([path]),
                                       lambda: read_svhn_mat(path))
        return ImageSet("svhn", images, labels, self.info)

    def download(self, ctx: DataContext) -> None:
        import torchvision.datasets as tvd

        try:
            for split in self.splits:
                tvd.SVHN(str(Path(ctx.root) / "SVHN"), split=split, download=True)
        except Exception as e:  # network errors of every kind
            raise OodbenchError(f"downloading svhn failed: {e}",
                                self.how_to_get_by_hand()) from e
