"""The uint8 decode cache: hits, re-decode on a changed source, atomicity; the missing-data check
and `oodbench data` on a synthetic data root."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_data_loaders import write_images, write_mnist_like
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.config import BenchmarkConfig
from oodbench.data import DataContext, get_dataset
from oodbench.data.availability import require_benchmark_data
from oodbench.data.decoded import TMP_PREFIX, cached_decode
from oodbench.errors import OodbenchError


def test_decode_once_then_memory_map(tmp_path: Path) -> None:
    ctx = DataContext(tmp_path, tmp_path / "cache")
    calls = []

    def decode():
        calls.append(1)
        return np.full((2, 1, 3, 3), 7, np.uint8), np.array([0, 1])

    a, la = cached_decode(ctx, "x", "sig1", decode)
    b, lb = cached_decode(ctx, "x", "sig1", decode)
    assert len(calls) == 1 and a.equal(b) and lb.tolist() == [0, 1]
    b[0] += 1  # copy-on-write: the cache file is untouched
    assert cached_decode(ctx, "x", "sig1", decode)[0].equal(a)
    cached_decode(ctx, "x", "sig2", decode)  # a new source signature: decoded again
    assert len(calls) == 2
    assert len(list((ctx.cache_root / "decoded" / "x").iterdir())) == 1  # stale entry removed


def test_interrupted_decode_leaves_nothing(tmp_path: Path) -> None:
    ctx = DataContext(tmp_path, tmp_path / "cache")

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_decode(ctx, "x", "sig", interrupted)
    assert not list((ctx.cache_root).rglob("*.npy"))
    # a temp folder left by a killed process (dead pid) is removed by the next decode
    dead = ctx.cache_root / "decoded" / "x" / f"{TMP_PREFIX}999999999-abc"
    dead.mkdir(parents=True)
    (dead / "images.npy").write_bytes(b"half")
    cached_decode(ctx, "x", "sig", lambda: (np.zeros((1, 1, 2, 2), np.uint8), np.zeros(1)))
    assert not dead.exists()


def test_changed_image_is_redecoded(tmp_path: Path) -> None:
    ctx = DataContext(tmp_path, tmp_path / "cache")
    rng = np.random.default_rng(0)
    write_images(tmp_path / "imgs", [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)] * 2)
    name = f"folder:{tmp_path / 'imgs'}"
    first = get_dataset(name).load("test", ctx)
    write_images(tmp_path / "imgs", [np.zeros((4, 4, 3), np.uint8)])  # rewrites 0000.png
    os.utime(tmp_path / "imgs" / "0000.png", ns=(1, 1))
    second = get_dataset(name).load("test", ctx)
    assert first.images[0].sum() > 0 and second.images[0].sum() == 0


def bench_yaml(tmp_path: Path) -> Path:
    cfg = {"name": "t", "in_distribution": "mnist", "model": "tinycnn28", "losses": ["softmax"],
           "detectors": ["msp"], "seeds": [0], "train": {"epochs": 1, "batch_size": 4},
           "ood": {"far": ["notmnist", "kmnist", "gaussian", f"folder:{tmp_path / 'ood'}"]}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_missing_data_fails_up_front_listing_everything(tmp_path: Path) -> None:
    ctx = DataContext(tmp_path / "data", tmp_path / "cache")
    write_mnist_like(ctx.root, "MNIST")
    bench = BenchmarkConfig.from_dict(yaml.safe_load(bench_yaml(tmp_path).read_text()))
    with pytest.raises(OodbenchError) as err:
        require_benchmark_data(bench, ctx)
    msg = err.value.message
    assert "notmnist" in msg and "kmnist" in msg and str(tmp_path / "ood") in msg
    assert "mnist: missing" not in msg.replace("notmnist", "").replace("kmnist", "")
    result = CliRunner().invoke(app, ["run", str(bench_yaml(tmp_path)), "--data-root",
                                      str(ctx.root), "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "kmnist" in result.output
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_data_command_lists_status(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_mnist_like(root, "KMNIST")
    write_mnist_like(root, "MNIST")
    result = CliRunner().invoke(app, ["data", "--data-root", str(root)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = {ln.split("│")[1].strip(): ln for ln in result.output.splitlines() if "│" in ln
             and ln.split("│")[1].strip()}
    assert "present" in lines["kmnist"]
    assert "checksum mismatch" in lines["mnist"]  # synthetic, not the reference files
    assert "missing" in lines["svhn"] and "--download svhn" in lines["svhn"]
    assert "missing" in lines["notmnist"]
    assert all("built in" in lines[n] for n in ("digits", "gaussian", "uniform", "patches"))
    bad = CliRunner().invoke(app, ["data", "--download", "notmnist", "--data-root", str(root)])
    assert bad.exit_code == 2 and "cannot be downloaded" in bad.output
