"""A regular install (a wheel, `pip install .`, a git URL; not `-e`) works in an empty folder:
the built-in benchmarks and the report schema ship inside the package. Before, the benchmark
YAMLs lived outside it and `oodbench train --loss dismax` said "unknown benchmark 'digits'"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_non_editable_install_runs_the_ci_line_in_an_empty_folder(tmp_path):
    pytest.importorskip("setuptools", reason="building the package needs setuptools")
    source = tmp_path / "source"  # a copy: the build writes build/ and egg-info next to it
    shutil.copytree(REPO / "oodbench", source / "oodbench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--target", str(site), str(source)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (site / "oodbench" / "benchmarks" / "digits.yaml").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def oodbench(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "oodbench", *args], cwd=empty, env=env,
                              capture_output=True, text=True, timeout=600)

    listed = oodbench("list", "benchmarks")
    assert listed.returncode == 0 and str(site) in " ".join(listed.stdout.split()).replace(
        " ", "")  # found in the installed package, not in this checkout
    for args in (("train", "--loss", "dismax", "--epochs", "2"), ("score", "--detector", "odin"),
                 ("report", "-f", "json")):
        r = oodbench(*args)
        assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
