"""`oodbench run --jobs 2`: runs as parallel processes; a rerun skips complete runs and resumes
unfinished ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from oodbench.cli import app

REPO = Path(__file__).resolve().parent.parent


def _bench(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
    cfg.update(name="sweep", detectors=["msp", "energy"])
    cfg["train"]["epochs"] = 2
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_a_sweep_runs_in_parallel_and_a_rerun_skips_finished_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    bench = _bench(tmp_path)
    r = CliRunner().invoke(app, ["run", str(bench), "--jobs", "2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    # not a terminal: each job's steps are printed as lines (no bars are drawn in a log)
    assert "softmax/seed0: training" in r.output and "dismax/seed0: done" in r.output
    runs = tmp_path / "runs" / "sweep"
    for loss in ("softmax", "dismax"):
        run = runs / f"{loss}-seed0"
        assert set(json.loads((run / "metrics.json").read_text())["detectors"]) == {
            "msp", "energy"}
        assert "oodbench score" in (run / "job.log").read_text().replace("-m oodbench", "oodbench")
    assert (runs / "report.json").exists()
    # an interrupted run (its checkpoint rolled back to unfinished) resumes; the other is skipped
    ckpt_path = runs / "dismax-seed0" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt.update(finished=False, epoch=1, step=0, history=ckpt["history"][:1])
    torch.save(ckpt, ckpt_path)
    before = os.stat(runs / "softmax-seed0" / "metrics.json").st_mtime_ns
    r = CliRunner().invoke(app, ["run", str(bench), "--jobs", "2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert os.stat(runs / "softmax-seed0" / "metrics.json").st_mtime_ns == before
    assert "softmax/seed0: complete: skipped" in r.output
    assert torch.load(ckpt_path, weights_only=True)["finished"]
    assert "resuming" in (runs / "dismax-seed0" / "job.log").read_text()
