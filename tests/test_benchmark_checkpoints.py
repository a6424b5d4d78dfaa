"""A benchmark with `checkpoints:`: `oodbench run` imports the published weights it lists (paths
under the data root, globs allowed), then calibrates and scores them, training nothing; a
second `run` keeps everything; and every way such a file can be wrong is exit 2 with the fix."""

from pathlib import Path

import pytest
import torch
import yaml
from test_import_checkpoint import fake_akamaster, image_folder
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.config import BenchmarkConfig, CheckpointEntry
from oodbench.errors import OodbenchError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def bench_file(tmp_path: Path, **changes) -> Path:
    """A tiny `folder:` benchmark listing one akamaster ResNet-20 under data/models/."""
    folder = tmp_path / "imgs"
    if not folder.exists():
        image_folder(folder)
    models = tmp_path / "data" / "models"
    if not models.exists():
        models.mkdir(parents=True)
        fake_akamaster(models / "resnet20-12fca82f.th")
    raw = {"name": "tiny-pre", "in_distribution": f"folder:{folder}", "model": "resnet20",
           "losses": ["softmax"], "detectors": ["msp", "energy"], "ood": {"far": ["gaussian"]},
           "train": {"epochs": 1, "val_fraction": 0.2},
           "checkpoints": [{"model": "resnet20", "path": "models/resnet20-*.th"}], **changes}
    path = tmp_path / "tiny-pre.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(tmp_path: Path, bench: Path, *extra):
    return invoke("run", bench, "--runs-root", tmp_path / "runs", "--data-root",
                  tmp_path / "data", "--device", "cpu", *extra)


def test_run_imports_calibrates_and_scores_then_keeps_everything(tmp_path: Path):
    bench = bench_file(tmp_path)
    r = run(tmp_path, bench, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "not imported" in r.output and "import → calibrate → score" in r.output

    r = run(tmp_path, bench)
    assert r.exit_code == 0, r.output
    assert "importing" in r.output and "training tiny-pre" not in r.output
    folder = tmp_path / "runs" / "tiny-pre" / "resnet20"
    saved = torch.load(folder / "checkpoint.pt", weights_only=True)
    source = tmp_path / "data" / "models" / "resnet20-12fca82f.th"
    assert saved["imported"]["path"] == str(source.resolve())
    # the weights scored are the file's, renamed onto the model's keys
    file_sd = torch.load(source, weights_only=True)["state_dict"]
    assert torch.equal(saved["model"]["head.weight"], file_sd["module.linear.weight"])
    assert torch.equal(saved["model"]["backbone.conv1.weight"], file_sd["module.conv1.weight"])
    metrics = yaml.safe_load((folder / "metrics.json").read_text())
    assert set(metrics["detectors"]) == {"msp", "energy"}
    assert (folder / "calibration.json").exists()

    stamp = (folder / "checkpoint.pt").stat().st_mtime_ns
    r = run(tmp_path, bench)
    assert r.exit_code == 0, r.output
    assert "importing" not in r.output
    assert "kept: fitted on these weights" in r.output
    assert "scored tiny-pre/resnet20: kept" in r.output
    assert (folder / "checkpoint.pt").stat().st_mtime_ns == stamp
    r = run(tmp_path, bench, "--dry-run")
    assert "imported, calibrated and scored" in r.output and "nothing (up to date)" in r.output


def test_a_path_matching_no_file_or_several_names_the_fix(tmp_path: Path):
    bench = bench_file(tmp_path, checkpoints=[{"model": "resnet20", "path": "models/nope-*.th"}])
    r = run(tmp_path, bench)
    assert r.exit_code == 2
    assert "matches no file" in r.output and "--data-root" in r.output
    assert not (tmp_path / "runs").exists()  # found before any folder is made

    fake_akamaster(tmp_path / "data" / "models" / "resnet20-copy.th")
    bench = bench_file(tmp_path)
    r = run(tmp_path, bench)
    assert r.exit_code == 2
    assert "matches 2 files" in r.output and "narrower glob" in r.output


def test_training_options_are_refused(tmp_path: Path):
    bench = bench_file(tmp_path)
    r = run(tmp_path, bench, "--epochs", "3", "--dry-run")
    assert r.exit_code == 2
    assert "--epochs does not apply" in r.output and "trains nothing" in r.output
    r = run(tmp_path, bench, "--loss", "softmax")
    assert r.exit_code == 2 and "drop --loss" in r.output


def other_weights(path: Path) -> None:
    """An akamaster file with weights unlike `fake_akamaster`'s."""
    fake_akamaster(path)
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["module.linear.bias"] += 1.0
    torch.save(raw, path)


def test_weights_are_recognised_by_content_not_path(tmp_path: Path):
    bench = bench_file(tmp_path)
    assert run(tmp_path, bench).exit_code == 0
    # the same file under another data root: the same weights, kept
    moved = tmp_path / "elsewhere"
    (tmp_path / "data").rename(moved)
    r = invoke("run", bench, "--runs-root", tmp_path / "runs", "--data-root", moved,
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "importing" not in r.output and "scored tiny-pre/resnet20: kept" in r.output
    # other weights at the same path: refused by `run` and flagged by --dry-run alike
    other_weights(moved / "models" / "resnet20-12fca82f.th")
    r = invoke("run", bench, "--runs-root", tmp_path / "runs", "--data-root", moved,
               "--device", "cpu", "--dry-run")
    assert "holds other weights" in r.output and "stop with exit 2" in r.output
    r = invoke("run", bench, "--runs-root", tmp_path / "runs", "--data-root", moved,
               "--device", "cpu")
    assert r.exit_code == 2
    assert "holds other weights" in r.output and "another `name:`" in r.output


def test_a_folder_holding_other_weights_or_config_is_not_overwritten(tmp_path: Path):
    bench = bench_file(tmp_path)
    assert run(tmp_path, bench).exit_code == 0
    other = tmp_path / "data" / "models" / "other" / "resnet20-b.th"
    other.parent.mkdir()
    other_weights(other)
    moved = bench_file(tmp_path, checkpoints=[{"model": "resnet20",
                                               "path": "models/other/resnet20-b.th"}])
    r = run(tmp_path, moved)
    assert r.exit_code == 2
    assert "holds other weights" in r.output and "another `name:`" in r.output

    changed = bench_file(tmp_path, detectors=["msp", "energy", "maxlogit"])
    r = run(tmp_path, changed, "--dry-run")
    assert "holds another configuration" in r.output and "stop with exit 2" in r.output
    r = run(tmp_path, changed)
    assert r.exit_code == 2 and "delete that folder" in r.output


def test_checkpoints_of_one_model_with_seeds_are_averaged_as_seeds_also_in_parallel(
        tmp_path: Path):
    bench = bench_file(tmp_path)
    fake_akamaster(tmp_path / "data" / "models" / "second.th")
    raw = yaml.safe_load(bench.read_text())
    raw["checkpoints"].append({"model": "resnet20", "path": "models/second.th", "seed": 1})
    bench.write_text(yaml.safe_dump(raw))
    r = run(tmp_path, bench, "--jobs", "2")
    assert r.exit_code == 0, r.output
    assert "import: importing" in r.output and ": training" not in r.output
    assert "resnet20-seed1: done" in r.output and "resnet20: done" in r.output
    assert "mean ± std over 2 seeds [0, 1]" in r.output
    log = (tmp_path / "runs" / "tiny-pre" / "resnet20-seed1" / "job.log").read_text()
    assert " calibrate " in log and " train " not in log


def config(**changes) -> dict:
    return {"name": "b", "in_distribution": "digits", "model": "smallcnn8",
            "losses": ["softmax"], "detectors": ["msp"], "ood": {"far": ["gaussian"]},
            **changes}


@pytest.mark.parametrize("changes, message", [
    ({"losses": ["dismax"], "checkpoints": [{"model": "resnet20", "path": "a.th"}]},
     "losses: [softmax]"),
    ({"checkpoints": [{"model": "resnet20", "path": "a.th"},
                      {"model": "resnet20", "path": "b.th"}]}, "seed 0 of resnet20 more than once"),
    ({"checkpoints": [{"model": "resnet20", "path": "a.th", "name": "x"},
                      {"model": "resnet32", "path": "b.th", "name": "x"}]}, "run names repeat"),
    ({"checkpoints": [{"model": "resnet20", "path": "a.th", "seed": -1}]}, "seed"),
    ({"checkpoints": [{"model": "resnet20"}]}, "path"),
    ({"checkpoints": [{"model": "resnet20", "path": "a.th", "epochs": 3}]}, "not a known key"),
    ({"checkpoints": {"model": "resnet20", "path": "a.th"}}, "must be a list"),
])
def test_bad_checkpoint_entries_are_refused_with_the_fix(changes, message):
    with pytest.raises(OodbenchError) as e:
        BenchmarkConfig.from_dict(config(**changes), "b.yaml")
    assert message in str(e.value) + (e.value.hint or "")


def test_entries_round_trip_and_a_trained_runs_config_has_no_checkpoints_key():
    cfg = BenchmarkConfig.from_dict(config(checkpoints=[
        {"model": "resnet20", "path": "m/r20.th"},
        {"model": "resnet20", "path": "m/r20b.th", "seed": 1},
        {"model": "resnet20", "path": "m/r20c.th", "seed": 2, "name": "r20c"}]))
    assert [(e.name, e.model, e.seed) for e in cfg.checkpoints] == [
        ("resnet20", "resnet20", 0), ("resnet20-seed1", "resnet20", 1), ("r20c", "resnet20", 2)]
    assert BenchmarkConfig.from_dict(cfg.to_dict()).checkpoints == cfg.checkpoints
    assert isinstance(cfg.checkpoints[0], CheckpointEntry)
    assert "checkpoints" not in BenchmarkConfig.from_dict(config()).to_dict()
