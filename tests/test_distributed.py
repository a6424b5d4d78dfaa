"""Distributed training and scoring (torchrun, gloo on the CPU): 2 processes against 1 on `digits`.

Real processes with real exit codes: `oodbench train --nproc-per-node 2` (which launches torchrun)
and `python -m torch.distributed.run --standalone --nproc-per-node 2 -m oodbench score`. The
documented tolerance of a 2-process training run against a 1-process one is 3 accuracy points
(BatchNorm statistics and DisMax's mosaics are per process, so the runs differ); scoring is the
same computation split by rows, so its outputs must agree to float32 rounding.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_digits_run

from oodbench.config import load_benchmark
from oodbench.data import DataContext, InputTransform
from oodbench.data.transforms import augment
from oodbench.distributed import World
from oodbench.experiment import build_model, load_in_distribution
from oodbench.io import atomic_write, remove_stale_temps, write_yaml
from oodbench.runs import Run
from oodbench.train import train
from oodbench.workflow import run_config

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 0.03  # accuracy, 2 processes vs 1 (README, "Distributed (torchrun)")
EPOCHS = 4
STEPS_PER_EPOCH = 16  # digits: 1068 training images, batches of 64, the ragged one dropped


pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def oodbench(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oodbench", *map(str, args)], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=300)


def torchrun(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def test_augment_of_a_slice_is_the_slice_of_the_whole_batch() -> None:
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    torch.manual_seed(5)
    whole = augment(images, 2, True)
    torch.manual_seed(5)
    part = augment(images[4:7], 2, True, rows=(4, 10))
    assert torch.equal(part, whole[4:7])


def test_shards_are_contiguous_and_cover_every_row_once() -> None:
    assert [World(r, 3).shard(10) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [World(r, 4).shard(2) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert World().shard(7) == (0, 7)


def test_only_rank_0_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / ".x.json.abc.tmp-999999999"  # a dead writer's temporary
    stale.write_text("")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="only rank 0 writes"):
        atomic_write(tmp_path / "x.json", lambda p: p.write_text("{}"))
    assert remove_stale_temps(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name]


def _test_accuracy(run_dir: Path) -> float:
    """The checkpoint's accuracy on the test split, computed here with a plain forward."""
    cfg = Run.open(run_dir).config()
    model = build_model(cfg)
    model.load_state_dict(checkpoint(run_dir)["model"])
    test = load_in_distribution(cfg, "test", DataContext.resolve())
    with torch.no_grad():
        logits = model.eval()(InputTransform.for_model(test.info)(test.images))
    return float((logits.argmax(1) == test.labels).float().mean())


@pytest.mark.slow
def test_two_processes_train_to_the_accuracy_of_one(tmp_path: Path) -> None:
    cfg = run_config(load_benchmark("digits"), "dismax", 0, EPOCHS)
    one = train(Run.create(tmp_path / "one", cfg), DataContext.resolve(), torch.device("cpu"))
    r = oodbench("train", "--epochs", EPOCHS, "--run-dir", "two", "--device", "cpu",
                 "--nproc-per-node", 2, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("done digits/dismax/seed0") == 1  # rank 0 alone prints
    # ... and reports the progress (in a log, one line per epoch: no bars are drawn there)
    assert r.stderr.count(f"digits/dismax/seed0 epoch 1/{EPOCHS} ·") == 1
    two = checkpoint(tmp_path / "two")["history"]
    assert [h["epoch"] for h in two] == list(range(1, EPOCHS + 1))
    assert abs(one[-1]["val_accuracy"] - two[-1]["val_accuracy"]) <= TOLERANCE
    acc_one, acc_two = _test_accuracy(tmp_path / "one"), _test_accuracy(tmp_path / "two")
    assert abs(acc_one - acc_two) <= TOLERANCE
    assert acc_two >= 0.9


@pytest.mark.slow
def test_a_checkpoint_resumes_under_another_number_of_processes(tmp_path: Path) -> None:
    """2 processes train epoch 1 and 3 steps of epoch 2, then stop; 1 process finishes."""
    run = Run.create(tmp_path / "run", run_config(load_benchmark("digits"), "dismax", 0, 2))
    r = torchrun(REPO / "tests" / "ddp_interrupt.py", run.path, STEPS_PER_EPOCH + 3,
                 cwd=tmp_path)
    assert r.returncode != 0, r.stdout + r.stderr  # the ranks stopped as after a Ctrl-C
    stopped = checkpoint(run.path)
    assert (stopped["epoch"], stopped["step"], stopped["finished"]) == (1, 3, False)
    assert stopped["partial"]["seen"] == 3 * 64  # summed over both processes' 32-image slices
    assert len(stopped["history"]) == 1

    r = oodbench("train", "--run-dir", run.path, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming digits/dismax/seed0 at epoch 2, step 3" in r.stderr
    done = checkpoint(run.path)
    assert done["finished"] and [h["epoch"] for h in done["history"]] == [1, 2]
    assert done["history"][0] == stopped["history"][0]
    assert done["history"][1]["val_accuracy"] >= 0.8


def test_bad_input_exits_2_before_any_process_starts(tmp_path: Path) -> None:
    r = oodbench("train", "--loss", "nope", "--nproc-per-node", 2, cwd=tmp_path)
    assert r.returncode == 2 and "unknown loss 'nope'" in r.stderr
    assert "torchrun" not in r.stderr and not (tmp_path / "runs").exists()
    r = oodbench("train", "--nproc-per-node", 40, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 2 and "fewer than 2 images per process" in r.stderr


def _cache(run_dir: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(run_dir)): np.load(p) for p in (run_dir / "cache").rglob("*.npy")}


def _metric_values(run_dir: Path) -> dict[str, float]:
    """Every metric of metrics.json (not times or costs), flattened to {path: value}."""
    import json

    m = json.loads((run_dir / "metrics.json").read_text())
    tree = {"classification": m["classification"],
            **{d: {k: r[k] for k in ("ood", "selective")} for d, r in m["detectors"].items()}}
    flat: dict[str, float] = {}

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            flat[path] = float(node)

    walk(tree, "")
    return flat


@pytest.mark.slow
def test_two_process_score_writes_the_cache_and_metrics_of_one(tmp_path: Path) -> None:
    """knn fits on the train split, odin (a gradient detector) runs on rank 0 after the
    sharded pass; every cache entry and metric must be the 1-process one."""
    run = make_digits_run(tmp_path / "one")
    cfg = run.config()
    cfg.benchmark.shift = None  # 5 sets (train, test, 3 OOD) rather than 25: a faster test
    write_yaml(run.config_path, cfg.to_dict())
    one, two = run.path, tmp_path / "two"
    shutil.copytree(one, two)
    detectors = ["-d", "msp", "-d", "knn", "-d", "odin"]
    r = oodbench("score", one, *detectors, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = torchrun("-m", "oodbench", "score", two, *detectors, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("metrics in") == 1  # rank 0 alone reports
    assert "split over 2 processes" in r.stderr
    a, b = _cache(one), _cache(two)
    assert sorted(a) == sorted(b)
    # logits, features, labels of 5 sets, and knn's stored top-K of the 4 scored (non-train) sets
    assert sum("/derived/" not in k for k in a) == 3 * 5
    assert sum("/derived/" in k for k in a) == 4
    for name, arr in a.items():
        np.testing.assert_allclose(b[name], arr, rtol=1e-5, atol=1e-6, err_msg=name)
    want, got = _metric_values(one), _metric_values(two)
    assert len(want) > 100 and got.keys() == want.keys()
    assert got == pytest.approx(want, abs=1e-9, nan_ok=True)
