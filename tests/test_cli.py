"""The CLI over a real (tiny) run: train, calibrate, score twice, report, and the error paths."""

import json

import pytest
import torch
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.runs import Run
from oodbench.train import train

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_train_calibrate_score_report(tiny_benchmark, tmp_path):
    run_dir = tmp_path / "runs" / "r"
    r = invoke("train", "--benchmark", tiny_benchmark, "--loss", "dismax", "--run-dir", run_dir)
    assert r.exit_code == 0, r.output
    assert (run_dir / "checkpoint.pt").exists()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["epoch"] == 2
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["data"]["train"]["n"] > manifest["data"]["val"]["n"] > 0
    assert manifest["environment"]["torch"] == torch.__version__
    assert "already trained" in invoke("train", "--run-dir", run_dir).output

    r = invoke("calibrate", run_dir)
    assert r.exit_code == 0, r.output
    cal = json.loads((run_dir / "calibration.json").read_text())
    assert cal["split"] == "val" and cal["after"]["nll"] <= cal["before"]["nll"] + 1e-9

    r = invoke("score", run_dir)
    assert r.exit_code == 0, r.output
    assert "forward pass" in r.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["detectors"]) == {"msp", "maxlogit", "entropy", "energy", "mmles"}
    assert set(metrics["ood_sets"]) == {"patches", "gaussian", "uniform"}
    for det in metrics["detectors"].values():
        for m in det["ood"].values():
            assert 0.0 <= m["auroc"] <= 1.0
    assert (run_dir / "scores" / "msp" / "gaussian.npy").exists()

    r = invoke("score", run_dir, "-d", "msp", "-d", "energy")
    assert r.exit_code == 0, r.output
    assert "no forward pass was run" in r.output

    # a list hyperparameter given comma-separated; id selection has no negatives to name
    r = invoke("score", run_dir, "-d", "odin", "--selection", "id", "-p", "odin.eps_grid=0,0.001")
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert "odin: selection id on" in said and "(no negatives; criterion" in said
    assert "vs None" not in said
    odin = json.loads((run_dir / "metrics.json").read_text())["detectors"]["odin"]
    assert odin["selection"]["chosen"]["epsilon"] in (0.0, 0.001)

    r = invoke("report", tmp_path / "runs")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "runs" / "report.json").read_text())
    rows = rep["groups"][0]["rows"]
    assert {(row["loss"], row["detector"]) for row in rows} >= {("dismax", "mmles")}
    assert "| dismax | mmles |" in (tmp_path / "runs" / "report.md").read_text()


def test_unknown_names_list_the_valid_ones(tiny_benchmark):
    r = invoke("train", "--benchmark", tiny_benchmark, "--loss", "nope")
    assert r.exit_code == 2
    assert "unknown loss 'nope'" in r.output and "dismax" in r.output and "softmax" in r.output
    r = invoke("train", "--benchmark", "no-such-benchmark")
    assert r.exit_code == 2 and "digits" in r.output


def test_missing_run_names_the_command_that_creates_it(tmp_path):
    r = invoke("score", tmp_path / "nowhere")
    assert r.exit_code == 2
    assert "no run at" in r.output and "oodbench train" in r.output
    r = invoke("report", tmp_path / "nowhere")
    assert r.exit_code == 2


def test_interrupted_training_resumes_with_the_same_command(tiny_benchmark, tmp_path):
    from oodbench.config import RunConfig, load_benchmark
    from oodbench.data import DataContext

    run_dir = tmp_path / "runs" / "interrupted"
    cfg = RunConfig(load_benchmark(str(tiny_benchmark)), "softmax", 0)
    run = Run.create(run_dir, cfg)
    with pytest.raises(KeyboardInterrupt):
        train(run, DataContext.resolve(), torch.device("cpu"), stop_after_steps=5)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert not ckpt["finished"] and (ckpt["epoch"], ckpt["step"]) == (0, 5)
    r = invoke("train", "--run-dir", run_dir)
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["finished"]


def test_other_config_in_the_same_folder_is_refused(tiny_benchmark, tmp_path):
    run_dir = tmp_path / "runs" / "x"
    assert invoke("train", "--benchmark", tiny_benchmark, "--loss", "softmax", "--run-dir",
                  run_dir, "--epochs", "1").exit_code == 0
    r = invoke("train", "--benchmark", tiny_benchmark, "--loss", "softmax", "--run-dir", run_dir,
               "--epochs", "1", "--seed", "3")
    assert r.exit_code == 2 and "another configuration" in r.output
    # the same options (or none) reopen the run
    r = invoke("train", "--run-dir", run_dir)
    assert r.exit_code == 0 and "already trained" in r.output


def test_help_teaches_every_command():
    for cmd in ("train", "calibrate", "score", "report", "run", "list"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output or cmd == "list"


def test_the_forward_log_puts_sets_with_the_same_work_on_one_line():
    from oodbench.cli import grouped_log

    shifted = [f"shift-blur-{i}: forward pass (logits)" for i in range(1, 6)]
    lines = ["batch size 64 measured (900 img/s)", "digits (train): from the cache",
             "digits (test): forward pass (logits)", *shifted, "patches: from the cache"]
    assert grouped_log(lines) == [
        "batch size 64 measured (900 img/s)",
        "digits (train), patches: from the cache",
        "6 sets (digits (test), shift-blur-1, shift-blur-2 … shift-blur-5): forward pass (logits)"]
