"""The loaders on the real data in ../shared/data (or $OODBENCH_DATA); skipped when absent.
Kept fast: idx sets are loaded whole, image folders are listed whole but only a few images
decoded (a full decode is a benchmarks/speed_data.py measurement, not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oodbench.config import available_benchmarks, load_benchmark
from oodbench.data import DataContext, get_dataset
from oodbench.data.availability import require_benchmark_data
from oodbench.data.folders import decode_files, downsample2, list_folder, seeded_crops
from oodbench.errors import OodbenchError


def ctx(root: Path, tmp_path: Path) -> DataContext:
    return DataContext(root, tmp_path / "cache")


@pytest.mark.parametrize("name,splits", [("mnist", {"train": 60000, "test": 10000}),
                                         ("fashionmnist", {"train": 60000, "test": 10000}),
                                         ("notmnist", {"test": 10000})])
def test_idx_sets(real_data: Path, tmp_path: Path, name: str, splits: dict[str, int]) -> None:
    source = get_dataset(name)
    assert source.status(ctx(real_data, tmp_path)) == "present"  # checksums verified
    for split, n in splits.items():
        data = source.load(split, ctx(real_data, tmp_path))
        assert data.images.shape == (n, 1, 28, 28)
        assert torch.bincount(data.labels, minlength=10).min() > n // 20


def test_cifar10_jpeg_layout(real_data: Path) -> None:
    for split, n in (("train", 50000), ("test", 10000)):
        listing = list_folder(real_data / "cifar10-jpeg" / split)
        assert listing.classes == get_dataset("cifar10-jpeg").info.class_names
        assert len(listing.files) == n and (listing.labels == 3).sum() == n // 10
    images = decode_files(listing.files[:16])
    assert images.shape == (16, 3, 32, 32) and images.std() > 20


def test_tiny_imagenet_views(real_data: Path) -> None:
    listing = list_folder(real_data / "tiny-imagenet-200" / "test" / "images", labelled=False)
    assert len(listing.files) == 10000 and (listing.labels == -1).all()
    images = torch.from_numpy(decode_files(listing.files[:8]))
    assert images.shape == (8, 3, 64, 64)
    assert downsample2(images).shape == seeded_crops(images, 32).shape == (8, 3, 32, 32)


def test_benchmarks_present_or_fail_up_front(real_data: Path, tmp_path: Path) -> None:
    found = available_benchmarks()
    runnable = {"mnist", "mnist-near", "fashionmnist", "cifar10-jpeg", "cifar10-jpeg-near"}
    assert runnable | {"cifar10", "cifar100"} <= set(found)
    for name in runnable:
        require_benchmark_data(load_benchmark(name), ctx(real_data, tmp_path))
    with pytest.raises(OodbenchError) as err:
        require_benchmark_data(load_benchmark("cifar10"), ctx(real_data, tmp_path))
    for missing in ("cifar10:", "cifar100:", "svhn:", "lsun-resize:"):
        assert missing in err.value.message
    assert "tinyimagenet-resize:" not in err.value.message
    paper = load_benchmark("cifar100").train
    assert (paper.epochs, paper.milestones, paper.lr, paper.batch_size, paper.weight_decay) == (
        300, [150, 200, 250], 0.1, 64, 1e-4)
