"""`report` averages only seeds of one experiment, each metrics file once: overlapping paths,
symlinks, other configs, other detector hyperparameters or calibration, repeated seeds. Expected
values are read from the metrics files and averaged with numpy, never by the report code."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_report import invoke, write_run
from test_report import report_json as report

from oodbench.report import find_metrics


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Two losses × seeds 0 and 1, one setup (as test_report's fixture)."""
    root = tmp_path / "runs" / "toy"
    for seed in (0, 1):
        write_run(root, "softmax", seed, 1.0)
        write_run(root, "dismax", seed, 3.0)
    return root


Change = Callable[[dict[str, Any]], Any]


def edit(run: Path, change: Change) -> None:
    """Rewrite a run's metrics.json through `change(metrics)`."""
    path = run / "metrics.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def metrics_of(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())


def rows_of(doc: dict[str, Any], loss: str) -> dict[str, dict[str, Any]]:
    return {r["detector"]: r for r in doc["groups"][0]["rows"] if r["loss"] == loss}


def with_config(epochs: int, seeds: list[int]) -> Change:
    """A change setting provenance.config as `score` writes it (seed inside)."""
    def change(m: dict[str, Any]) -> None:
        m["provenance"]["config"] = {"seed": m["seed"], "loss": m["loss"], "loss_options": {},
                                     "benchmark": {"train": {"epochs": epochs}, "seeds": seeds}}
    return change


def test_overlapping_paths_count_each_run_once(runs: Path, tmp_path: Path):
    (tmp_path / "link").symlink_to(runs / "dismax-seed1")
    files = [metrics_of(runs / f"dismax-seed{s}")["detectors"]["msp"]["ood"]["near1"]["auroc"]
             for s in (0, 1)]
    alone = report(runs)
    doc = report(runs, runs / "dismax-seed0", Path(f"{runs}/./dismax-seed1"), tmp_path / "link")
    for d in (alone, doc):
        cell = rows_of(d, "dismax")["msp"]["ood"]["near1"]["auroc"]
        assert cell["n"] == 2 and cell["values"] == pytest.approx(files)
        assert cell["std"] == pytest.approx(np.std(files, ddof=1))
        assert cell["mean"] == pytest.approx(np.mean(files))
        assert d["groups"][0]["classification"]["dismax"]["uncalibrated"]["accuracy"]["n"] == 2
    assert len(doc["manifest"]["runs"]) == 4
    assert len(find_metrics([runs, runs / "softmax-seed0", tmp_path / "link"])) == 4


def test_other_training_configs_are_separate_rows(tmp_path: Path):
    root = tmp_path / "runs"
    for epochs in (2, 30):
        for seed in (0, 1):
            run = write_run(root / f"e{epochs}", "dismax", seed, 1.0 + epochs / 10)
            # the benchmark's seed list is not part of a run's setup: it must not split
            edit(run, with_config(epochs, [0, 1] if seed else [0, 1, 2]))
    doc = report(root)
    rows = rows_of(doc, "dismax")
    assert set(rows) == {"msp [train.epochs=2]", "msp [train.epochs=30]",
                         "mmles [train.epochs=2]", "mmles [train.epochs=30]"}
    cls = doc["groups"][0]["classification"]
    assert set(cls) == {"dismax [train.epochs=2]", "dismax [train.epochs=30]"}
    for epochs in (2, 30):
        ms = [metrics_of(root / f"e{epochs}" / f"dismax-seed{s}") for s in (0, 1)]
        row = rows[f"msp [train.epochs={epochs}]"]
        assert row["seeds"] == [0, 1]
        assert row["variant"] == {"label": f"train.epochs={epochs}",
                                  "settings": {"config.benchmark.train.epochs": epochs}}
        want = [np.mean([m["detectors"]["msp"]["ood"][o]["auroc"] for o in ("near1", "gaussian")])
                for m in ms]
        assert row["means"]["all"]["auroc"]["mean"] == pytest.approx(np.mean(want))
        assert row["means"]["all"]["auroc"]["std"] == pytest.approx(np.std(want, ddof=1))
        acc = cls[f"dismax [train.epochs={epochs}]"]["uncalibrated"]["accuracy"]
        assert acc["mean"] == pytest.approx(np.mean([m["classification"]["uncalibrated"]
                                                     ["accuracy"] for m in ms]))
        assert acc["n"] == 2
    md = invoke(root, "-f", "markdown", "--no-write").stdout
    assert "| dismax | msp [train.epochs=2] |" in md


def test_one_setup_is_one_row_with_a_null_variant(runs: Path):
    for run in runs.iterdir():
        edit(run, with_config(3, [0, 1]))
    doc = report(runs)
    assert set(rows_of(doc, "softmax")) == {"msp", "mmles"}
    assert all(r["variant"] is None for r in doc["groups"][0]["rows"])
    assert all(c["variant"] is None for c in doc["groups"][0]["classification"].values())


def detector_entry(given: dict[str, Any], selected: float, temperature: float,
                   calibrated: bool | None = None) -> Change:
    """A change giving `msp` the new per-detector fields (`calibrated` None: left out) and
    dropping `mmles` (the same seed with the same mmles setup in two folders is an error)."""
    def change(m: dict[str, Any]) -> None:
        del m["detectors"]["mmles"]
        d = m["detectors"]["msp"]
        d.update(given=given, selected={"T": selected}, temperature=temperature,
                 hparams={**given, "T": selected},
                 selection={"mode": "fgsm", "chosen": {"T": selected}})
        if calibrated is not None:
            d["calibrated"] = calibrated
    return change


def test_given_hyperparameters_split_but_selected_values_do_not(tmp_path: Path):
    root = tmp_path / "runs"
    for grid in ("small", "large"):
        for seed in (0, 1):
            run = write_run(root / grid, "softmax", seed, 1.0)
            # each seed selects its own T and fits its own temperature: results, not setup
            edit(run, detector_entry({"T_grid": grid}, selected=10.0 ** (seed + 1),
                                     temperature=1.2 + seed / 10, calibrated=True))
    rows = rows_of(report(root), "softmax")
    assert set(rows) == {"msp [T_grid=large]", "msp [T_grid=small]"}
    for grid in ("small", "large"):
        row = rows[f"msp [T_grid={grid}]"]
        assert row["seeds"] == [0, 1] and row["ood"]["near1"]["auroc"]["n"] == 2
        assert row["variant"]["settings"] == {"given.T_grid": grid}


def test_calibrated_and_plain_temperature_are_separate_rows(tmp_path: Path):
    root = tmp_path / "runs"
    for cal in (True, False):
        for seed in (0, 1):
            run = write_run(root / str(cal), "softmax", seed, 1.0)
            # older files: no `calibrated`, a temperature other than 1 means calibrated
            edit(run, detector_entry({}, 1.0, 1.3 + seed / 10 if cal else 1.0))
    rows = rows_of(report(root), "softmax")
    assert set(rows) == {"msp [calibrated]", "msp [uncalibrated]"}
    assert rows["msp [calibrated]"]["variant"]["settings"] == {"calibrated": True}
    assert rows["msp [calibrated]"]["seeds"] == [0, 1]


def test_the_same_seed_twice_is_an_error_naming_both_files(runs: Path):
    shutil.copytree(runs / "softmax-seed0", runs / "softmax-seed0-copy")
    res = invoke(runs, "--no-write")
    assert res.exit_code == 2
    text = "".join(res.output.split())  # the console wraps long paths anywhere
    assert "softmax-seed0/metrics.json" in text and "softmax-seed0-copy/metrics.json" in text
    assert "seed0" in text and "removeoneofthem" in text


def test_a_model_scored_twice_differently_counts_once_for_classification(runs: Path):
    """A copy of a run, scored with calibrated temperatures: its detector rows are another
    setup; its classification numbers come from the same weights and count once."""
    copy = runs / "softmax-seed0-calibrated"
    shutil.copytree(runs / "softmax-seed0", copy)
    edit(copy, lambda m: [d.update(calibrated=True) for d in m["detectors"].values()])
    doc = report(runs)
    rows = rows_of(doc, "softmax")
    assert rows["msp [calibrated]"]["seeds"] == [0]
    assert rows["msp [uncalibrated]"]["seeds"] == [0, 1]
    acc = doc["groups"][0]["classification"]["softmax"]["uncalibrated"]["accuracy"]
    want = [metrics_of(runs / f"softmax-seed{s}")["classification"]["uncalibrated"]["accuracy"]
            for s in (0, 1)]
    assert acc["n"] == 2 and acc["values"] == pytest.approx(want)
    edit(copy, lambda m: m.update(weights="cd" * 32))  # other weights, same seed: an error
    assert invoke(runs, "--no-write").exit_code == 2


def test_shortened_labels_that_coincide_are_numbered(tmp_path: Path):
    """Five differing keys: the label names four and "+1 more", so two setups that differ only
    in the fifth would read alike; they must not (render and compare key rows by label)."""
    from oodbench.report import LoadedMetrics, split_variants

    setups = [dict.fromkeys("abcde", 0), {**dict.fromkeys("abcd", 1), "e": 0},
              dict.fromkeys("abcde", 1)]
    runs = [LoadedMetrics(tmp_path / f"{i}.json", {"seed": 0, "setup": s})
            for i, s in enumerate(setups)]
    parts = split_variants(runs, lambda r: {f"config.{k}": v for k, v in r.data["setup"].items()},
                           "test")
    labels = [v.label for v in parts]
    assert labels == ["a=0, b=0, c=0, d=0, +1 more", "a=1, b=1, c=1, d=1, +1 more",
                      "a=1, b=1, c=1, d=1, +1 more (variant 2)"]
    assert parts[2].settings == {f"config.{k}": 1 for k in "abcde"}


def test_a_gate_on_a_detector_name_covers_every_variant(tmp_path: Path):
    root = tmp_path / "runs"
    for epochs in (2, 30):
        for seed in (0, 1):
            edit(write_run(root / f"e{epochs}", "dismax", seed, 1.0 + epochs / 10),
                 with_config(epochs, [0, 1]))
    worst = min(np.mean([metrics_of(root / f"e{e}" / f"dismax-seed{s}")["detectors"]["msp"]
                         ["ood"]["gaussian"]["auroc"] for s in (0, 1)]) for e in (2, 30))
    ok = invoke(root, "--no-write", "--fail-under", f"auroc:msp:gaussian={worst - 1e-6}")
    assert ok.exit_code == 0, ok.output
    bad = invoke(root, "--no-write", "--fail-under", f"auroc:msp:gaussian={worst + 1e-6}")
    assert bad.exit_code == 1 and "dismax · msp [train.epochs=2] · gaussian" in " ".join(
        bad.output.split())
