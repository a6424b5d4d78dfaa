"""Each file-format loader on tiny synthetic files written in the real formats: idx, image
folders (JPEG / PNG), CIFAR python pickles, SVHN .mat; and their errors on bad input."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from oodbench.data import DataContext, get_dataset
from oodbench.errors import OodbenchError


def ctx_for(tmp_path: Path) -> DataContext:
    return DataContext(tmp_path / "data", tmp_path / "cache")


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, dtype=">i4").tobytes()
    raw = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        Path(f"{path}.gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_mnist_like(root: Path, folder: str, n: int = 12, gz: bool = False,
                     splits: tuple[str, ...] = ("train", "t10k")) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    for split in splits:
        write_idx(root / folder / "raw" / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(root / folder / "raw" / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return images


def write_images(folder: Path, arrays: list[np.ndarray], suffix: str = ".png") -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i:04d}{suffix}", quality=95)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_mnist_reads_pixels_and_labels(tmp_path: Path, gz: bool) -> None:
    ctx = ctx_for(tmp_path)
    images = write_mnist_like(ctx.root, "MNIST", gz=gz)
    data = get_dataset("mnist").load("test", ctx)
    assert data.images.shape == (12, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert data.labels.tolist() == [i % 10 for i in range(12)]
    assert get_dataset("mnist").missing(ctx) == []


def test_idx_truncated_file_names_it(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    write_mnist_like(ctx.root, "FashionMNIST")
    bad = ctx.root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(OodbenchError, match="t10k-images-idx3-ubyte.*truncated"):
        get_dataset("fashionmnist").load("test", ctx)


def test_idx_checksum_mismatch_and_missing(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    assert get_dataset("notmnist").status(ctx) == "missing"
    write_mnist_like(ctx.root, "notMNIST", splits=("t10k",))
    # synthetic files are not the reference notMNIST: their md5 differs
    assert get_dataset("notmnist").status(ctx) == "checksum mismatch"
    assert get_dataset("kmnist").status(ctx) == "missing"
    write_mnist_like(ctx.root, "KMNIST")
    assert get_dataset("kmnist").status(ctx) == "present"  # no reference checksum to compare


def test_image_folder_labelled_and_flat(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    write_images(tmp_path / "lab" / "cat", imgs[:2])
    write_images(tmp_path / "lab" / "dog", imgs[2:])
    data = get_dataset(f"folder:{tmp_path / 'lab'}").load("test", ctx)
    assert data.shape == (3, 8, 8) and data.labels.tolist() == [0, 0, 1]
    assert data.info.class_names == ("cat", "dog")
    assert torch.equal(data.images[2], torch.from_numpy(imgs[2]).permute(2, 0, 1))  # PNG exact
    # flat folder, mixed gray and colour: gray replicated, unlabelled
    write_images(tmp_path / "flat", [imgs[0], imgs[1][:, :, 0]])
    flat = get_dataset(f"folder:{tmp_path / 'flat'}").load("test", ctx)
    assert flat.labels.tolist() == [-1, -1] and flat.shape == (3, 8, 8)
    assert torch.equal(flat.images[1, 0], flat.images[1, 2])
    info = get_dataset(f"folder:{tmp_path / 'lab'}").info_for()
    assert (info.channels, info.image_size, info.num_classes) == (3, 8, 2)


def test_image_folder_bad_inputs(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OodbenchError, match="holds no images"):
        get_dataset(f"folder:{tmp_path / 'empty'}").load("test", ctx)
    with pytest.raises(OodbenchError, match="missing"):
        get_dataset(f"folder:{tmp_path / 'nowhere'}").load("test", ctx)
    rng = np.random.default_rng(2)
    write_images(tmp_path / "sizes", [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                                      rng.integers(0, 256, (9, 8, 3), dtype=np.uint8)])
    with pytest.raises(OodbenchError, match=r"0001\.png is 8×9"):
        get_dataset(f"folder:{tmp_path / 'sizes'}").load("test", ctx)
    write_images(tmp_path / "trunc", [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)] * 2,
                 ".jpg")
    bad = tmp_path / "trunc" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(OodbenchError, match=r"cannot decode image .*0001\.jpg"):
        get_dataset(f"folder:{tmp_path / 'trunc'}").load("test", ctx)
    assert not list((ctx.cache_root / "decoded").rglob("*.npy"))  # nothing half-written


def test_cifar10_jpeg_layout_and_class_check(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    rng = np.random.default_rng(3)
    source = get_dataset("cifar10-jpeg")
    for c in source.info.class_names:
        write_images(ctx.root / "cifar10-jpeg" / "test" / c,
                     [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)], ".jpg")
    data = source.load("test", ctx)
    assert data.images.shape == (10, 3, 32, 32) and data.labels.tolist() == list(range(10))
    with pytest.raises(OodbenchError, match="cifar10-jpeg.*missing"):
        source.load("train", ctx)


def write_cifar_batch(path: Path, n: int, label_key: str, rng: np.random.Generator) -> tuple:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = list(rng.integers(0, 10, n))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"data": data, label_key: [int(v) for v in labels]}, f, protocol=2)
    return data, labels


def test_cifar10_pickles(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    rng = np.random.default_rng(4)
    folder = ctx.root / "cifar-10-batches-py"
    parts = [write_cifar_batch(folder / f"data_batch_{i}", 3, "labels", rng) for i in range(1, 6)]
    write_cifar_batch(folder / "test_batch", 4, "labels", rng)
    data = get_dataset("cifar10").load("train", ctx)
    assert data.images.shape == (15, 3, 32, 32)
    assert torch.equal(data.images[0].reshape(-1), torch.from_numpy(parts[0][0][0]))
    assert data.labels.tolist() == [v for _, labs in parts for v in labs]
    assert get_dataset("cifar10").status(ctx) == "checksum mismatch"  # not the official files
    write_cifar_batch(ctx.root / "cifar-100-python" / "test", 5, "fine_labels", rng)
    assert len(get_dataset("cifar100").load("test", ctx)) == 5


def test_cifar_pickle_refuses_code_and_truncation(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    folder = ctx.root / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "train").write_bytes(pickle.dumps({"data": Path("x")}))  # a non-array global
    with pytest.raises(OodbenchError, match="cifar-100-python/train.*not allowed"):
        get_dataset("cifar100").load("train", ctx)
    write_cifar_batch(folder / "test", 4, "fine_labels", np.random.default_rng(5))
    (folder / "test").write_bytes((folder / "test").read_bytes()[:500])
    with pytest.raises(OodbenchError, match="cannot read CIFAR batch .*test"):
        get_dataset("cifar100").load("test", ctx)


def test_svhn_mat(tmp_path: Path) -> None:
    from scipy.io import savemat

    ctx = ctx_for(tmp_path)
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [3], [9]], dtype=np.uint8)
    (ctx.root / "SVHN").mkdir(parents=True)
    savemat(str(ctx.root / "SVHN" / "test_32x32.mat"), {"X": x, "y": y})
    data = get_dataset("svhn").load("test", ctx)
    assert data.labels.tolist() == [0, 1, 2, 3, 9]  # the file's 10 means digit 0
    assert torch.equal(data.images[1], torch.from_numpy(x[:, :, :, 1]).permute(2, 0, 1))
    (ctx.root / "SVHN" / "train_32x32.mat").write_bytes(b"MATLAB 5.0 garbage")
    with pytest.raises(OodbenchError, match="cannot read SVHN file .*train_32x32.mat"):
        get_dataset("svhn").load("train", ctx)


def test_tiny_imagenet_views_are_deterministic(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    write_images(ctx.root / "tiny-imagenet-200" / "test" / "images", arrays, ".png")
    resized = get_dataset("tinyimagenet-resize").load("test", ctx)
    # the mean of each 2×2 block, rounded half up, computed here in NumPy
    blocks = np.stack(arrays).reshape(3, 32, 2, 32, 2, 3).astype(np.float64).mean(axis=(2, 4))
    expected = torch.from_numpy(np.floor(blocks + 0.5).astype(np.uint8)).permute(0, 3, 1, 2)
    assert resized.shape == (3, 32, 32)
    assert torch.equal(resized.images, expected)
    crop1 = get_dataset("tinyimagenet-crop").load("test", ctx)
    assert crop1.shape == (3, 32, 32)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    for i in range(3):  # each crop is a real 32×32 window of its own source image
        win = x[i].unfold(1, 32, 1).unfold(2, 32, 1)  # C×33×33×32×32
        assert (win == crop1.images[i][:, None, None]).flatten(3).all(-1).all(0).any()
    # the same windows again without the decode cache (a fresh cache root)
    again = get_dataset("tinyimagenet-crop").load("test", DataContext(ctx.root, tmp_path / "c2"))
    assert torch.equal(crop1.images, again.images)


def test_unknown_and_parametric_names(tmp_path: Path) -> None:
    with pytest.raises(OodbenchError):
        get_dataset("no-such-set")
    with pytest.raises(OodbenchError, match="needs a path"):
        get_dataset("folder:")


@pytest.mark.parametrize("name", ["svhn", "kmnist", "cifar10"])
def test_a_failed_download_names_the_way_by_hand(tmp_path: Path, monkeypatch, name: str) -> None:
    """No network (as on this machine): the error must not tell the user to run the download
    that just failed, only where to put the files."""
    import socket

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    source = get_dataset(name)
    with pytest.raises(OodbenchError) as e:
        source.download(DataContext(tmp_path, tmp_path / "cache", download=True))
    assert e.value.message.startswith(f"downloading {name} failed")
    assert "--download" not in e.value.hint and e.value.hint.startswith("get it by hand: ")
    assert "data root" in e.value.hint
