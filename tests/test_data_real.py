"""The loaders on the real data in ../shared/data (or $OODBENCH_DATA).

Each test checks a dataset when its files are under the data root and skips, saying which files
it looked for, when they are not, so the suite passes on a machine with any subset of the data
(the shared mirror today lacks cifar10, cifar100, svhn and LSUN; a GPU box may have them all).
Where the files sit is written out by hand below, not asked of the loaders under test.
Kept fast: whole test splits at most, and only a few images of an image folder decoded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oodbench.config import available_benchmarks, load_benchmark
from oodbench.data import DataContext, get_dataset
from oodbench.data.availability import require_benchmark_data
from oodbench.data.folders import decode_files, downsample2, list_folder, seeded_crops
from oodbench.errors import OodbenchError


def _idx(folder: str, splits: tuple[str, ...] = ("train", "t10k")) -> tuple[str, ...]:
    return tuple(f"{folder}/raw/{s}-{kind}" for s in splits
                 for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


# Files (or non-empty folders) each dataset needs under the data root; () = built in.
ON_DISK: dict[str, tuple[str, ...]] = {
    "digits": (), "patches": (), "gaussian": (), "uniform": (),
    "mnist": _idx("MNIST"),
    "fashionmnist": _idx("FashionMNIST"),
    "notmnist": _idx("notMNIST", ("t10k",)),
    "cifar10": tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6))
    + ("cifar-10-batches-py/test_batch",),
    "cifar100": ("cifar-100-python/train", "cifar-100-python/test"),
    "svhn": ("SVHN/train_32x32.mat", "SVHN/test_32x32.mat"),
    "cifar10-jpeg": ("cifar10-jpeg/train", "cifar10-jpeg/test"),
    "tinyimagenet-resize": ("tiny-imagenet-200/test/images",),
    "tinyimagenet-crop": ("tiny-imagenet-200/test/images",),
    "lsun-resize": ("LSUN_resize",),
}


def _there(p: Path) -> bool:
    """A file (idx files may be gzipped) or a folder with something in it."""
    return p.is_file() or p.with_name(p.name + ".gz").is_file() or (
        p.is_dir() and any(p.iterdir()))


def absent_files(root: Path, name: str) -> list[str]:
    return [rel for rel in ON_DISK[name] if not _there(root / rel)]


def need(root: Path, name: str) -> None:
    """Skip the calling test, naming the files, unless dataset `name` is under `root`."""
    gone = absent_files(root, name)
    if gone:
        pytest.skip(f"{name} is not under {root} (looked for {', '.join(gone)})")


def ctx(root: Path, tmp_path: Path) -> DataContext:
    return DataContext(root, tmp_path / "cache")


@pytest.mark.parametrize("name,splits", [("mnist", {"train": 60000, "test": 10000}),
                                         ("fashionmnist", {"train": 60000, "test": 10000}),
                                         ("notmnist", {"test": 10000})])
def test_idx_sets(real_data: Path, tmp_path: Path, name: str, splits: dict[str, int]) -> None:
    need(real_data, name)
    source = get_dataset(name)
    assert source.status(ctx(real_data, tmp_path)) == "present"  # checksums verified
    for split, n in splits.items():
        data = source.load(split, ctx(real_data, tmp_path))
        assert data.images.shape == (n, 1, 28, 28)
        assert torch.bincount(data.labels, minlength=10).min() > n // 20


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_batches(real_data: Path, tmp_path: Path, name: str, classes: int) -> None:
    need(real_data, name)
    data = get_dataset(name).load("test", ctx(real_data, tmp_path))
    assert data.images.shape == (10000, 3, 32, 32)
    assert torch.equal(torch.bincount(data.labels, minlength=classes),
                       torch.full((classes,), 10000 // classes))  # balanced test splits
    assert data.images.float().std() > 20


def test_svhn(real_data: Path, tmp_path: Path) -> None:
    need(real_data, "svhn")
    data = get_dataset("svhn").load("test", ctx(real_data, tmp_path))
    assert data.images.shape == (26032, 3, 32, 32)
    assert int(data.labels.min()) == 0 and int(data.labels.max()) == 9  # the file's 10 is 0


def test_lsun_resize_folder(real_data: Path) -> None:
    need(real_data, "lsun-resize")
    listing = list_folder(real_data / "LSUN_resize", labelled=False)
    assert len(listing.files) == 10000 and (listing.labels == -1).all()
    assert decode_files(listing.files[:8]).shape == (8, 3, 32, 32)


def test_cifar10_jpeg_layout(real_data: Path) -> None:
    need(real_data, "cifar10-jpeg")
    for split, n in (("train", 50000), ("test", 10000)):
        listing = list_folder(real_data / "cifar10-jpeg" / split)
        assert listing.classes == get_dataset("cifar10-jpeg").info.class_names
        assert len(listing.files) == n and (listing.labels == 3).sum() == n // 10
    images = decode_files(listing.files[:16])
    assert images.shape == (16, 3, 32, 32) and images.std() > 20


def test_tiny_imagenet_views(real_data: Path) -> None:
    need(real_data, "tinyimagenet-resize")
    listing = list_folder(real_data / "tiny-imagenet-200" / "test" / "images", labelled=False)
    assert len(listing.files) == 10000 and (listing.labels == -1).all()
    images = torch.from_numpy(decode_files(listing.files[:8]))
    assert images.shape == (8, 3, 64, 64)
    assert downsample2(images).shape == seeded_crops(images, 32).shape == (8, 3, 32, 32)


def test_every_benchmark_has_its_files_listed_here() -> None:
    found = available_benchmarks()
    assert {"mnist", "mnist-near", "fashionmnist", "cifar10-jpeg", "cifar10-jpeg-near",
            "cifar10", "cifar100"} <= set(found)
    for name in found:
        bench = load_benchmark(name)
        unlisted = {bench.dataset, *(o.dataset for o in bench.ood)} - set(ON_DISK)
        assert not unlisted, f"add where {sorted(unlisted)} sit on disk to ON_DISK ({name})"


@pytest.mark.parametrize("name", sorted(available_benchmarks()))
def test_benchmark_runs_or_fails_up_front(real_data: Path, tmp_path: Path, name: str) -> None:
    """With all its data here a benchmark passes the up-front check; otherwise the one error
    names exactly the datasets that are absent, each once, and no present one."""
    bench = load_benchmark(name)
    datasets = list(dict.fromkeys([bench.dataset, *(o.dataset for o in bench.ood)]))
    if any(d not in ON_DISK for d in datasets):
        pytest.skip(f"benchmark {name} uses a dataset not listed in ON_DISK")
    absent = [d for d in datasets if absent_files(real_data, d)]
    if not absent:
        require_benchmark_data(bench, ctx(real_data, tmp_path))
        return
    with pytest.raises(OodbenchError) as err:
        require_benchmark_data(bench, ctx(real_data, tmp_path))
    for d in datasets:
        assert err.value.message.count(f"- {d}: missing") == (d in absent), d


def test_paper_benchmarks_use_the_papers_schedule() -> None:
    for name in ("cifar10", "cifar100"):
        paper = load_benchmark(name).train
        assert (paper.epochs, paper.milestones, paper.lr, paper.batch_size,
                paper.weight_decay) == (300, [150, 200, 250], 0.1, 64, 1e-4)
