"""Run folders against hostile inputs and interruptions: checkpoints that are not oodbench's,
weights of another model, temporaries of killed processes, two `score`s of one run at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_digits_run
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.errors import OodbenchError
from oodbench.io import locked, temp_tag
from oodbench.models import build_classifier
from oodbench.runs import Run, WeightsMismatch, load_checkpoint, load_weights

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def digits_run(root: Path, train: bool = False) -> Run:
    return make_digits_run(root / "run", train)


SD = {"w": torch.zeros(2)}
FOREIGN = {
    "a bare tensor": (torch.zeros(3), "holds a Tensor, not a dict"),
    "a dict without model": ({"state_dict": SD}, "no `model` state dict"),
    "model not a dict": ({"model": [1, 2], "finished": True}, "no `model` state dict"),
    "non-tensor weights": ({"model": {"w": 1.0}, "finished": True}, "non-tensor entries (w)"),
    "no finished flag": ({"model": SD}, "no `finished` flag"),
    "finished not a bool": ({"model": SD, "finished": "yes"}, "no `finished` flag"),
    "unfinished without optimizer": ({"model": SD, "finished": False, "epoch": 1, "step": 0,
                                      "history": []}, "`optimizer` is not a dict"),
    "history not a list": ({"model": SD, "finished": True, "history": {}},
                           "`history` is not a list"),
}


@pytest.mark.parametrize("kind", FOREIGN)
def test_a_checkpoint_that_is_not_oodbench_s_is_a_clear_error(tmp_path, kind):
    value, why = FOREIGN[kind]
    path = tmp_path / "checkpoint.pt"
    torch.save(value, path)
    with pytest.raises(OodbenchError) as e:
        load_checkpoint(path)
    assert str(path) in e.value.message and why in e.value.message
    assert "train again" in e.value.hint and "oodbench import-checkpoint" in e.value.hint


def test_a_valid_checkpoint_loads_and_gets_a_history(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": SD, "finished": True}, path)
    assert load_checkpoint(path)["history"] == []


@pytest.mark.parametrize("command", ["score", "calibrate"])
def test_score_on_a_bare_tensor_checkpoint_exits_2(tmp_path, command):
    run = digits_run(tmp_path)
    torch.save(torch.zeros(3), run.checkpoint_path)
    r = runner.invoke(app, [command, str(run.path)])
    assert r.exit_code == 2, r.output
    assert "not an oodbench checkpoint" in r.output and "fix:" in r.output
    assert not isinstance(r.exception, KeyError | AttributeError | TypeError)


def resnet(name: str, classes: int = 10) -> torch.nn.Module:
    return build_classifier(name, torch.nn.Linear, classes, 3, 32)


def test_another_number_of_classes_is_named():
    m = WeightsMismatch.between(resnet("resnet20"), resnet("resnet20", 100).state_dict())
    assert (len(m.missing), len(m.unexpected), len(m.shapes)) == (0, 0, 2)
    assert m.likely_cause() == ("another number of classes: the checkpoint's head has 100 "
                                "outputs, the model's 10")


def test_another_depth_is_summarised_in_a_few_lines():
    with pytest.raises(OodbenchError) as e:
        load_weights(resnet("resnet20"), resnet("resnet32").state_dict(), "ck.pt")
    lines = e.value.message.splitlines()
    assert len(lines) == 3, lines  # counts, the unexpected keys, the likely cause
    assert lines[0] == ("checkpoint ck.pt does not match the model: 0 missing, 72 unexpected, "
                        "0 shape-mismatched keys")
    assert lines[1].endswith("(+69 more)") and lines[1].count(",") == 2
    assert lines[2] == ("  likely cause: another depth: the checkpoint has 15 blocks (5+5+5), "
                        "the model 9 blocks (3+3+3)")


def test_a_dataparallel_prefix_is_named():
    sd = {f"module.{k}": v for k, v in resnet("resnet20").state_dict().items()}
    m = WeightsMismatch.between(resnet("resnet20"), sd)
    assert "`module.` prefix" in m.likely_cause()


def test_a_matching_state_loads(tmp_path):
    a, b = resnet("resnet20"), resnet("resnet20")
    load_weights(a, b.state_dict(), "ck.pt")
    assert torch.equal(a.head.weight, b.head.weight)


def test_opening_a_run_removes_temporaries_of_dead_processes(tmp_path):
    run = digits_run(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = temp_tag().rsplit("-", 1)[1]
    stale = [run.path / f".checkpoint.pt.x1.tmp-{dead.pid}-{host}",
             run.path / "scores" / "msp" / f".svhn.npy.x2.tmp-{dead.pid}-{host}"]
    live = run.path / f".metrics.json.x3{temp_tag()}"
    for p in [*stale, live]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    Run.open(run.path)
    assert not any(p.exists() for p in stale) and live.exists()
    assert (run.path / "config.yaml").exists()


def oodbench(*args: object, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "oodbench", *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_scores_of_one_run_at_once_keep_both_detectors(tmp_path):
    """Two `score` processes of different detectors: while this test holds metrics.json's lock
    both finish their scores and wait; released, both results end up in metrics.json."""
    run = digits_run(tmp_path, train=True)
    with locked(run.metrics_path):
        procs = [oodbench("score", run.path, "-d", d, "--batch-size", "256", cwd=tmp_path)
                 for d in ("msp", "energy")]
        deadline = time.monotonic() + 300
        while not all((run.scores_dir / d / "digits.npy").exists() for d in ("msp", "energy")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        time.sleep(0.5)
        assert not run.metrics_path.exists()  # both wait for the lock to merge
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    metrics = json.loads(run.metrics_path.read_text())
    assert sorted(metrics["detectors"]) == ["energy", "msp"]


def test_publish_copies_only_the_record_files_and_report_reads_them(tmp_path):
    """What `oodbench publish` leaves is committable (no weights, cache, scores) and enough for
    `oodbench report` to give the same table as on the original run folders."""
    run = make_digits_run(tmp_path / "runs" / "digits" / "softmax-seed0")
    r = runner.invoke(app, ["score", str(run.path), "-d", "msp", "-d", "energy"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["publish", str(tmp_path / "runs"), str(tmp_path / "pub")])
    assert r.exit_code == 0, r.output
    published = tmp_path / "pub" / "digits" / "softmax-seed0"
    records = ["calibration.json", "config.yaml", "manifest.json", "metrics.json"]
    assert sorted(p.name for p in published.iterdir()) == [
        n for n in records if (run.path / n).exists()]
    assert (run.path / "checkpoint.pt").exists() and (run.path / "scores").is_dir()
    assert (published / "metrics.json").read_bytes() == run.metrics_path.read_bytes()
    tables = []
    for root in (tmp_path / "runs", tmp_path / "pub"):
        r = runner.invoke(app, ["report", str(root), "--format", "json", "--no-write"])
        assert r.exit_code == 0, r.output
        tables.append(json.loads(r.output)["groups"])
    assert tables[0] == tables[1]
    r = runner.invoke(app, ["publish", str(tmp_path / "empty"), str(tmp_path / "x")])
    assert r.exit_code == 2 and "no scored runs" in r.output
