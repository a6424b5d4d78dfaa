"""experiment.py's guards against hostile input: devices this machine lacks, data that would
fail only at `score` (checked before training instead), and relative `folder:` paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.config import RunConfig
from oodbench.data import DataContext
from oodbench.errors import OodbenchError
from oodbench.experiment import (
    check_benchmark_sets,
    load_checked_benchmark,
    pick_device,
    with_absolute_folders,
)

REPO = Path(__file__).resolve().parent.parent


# --- devices -------------------------------------------------------------------------------

@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_and_cpu_without_a_gpu(no_gpu) -> None:
    assert pick_device(None) == pick_device("auto") == pick_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("name, message, hint", [
    ("cuda", "no CUDA device here", "use --device cpu or auto"),
    ("cuda:0", "no CUDA device here", "use --device cpu or auto"),
    ("mps", "no MPS (Apple GPU) device here", "use --device cpu or auto"),
    ("bogus", "unknown device 'bogus'", "use auto, cpu, cuda, cuda:N, mps"),
    ("cuda:x", "unknown device 'cuda:x'", "use auto, cpu, cuda, cuda:N, mps"),
    ("cuda:-1", "unknown device 'cuda:-1'", "use auto, cpu, cuda, cuda:N, mps"),
    ("cpu:0", "unknown device 'cpu:0'", "use auto, cpu, cuda, cuda:N, mps"),
])
def test_a_device_this_machine_lacks_names_the_fix(no_gpu, name: str, message: str,
                                                   hint: str) -> None:
    with pytest.raises(OodbenchError) as e:
        pick_device(name)
    assert e.value.message == message and e.value.hint == hint


def test_cuda_index_is_checked_against_the_device_count(two_gpus) -> None:
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(OodbenchError, match=r"no CUDA device 2: this machine has 2") as e:
        pick_device("cuda:2")
    assert e.value.hint == "use --device cuda:0 to cuda:1, or auto"


def test_cli_bogus_device_exits_2_with_the_fix(no_gpu, tiny_benchmark: Path) -> None:
    r = CliRunner().invoke(app, ["train", "--benchmark", str(tiny_benchmark), "--device",
                                 "bogus"])
    assert r.exit_code == 2, r.output
    assert "unknown device 'bogus'" in r.output and "Traceback" not in r.output


# --- every set checked before training -----------------------------------------------------

def write_pngs(folder: Path, n: int, size: int, channels: int = 1) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(size)
    shape = (size, size) if channels == 1 else (size, size, channels)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i}.png")


def digits_with(tmp_path: Path, *extra: dict) -> RunConfig:
    """oodbench/benchmarks/digits.yaml plus `extra` far-OOD entries, loaded as `train` loads it."""
    raw = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
    raw["ood"]["far"] = [*raw["ood"]["far"], *extra]
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return RunConfig(load_checked_benchmark(str(path)), "softmax", 0)


@pytest.fixture
def ctx(tmp_path: Path) -> DataContext:
    return DataContext(tmp_path / "data", tmp_path / "cache")


def test_a_good_benchmark_passes(tmp_path: Path, ctx: DataContext) -> None:
    write_pngs(tmp_path / "gray8", 5, 8)
    write_pngs(tmp_path / "big", 5, 16, channels=3)
    cfg = digits_with(tmp_path, {"dataset": f"folder:{tmp_path / 'gray8'}"},
                      {"dataset": f"folder:{tmp_path / 'big'}", "adapt": True})
    assert check_benchmark_sets(cfg, ctx) is None
    assert len(list((ctx.cache_root / "decoded").rglob("images.npy"))) == 2  # decoded once


@pytest.mark.parametrize("make, said", [
    (lambda d: d.mkdir(), "holds no images"),
    (lambda d: (d.mkdir(), (d / "a.png").write_text("not an image")), "is not an image"),
    (lambda d: write_pngs(d, 3, 16), "is 1×16×16 but the model takes 1×8×8"),
])
def test_a_bad_ood_folder_fails_before_training(tmp_path: Path, ctx: DataContext, make,
                                                said: str) -> None:
    folder = tmp_path / "bad"
    make(folder)
    cfg = digits_with(tmp_path, {"dataset": f"folder:{folder}", "name": "mine"})
    with pytest.raises(OodbenchError) as e:
        check_benchmark_sets(cfg, ctx)
    assert "benchmark 'digits': 1 set(s) cannot be used" in e.value.message
    assert f"OOD set 'mine' (folder:{folder}): " in e.value.message and said in e.value.message
    assert "fix: " in e.value.message  # each problem carries its own fix
    assert not (tmp_path / "runs").exists()


def test_every_problem_is_listed_in_one_error(tmp_path: Path, ctx: DataContext) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "0.png").write_text("hello")
    write_pngs(tmp_path / "big", 3, 16)
    cfg = digits_with(tmp_path, *({"dataset": f"folder:{tmp_path / d}"}
                                  for d in ("empty", "text", "big")))
    with pytest.raises(OodbenchError) as e:
        check_benchmark_sets(cfg, ctx)
    msg = e.value.message
    assert "3 set(s) cannot be used" in msg
    assert msg.count("\n  - OOD set ") == 3
    assert f"{tmp_path / 'text' / '0.png'} is not an image" in msg
    assert "set `adapt: true` on" in msg


def test_an_in_distribution_folder_whose_splits_disagree(tmp_path: Path,
                                                         ctx: DataContext) -> None:
    for split, size in (("train", 8), ("test", 12)):
        for c in ("a", "b"):
            write_pngs(tmp_path / "ind" / split / c, 12, size)
    raw = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
    raw["in_distribution"] = {"dataset": f"folder:{tmp_path / 'ind'}"}
    raw["ood"] = {"far": ["gaussian"]}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = RunConfig(load_checked_benchmark(str(path)), "softmax", 0)
    with pytest.raises(OodbenchError) as e:
        check_benchmark_sets(cfg, ctx)
    assert "1 set(s)" in e.value.message
    assert "test: images are 1×12×12, but the model is built for 1×8×8" in e.value.message


def test_a_flat_in_distribution_folder_has_no_classes(tmp_path: Path, ctx: DataContext) -> None:
    write_pngs(tmp_path / "flat", 4, 8)
    raw = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
    raw["in_distribution"] = {"dataset": f"folder:{tmp_path / 'flat'}"}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(OodbenchError, match="has 0 class"):
        check_benchmark_sets(RunConfig(load_checked_benchmark(str(path)), "softmax", 0), ctx)


# --- relative folders stored absolute ------------------------------------------------------

def test_with_absolute_folders(tmp_path: Path) -> None:
    cfg = digits_with(tmp_path, {"dataset": "folder:rel/imgs"})
    bench = with_absolute_folders(cfg.benchmark, tmp_path)
    entry = bench.ood[-1]
    assert entry.dataset == f"folder:{(tmp_path / 'rel' / 'imgs').resolve()}"
    assert entry.name == "folder-imgs"  # the display name (a safe default) is kept
    assert [o.dataset for o in bench.ood[:-1]] == ["patches", "gaussian", "uniform"]
    assert bench.dataset == "digits"
    assert cfg.benchmark.ood[-1].dataset == "folder:rel/imgs"  # the input is left as it was
    bench.train.epochs = 1
    assert cfg.benchmark.train.epochs == 30
