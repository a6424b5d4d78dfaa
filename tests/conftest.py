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
    cfg = yaml.safe_load((REPO / "benchmarks" / "digits.yaml").read_text())
    cfg["name"] = "tiny-digits"
    cfg["train"]["epochs"] = 2
    path = tmp_path / "tiny-digits.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder, so default runs/ and data/cache never leak."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OODBENCH_CACHE", str(tmp_path / "cache"))
