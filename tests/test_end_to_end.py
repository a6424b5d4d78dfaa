"""The foundation's acceptance check: `oodbench run` with no arguments, for real."""

import json

import pytest
from typer.testing import CliRunner

from oodbench.cli import app


@pytest.mark.slow
def test_default_run_trains_scores_and_reports(tmp_path):
    r = CliRunner().invoke(app, ["run", "--runs-root", str(tmp_path / "runs")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "runs" / "digits" / "report.json").read_text())
    (group,) = report["groups"]
    assert set(group["classification"]) == {"softmax", "dismax"}
    for loss, c in group["classification"].items():
        assert c["accuracy"]["mean"] > 0.90, loss
    for noise in ("gaussian", "uniform"):
        best = max(row["ood"][noise]["auroc"]["mean"] for row in group["rows"])
        assert best > 0.9, noise
    assert "auroc" in r.output and "mmles" in r.output
