"""The command line as users run it: real processes, real exit codes (0 / 1 / 2), in an empty
folder, exactly the CI usage `oodbench train --loss dismax && oodbench score --detector odin &&
oodbench report`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from oodbench.cli import app

REPO = Path(__file__).resolve().parent.parent


def oodbench(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "oodbench", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_ci_usage_works_in_an_empty_folder(tmp_path):
    """Nothing else typed: the default benchmark (digits), the default runs root."""
    r = oodbench("train", "--loss", "dismax", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "epoch 30/30 ·" in r.stderr and "━" not in r.stderr  # a log: lines, no bars
    r = oodbench("score", "--detector", "odin", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "━" not in r.stderr and "forward pass (logits" in r.stderr
    assert "runs/digits/dismax-seed0" in r.stderr  # says which runs it chose
    assert "no forward pass was run" not in r.stdout + r.stderr  # it ran ODIN's passes
    r = oodbench("report", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "odin" in r.stdout and "AUROC" in r.stdout
    # a gate that fails exits 1; bad input exits 2
    assert oodbench("report", "--fail-under", "auroc:patches=0.9999",
                    cwd=tmp_path).returncode == 1
    bad = oodbench("score", "--detector", "nope", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown detector 'nope'" in bad.stderr
    again = oodbench("score", "--detector", "msp", cwd=tmp_path)
    assert again.returncode == 0 and "no forward pass was run" in again.stderr


def test_score_without_runs_names_the_command_that_makes_one(tmp_path):
    r = oodbench("score", "--detector", "odin", cwd=tmp_path)
    assert r.returncode == 2
    assert "no run under runs/" in r.stderr and "oodbench train --loss dismax" in r.stderr
    assert "Traceback" not in r.stderr


def _tiny_run(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
    cfg.update(name="my-copy", losses=["softmax"], detectors=["msp"])
    cfg["train"]["epochs"] = 1
    path = tmp_path / "copy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_corrupt_checkpoint_and_cache_give_exit_2_with_the_fix(tmp_path):
    bench = _tiny_run(tmp_path)
    assert oodbench("train", "--benchmark", bench, cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "my-copy" / "dismax-seed0"
    assert oodbench("score", run, cwd=tmp_path).returncode == 0
    entry = next(p for p in (run / "cache").iterdir() if (p / "logits.npy").exists())
    logits = entry / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:-100])
    r = oodbench("score", run, cwd=tmp_path)
    assert r.returncode == 2 and "delete the folder" in r.stderr and "Traceback" not in r.stderr
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    r = oodbench("score", run, cwd=tmp_path)
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr
    assert "train again" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_sigterm_stops_training_with_a_checkpoint_and_exit_143(tmp_path):
    """What a cancelled CI job or a preempting scheduler does: SIGTERM after the first epoch.
    The command saves, says how to resume and exits 128 + 15 (the resume is tested in
    test_train.py)."""
    cfg = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
    cfg.update(name="long", losses=["softmax"], detectors=["msp"])
    cfg["train"].update(epochs=500, checkpoint_seconds=1e9)  # no periodic mid-epoch save
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    argv = [sys.executable, "-m", "oodbench", "train", "--benchmark", "long.yaml", "--loss",
            "softmax"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # not a terminal: one line per epoch
        if "epoch 1/500" in line:
            break
    proc.terminate()
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 143, rest
    assert "checkpoint saved" in rest and "Run the same command to resume" in rest
    state = torch.load(tmp_path / "runs/long/softmax-seed0/checkpoint.pt", weights_only=True)
    assert not state["finished"] and state["epoch"] >= 1


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_run_with_epochs_and_with_a_copied_benchmark_file(tmp_path):
    """`run --epochs 2` used to fail ("another configuration"), and so did a YAML file whose
    `name` is not a registered benchmark."""
    bench = _tiny_run(tmp_path)
    r = invoke("run", bench, "--epochs", "2", "--runs-root", tmp_path / "runs")
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "my-copy" / "softmax-seed0"
    assert yaml.safe_load((run / "config.yaml").read_text())["benchmark"]["train"]["epochs"] == 2
    report = json.loads((tmp_path / "runs" / "my-copy" / "report.json").read_text())
    assert report["groups"][0]["rows"][0]["seeds"] == [0]


def test_bad_input_leaves_no_half_made_run_folder(tmp_path):
    bench = _tiny_run(tmp_path)
    r = invoke("run", bench, "--loss", "nope", "--runs-root", tmp_path / "runs")
    assert r.exit_code == 2 and "unknown loss 'nope'" in r.output
    r = invoke("train", "--benchmark", bench, "-o", "nosuch=1")
    assert r.exit_code == 2
    assert not (tmp_path / "runs").exists()


def test_score_and_calibrate_act_on_the_runs_under_the_runs_root(tmp_path):
    bench = _tiny_run(tmp_path)
    for seed in ("0", "1"):
        assert invoke("train", "--benchmark", bench, "--loss", "softmax", "--seed",
                      seed).exit_code == 0
    r = invoke("calibrate", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert "1 run(s)" in r.output and "softmax-seed1" in r.output
    assert (tmp_path / "runs/my-copy/softmax-seed1/calibration.json").exists()
    assert not (tmp_path / "runs/my-copy/softmax-seed0/calibration.json").exists()
    r = invoke("score", "--loss", "softmax")
    assert r.exit_code == 0 and "2 run(s)" in r.output
    r = invoke("score", "--loss", "dismax")
    assert r.exit_code == 2 and "matches loss dismax" in r.output


def test_help_reads_as_written_by_a_person():
    for cmd in ("train", "calibrate", "score", "report", "run", "import-checkpoint", "data"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0
        for machine in ("<bool>", "<list[str]>", "<str>", "<path>", "{", "<int>"):
            assert machine not in r.output, (cmd, machine)
    wide = oodbench("score", "--help", cwd=REPO)
    assert "DETECTOR.NAME=VALUE" in wide.stdout and "[RUN]" in wide.stdout


def test_short_o_means_one_thing():
    assert "--loss-option" in invoke("train", "--help").output
    r = invoke("report", "-o", "x")
    assert r.exit_code == 2 and "No such option" in r.output


def test_an_unexpected_error_exits_1_and_says_where_to_report_it(tmp_path, monkeypatch):
    import oodbench.workflow as workflow

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(workflow, "find_runs", broken)
    r = CliRunner().invoke(app, ["score"])
    assert r.exit_code == 1 and "please report it" in r.output and "ZeroDivisionError" in r.output


def test_scoring_again_without_detectors_keeps_the_earlier_results(tmp_path):
    """`score RUN -d odin` then `score RUN`: metrics.json still holds odin."""
    bench = _tiny_run(tmp_path)
    assert invoke("train", "--benchmark", bench, "--loss", "softmax").exit_code == 0
    run = tmp_path / "runs" / "my-copy" / "softmax-seed0"
    assert invoke("score", run, "-d", "odin").exit_code == 0
    assert invoke("score", run).exit_code == 0
    detectors = json.loads((run / "metrics.json").read_text())["detectors"]
    assert set(detectors) == {"odin", "msp"}


def test_forget_is_the_one_way_to_drop_results(tmp_path):
    bench = _tiny_run(tmp_path)
    assert invoke("train", "--benchmark", bench, "--loss", "softmax").exit_code == 0
    run = tmp_path / "runs" / "my-copy" / "softmax-seed0"
    assert invoke("score", run, "-d", "msp", "-d", "energy").exit_code == 0
    r = invoke("score", run, "--forget", "energy", "--forget", "odin")  # odin: never scored
    assert r.exit_code == 0 and "removed energy" in r.output and "not there: odin" in r.output
    assert set(json.loads((run / "metrics.json").read_text())["detectors"]) == {"msp"}
    assert not (run / "scores" / "energy").exists() and (run / "scores" / "msp").exists()


def test_nan_scores_exit_2_after_saving_the_rest(tmp_path, monkeypatch):
    import numpy as np

    from oodbench.detectors import DETECTORS, Detector

    class NaNs(Detector):
        summary = "test: NaN everywhere"

        def score(self, data):
            return np.full(len(data), np.nan)

    monkeypatch.setattr(DETECTORS, "_members", dict(DETECTORS._members))
    DETECTORS.register("test-nans")(NaNs)
    bench = _tiny_run(tmp_path)
    assert invoke("train", "--benchmark", bench, "--loss", "softmax").exit_code == 0
    run = tmp_path / "runs" / "my-copy" / "softmax-seed0"
    r = invoke("score", run, "-d", "msp", "-d", "test-nans")
    assert r.exit_code == 2 and "NaN/infinite scores" in r.output and "test-nans" in r.output
    saved = json.loads((run / "metrics.json").read_text())["detectors"]
    assert saved["msp"]["ood"] and saved["test-nans"]["nonfinite"]


def _list_detectors(columns: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": str(columns)}
    r = subprocess.run([sys.executable, "-m", "oodbench", "list", "detectors"],
                       capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout and max(map(len, r.stdout.splitlines())) <= columns
    return r.stdout


def test_list_detectors_prints_every_name_whole_in_a_ci_log_and_in_a_wide_terminal():
    """At 80 columns (a CI log, a pipe) one block per detector; at 160 a table. Either way
    every detector name is whole and the refused losses are real loss names."""
    from oodbench.detectors import DETECTORS
    from oodbench.losses import LOSSES

    narrow = _list_detectors(80).splitlines()
    assert [line.split()[0] for line in narrow[1:] if not line.startswith(" ")] == sorted(
        DETECTORS.names())
    refused = [line.split("n/a on", 1)[1] for line in narrow if "losses: n/a on" in line]
    assert refused and {n.strip() for c in refused for n in c.split(",")} <= set(LOSSES.names())
    wide = _list_detectors(160)
    cells = {c.strip() for line in wide.splitlines() for c in line.split("│")}
    assert set(DETECTORS.names()) <= cells
