"""Shared test fixtures: tiny benchmarks written on the fly, the real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def shared_data_root() -> Path | None:
    """The real datasets: $OODBENCH_DATA, else ../shared/data beside the repository."""
    for p in (os.environ.get("OODBENCH_DATA"), REPO.parent / "shared" / "data"):
        if p and Path(p).is_dir():
            return Path(p)
    return None


@pytest.fixture
def real_data() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("real datasets not found: set OODBENCH_DATA or place them in ../shared/data")
    return root


@pytest.fixture
def tiny_benchmark(tmp_path: Path) -> Path:
    """A 2-epoch digits benchmark YAML (trains in about a second)."""
    cfg = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
    cfg["name"] = "tiny-digits"
    cfg["train"]["epochs"] = 2
    path = tmp_path / "tiny-digits.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's in-process work: on the shared 2-core machine this is
    several times faster than oversubscribed threads for tiny tensors (and it is what each
    torchrun process has, OMP_NUM_THREADS=1). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder, so default runs/ and data/cache never leak."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OODBENCH_CACHE", str(tmp_path / "cache"))


def make_digits_run(root: Path, train: bool = True):
    """A digits softmax run folder; with `train`, two quick Adam epochs on the train split and a
    finished checkpoint (the detectors' and pipeline's inputs matter in these tests, not the
    training loop)."""
    import torch
    import torch.nn.functional as F

    from oodbench.config import RunConfig, load_benchmark
    from oodbench.data import DataContext, InputTransform
    from oodbench.experiment import build_model, load_in_distribution
    from oodbench.runs import Run

    torch.manual_seed(0)
    cfg = RunConfig(load_benchmark("digits"), "softmax", 0, {})
    run = Run.create(root, cfg)
    if train:
        data = load_in_distribution(cfg, "train", DataContext.resolve(root.parent / "data"))
        tf = InputTransform.for_model(data.info)
        model = build_model(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        x, y = tf(data.images), data.labels
        for _ in range(2):
            for i in range(0, len(y), 64):
                opt.zero_grad()
                F.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
                opt.step()
        torch.save({"model": model.eval().state_dict(), "finished": True}, run.checkpoint_path)
    return run
