"""Bad input found by an audit of the CLI, each now exit 2 with the fix (or the right code):
repeated or missing benchmark entries, `run --seeds` out of range, run folders on a file or
over other runs, `score --selection` / `--forget` typos, an unreadable metrics.json, a pipe
closed by its reader."""

import json
import os

import pytest
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.config import BenchmarkConfig
from oodbench.errors import SIGPIPE_EXIT, OodbenchError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def config(**changes) -> dict:
    return {"name": "b", "in_distribution": "digits", "model": "smallcnn8",
            "losses": ["softmax"], "detectors": ["msp"], "ood": {"far": ["gaussian"]},
            **changes}


@pytest.mark.parametrize("changes, message", [
    ({"seeds": [0, 0]}, "`seeds` repeats [0, 0]"),
    ({"losses": ["softmax", "softmax"]}, "`losses` repeats"),
    ({"detectors": ["msp", "energy", "msp"]}, "`detectors` repeats"),
    ({"ood": {"far": []}}, "lists no OOD set"),
    ({"ood": {}}, "lists no OOD set"),
])
def test_repeated_or_missing_benchmark_entries_are_refused(changes, message):
    with pytest.raises(OodbenchError) as e:
        BenchmarkConfig.from_dict(config(**changes), "b.yaml")
    assert message in str(e.value)


def test_a_shift_only_benchmark_needs_no_ood_set():
    cfg = BenchmarkConfig.from_dict(config(ood={}, shift={"corruptions": ["gaussian_noise"]}))
    assert cfg.ood == []


@pytest.mark.parametrize("n", ["0", "2", "-1"])
def test_run_seeds_outside_the_benchmarks_seeds_is_exit_2(n):
    r = invoke("run", "--seeds", n, "--dry-run")  # digits has one seed
    assert r.exit_code == 2, r.output
    assert "has 1 seed [0]" in r.output and "1 ≤ N ≤ 1" in r.output


def test_a_run_folder_on_a_file_or_over_other_runs_is_refused(tiny_benchmark, tmp_path):
    (tmp_path / "afile").write_text("")
    r = invoke("train", "--benchmark", tiny_benchmark, "--run-dir", tmp_path / "afile")
    assert r.exit_code == 2 and "is a file, not a run folder" in r.output

    assert invoke("train", "--benchmark", tiny_benchmark).exit_code == 0
    r = invoke("train", "--benchmark", tiny_benchmark, "--epochs", "1", "--run-dir",
               tmp_path / "runs" / "tiny-digits")
    assert r.exit_code == 2, r.output
    assert "holds run folders already" in r.output
    assert not (tmp_path / "runs" / "tiny-digits" / "config.yaml").exists()

    r = invoke("run", tiny_benchmark, "--epochs", "1")  # another config in run's own folder
    assert r.exit_code == 2
    assert "--runs-root DIR" in " ".join(r.output.split())


def test_score_typos_are_exit_2_and_an_unreadable_metrics_file_is_announced(tiny_benchmark,
                                                                            tmp_path):
    assert invoke("train", "--benchmark", tiny_benchmark).exit_code == 0
    run = tmp_path / "runs" / "tiny-digits" / "dismax-seed0"
    r = invoke("score", run, "--selection", "bogus")
    assert r.exit_code == 2 and "none, id, fgsm, ood" in r.output
    r = invoke("score", run, "-d", "knn", "-d", "react", "-d", "odin", "--selection", "id")
    assert r.exit_code == 2, r.output
    said = " ".join(r.output.split())
    assert "knn, react cannot select that way" in said and "fgsm, none, ood" in said
    assert invoke("score", run, "-d", "msp", "-d", "energy").exit_code == 0

    r = invoke("score", run, "--forget", "bogus")
    assert r.exit_code == 2, r.output
    assert "no such detector" in r.output and "energy, msp" in r.output
    r = invoke("score", run, "--forget", "energy")
    assert r.exit_code == 0 and "removed energy" in r.output
    assert set(json.loads((run / "metrics.json").read_text())["detectors"]) == {"msp"}

    (run / "metrics.json").write_text("garbage")
    r = invoke("score", run, "-d", "entropy")
    assert r.exit_code == 0, r.output
    assert "is not valid JSON" in " ".join(r.output.split())
    assert (run / "metrics.json.unreadable").read_text() == "garbage"


def test_a_pipe_closed_by_its_reader_exits_141_not_1(monkeypatch):
    """1 is what `report` exits with for a failed gate; a closed pipe is no failed gate."""
    from oodbench.console import _Console

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError

        def flush(self):
            raise BrokenPipeError

    monkeypatch.setattr(os, "dup2", lambda fd, fd2: None)  # leave pytest's stdout alone
    with pytest.raises(SystemExit) as e:
        _Console(file=ClosedPipe()).print("a table")
    assert e.value.code == SIGPIPE_EXIT == 141



def test_out_of_range_subspace_sizes_given_by_the_user_are_exit_2_and_keep_results(
        tiny_benchmark, tmp_path):
    """vim.dim ≥ D and neco.d ≥ D (every NECO ratio is then exactly 1) given with -p: bad
    input, exit 2, and the detector's earlier valid results stay in metrics.json."""
    assert invoke("train", "--benchmark", tiny_benchmark, "--loss", "softmax").exit_code == 0
    run = tmp_path / "runs" / "tiny-digits" / "softmax-seed0"
    assert invoke("score", run, "-d", "vim").exit_code == 0
    before = json.loads((run / "metrics.json").read_text())["detectors"]["vim"]
    r = invoke("score", run, "-d", "vim", "-p", "vim.dim=500")
    assert r.exit_code == 2 and "must be in [1, D) for feature dimension D = 128" in r.output
    assert json.loads((run / "metrics.json").read_text())["detectors"]["vim"] == before
    r = invoke("score", run, "-d", "neco", "-p", "neco.d=128")
    assert r.exit_code == 2 and "must be below the feature dimension D = 128" in r.output
    r = invoke("score", run, "-d", "neco", "--selection", "fgsm")  # the grid's 128: no candidate
    assert r.exit_code == 0, r.output
    neco = json.loads((run / "metrics.json").read_text())["detectors"]["neco"]
    assert neco["hparams"]["d"] != 128
