"""`report` over real runs (trained and scored by the library) checked against scikit-learn and
numpy on the saved score files, and corrupt metrics files through the real command line."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonschema_lite import errors
from sklearn.metrics import average_precision_score, roc_auc_score
from test_report import SCHEMA, write_run

from oodbench.config import RunConfig, load_benchmark
from oodbench.data import DataContext
from oodbench.pipeline import score_run
from oodbench.report_command import ReportOptions, run_report
from oodbench.runs import Run
from oodbench.train import train

REPO = Path(__file__).resolve().parent.parent
SEEDS = (0, 1)
DETECTORS = ["msp", "energy"]


def sklearn_metrics(run: Path, det: str, test_set: str, ood: str) -> dict[str, float]:
    """AUROC and AUPR from the saved scores (in-distribution positive, higher = in-dist)."""
    s_in = np.load(run / "scores" / det / f"{test_set}.npy").astype(np.float64)
    s_out = np.load(run / "scores" / det / f"{ood}.npy").astype(np.float64)
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    s = np.r_[s_in, s_out]
    return {"auroc": roc_auc_score(y, s), "aupr_in": average_precision_score(y, s),
            "aupr_out": average_precision_score(1 - y, -s)}


@pytest.fixture
def scored_runs(tiny_benchmark: Path, tmp_path: Path) -> Path:
    """Two seeds of one tiny softmax benchmark, trained and scored."""
    root = tmp_path / "runs" / "tiny"
    ctx, cpu = DataContext.resolve(), torch.device("cpu")
    for seed in SEEDS:
        run = Run.create(root / f"softmax-seed{seed}",
                         RunConfig(load_benchmark(str(tiny_benchmark)), "softmax", seed))
        train(run, ctx, cpu)
        score_run(run, ctx, cpu, detectors=DETECTORS)
    return root


def test_report_of_scored_runs_matches_sklearn(scored_runs: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert run_report([scored_runs], ReportOptions(fmt="json", output=out)) == 0
    doc = json.loads((out / "report.json").read_text())
    assert errors(doc, SCHEMA) == []
    (g,) = doc["groups"]
    assert g["seeds"] == list(SEEDS)
    runs = [scored_runs / f"softmax-seed{s}" for s in SEEDS]
    test_set = json.loads((runs[0] / "metrics.json").read_text())["test_set"]
    assert {r["detector"] for r in g["rows"]} == set(DETECTORS)
    for row in g["rows"]:
        assert row["variant"] is None and row["seeds"] == list(SEEDS)
        per_seed = {o: [sklearn_metrics(r, row["detector"], test_set, o) for r in runs]
                    for o in g["ood_sets"]}
        for ood, seeds in per_seed.items():
            for k in ("auroc", "aupr_in", "aupr_out"):
                values = [m[k] for m in seeds]
                cell = row["ood"][ood][k]
                assert cell["values"] == pytest.approx(values, abs=1e-6)
                assert cell["mean"] == pytest.approx(np.mean(values), abs=1e-6)
                assert cell["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-6)
        seed_means = [np.mean([per_seed[o][i]["auroc"] for o in per_seed])
                      for i in range(len(SEEDS))]
        cell = row["means"]["all"]["auroc"]
        assert cell["mean"] == pytest.approx(np.mean(seed_means), abs=1e-6)
        assert cell["std"] == pytest.approx(np.std(seed_means, ddof=1), abs=1e-6)
    stds = [r["ood"][o]["auroc"]["std"] for r in g["rows"] for o in r["ood"]]
    assert max(stds) > 0  # two seeds of real training differ: the std check means something


def cli_report(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", "from oodbench.cli import main; main()",
                           "report", str(path), "--no-write"], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize(("content", "says"), [
    (lambda text: text[: len(text) // 2], "cannot read"),  # truncated mid-write
    (lambda text: json.dumps([json.loads(text)]), "is not an oodbench metrics file"),
])
def test_corrupt_metrics_file_exits_2_and_names_the_fix(tmp_path: Path,
                                                        content: Callable[[str], str], says: str):
    run = write_run(tmp_path / "runs", "softmax", 0, 1.0)
    path = run / "metrics.json"
    path.write_text(content(path.read_text()))
    res = cli_report(run, tmp_path)
    text = "".join((res.stdout + res.stderr).split())  # the console wraps lines anywhere
    assert res.returncode == 2, res.stdout + res.stderr
    assert "".join(says.split()) in text and "Traceback" not in text
    assert "fix:" in text and f"oodbenchscore{run}" in text
