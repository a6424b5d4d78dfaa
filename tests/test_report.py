"""`oodbench report` on metrics.json files written by hand (no training): formats, filters,
means, compare, paper style, schema, CI gates (exit codes both ways), bootstrap and plots."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from jsonschema_lite import errors
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.metrics import ood_metrics

SCHEMA = json.loads((Path(__file__).parent.parent / "oodbench" / "schemas"
                     / "report.schema.json").read_text())
OOD = {"near1": "near", "gaussian": "far"}
runner = CliRunner()


def write_run(root: Path, loss: str, seed: int, shift: float) -> Path:
    """A run folder with saved scores, cached test logits and the metrics.json `score` writes;
    `shift` moves in-distribution scores up (bigger = easier)."""
    rng = np.random.default_rng(seed)
    run = root / f"{loss}-seed{seed}"
    detectors = {}
    for det, extra in (("msp", 0.0), ("mmles", 0.5)):
        in_s = rng.normal(shift + extra, 1.0, 200)
        sets = {"near1": rng.normal(shift / 2, 1.0, 150), "gaussian": rng.normal(0, 1.0, 150)}
        for name, s in {"digits": in_s, **sets}.items():
            (run / "scores" / det).mkdir(parents=True, exist_ok=True)
            np.save(run / "scores" / det / f"{name}.npy", s.astype(np.float32))
        detectors[det] = {"ood": {o: ood_metrics(in_s, s) for o, s in sets.items()},
                          "cost": 1.0 + extra / 10, "temperature": 1.0,
                          "selection": {"added by": "another helper"}}  # extra keys tolerated
    logits = rng.normal(0, 1, (200, 3)) * 3
    labels = np.where(rng.random(200) < 0.8, logits.argmax(1), rng.integers(0, 3, 200))
    (run / "cache" / "k1").mkdir(parents=True)
    np.save(run / "cache" / "k1" / "logits.npy", logits.astype(np.float32))
    np.save(run / "cache" / "k1" / "labels.npy", labels)
    cls = {"accuracy": 0.8 + shift / 100, "ece": 0.05, "nll": 0.6}
    metrics = {
        "schema": "oodbench.metrics/1", "run": str(run), "benchmark": "toy",
        "in_distribution": "digits", "model": "smallcnn8", "loss": loss, "seed": seed,
        "ood_sets": OOD, "n": {"digits": 200, "near1": 150, "gaussian": 150},
        "classification": {"uncalibrated": cls, "calibrated": {**cls, "ece": 0.02}},
        "calibration": {"temperature": 1.5}, "detectors": detectors,
        "test_set": "digits", "cache_keys": {"digits": "k1"}, "weights": "ab" * 32,
        "environment": {"torch": "x", "device": "cpu", "platform": "p"},
        "provenance": {"packages": {"torch": "x"}, "device": {"device": "cpu"},
                       "git": None, "datasets": {"digits": "f" * 64}, "config": {"seed": seed},
                       "config_sha256": "c" * 64, "created": "now"},
        "unknown_future_key": [1, 2, 3],
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "manifest.json").write_text(json.dumps(  # what `train` writes
        {"data": {"train": {"sha256": "e" * 64}}, "epochs": 3, "final": {"loss": 0.1}}))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs" / "toy"
    for seed in (0, 1):
        write_run(root, "softmax", seed, 1.0)
        write_run(root, "dismax", seed, 3.0)
    return root


def invoke(*args: str):
    return runner.invoke(app, ["report", *map(str, args)], catch_exceptions=False)


def test_json_matches_schema_and_aggregates(runs: Path):
    res = invoke(runs, "-f", "json", "--no-write")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert errors(doc, SCHEMA) == []
    (g,) = doc["groups"]
    assert list(g["ood_sets"]) == ["near1", "gaussian"] and g["seeds"] == [0, 1]
    row = next(r for r in g["rows"] if (r["loss"], r["detector"]) == ("dismax", "msp"))
    per_seed = [json.loads((runs / f"dismax-seed{s}" / "metrics.json").read_text())
                ["detectors"]["msp"]["ood"] for s in (0, 1)]
    aurocs = [p["near1"]["auroc"] for p in per_seed]
    cell = row["ood"]["near1"]["auroc"]
    assert cell["mean"] == pytest.approx(np.mean(aurocs))
    assert cell["std"] == pytest.approx(np.std(aurocs, ddof=1)) and cell["n"] == 2
    means = [np.mean([p[o]["auroc"] for o in OOD]) for p in per_seed]
    assert row["means"]["all"]["auroc"]["mean"] == pytest.approx(np.mean(means))
    assert row["means"]["far"]["auroc"]["mean"] == pytest.approx(
        np.mean([p["gaussian"]["auroc"] for p in per_seed]))
    assert row["cost"]["mean"] == pytest.approx(1.0)
    assert g["classification"]["dismax"]["temperature"]["mean"] == 1.5
    manifest = doc["manifest"]
    assert len(manifest["runs"]) == 4
    assert manifest["runs"][0]["datasets"] == {"digits": "f" * 64}
    assert manifest["runs"][0]["training"] == {"data": {"train": {"sha256": "e" * 64}},
                                               "epochs": 3}
    assert manifest["report_packages"]["numpy"] == np.__version__


def test_captions_and_warnings_name_a_loss_or_row_with_fewer_seeds(runs: Path):
    """softmax has seeds 0–2, dismax 0–1, and dismax's mmles only seed 0: a caption saying
    "3 seeds" would be false for dismax's rows, and a 3-seed group must still warn."""
    write_run(runs, "softmax", 2, 1.0)
    metrics = runs / "dismax-seed1" / "metrics.json"
    m = json.loads(metrics.read_text())
    del m["detectors"]["mmles"]
    metrics.write_text(json.dumps(m))
    res = invoke(runs, "-f", "markdown", "--no-write")
    assert res.exit_code == 0, res.output
    assert "_mean ± std over 3 seeds [0, 1, 2] (dismax: 2 seeds [0, 1])_" in res.output
    # the OOD tables name the loss once, and a row only where it has fewer seeds than its loss
    assert ("mean ± std over 3 seeds [0, 1, 2] (dismax: 2 seeds [0, 1]; dismax mmles: 1 seed "
            "[0]); best per column" in res.output)
    assert "dismax has 2 seeds (0, 1)" in res.output
    doc = json.loads(invoke(runs, "-f", "json", "--no-write").stdout)
    (g,) = doc["groups"]
    assert g["classification"]["dismax"]["seeds"] == [0, 1]
    assert g["classification"]["softmax"]["seeds"] == [0, 1, 2]
    assert errors(doc, SCHEMA) == []
    res = invoke(runs, "-f", "markdown", "--no-write", "--loss", "softmax")
    assert "over 3 seeds [0, 1, 2]; best" in res.output and "has 2 seeds" not in res.output


def test_a_row_with_fewer_seeds_than_its_loss_is_named(runs: Path):
    metrics = runs / "dismax-seed1" / "metrics.json"
    m = json.loads(metrics.read_text())
    del m["detectors"]["mmles"]
    metrics.write_text(json.dumps(m))
    res = invoke(runs, "-f", "markdown", "--no-write")
    assert "over 2 seeds [0, 1] (dismax mmles: 1 seed [0]); best" in res.output


def test_schema_rejects_a_broken_report(runs: Path):
    doc = json.loads(invoke(runs, "-f", "json", "--no-write").stdout)
    doc["groups"][0]["rows"][0]["ood"]["near1"]["auroc"]["std"] = -1
    del doc["manifest"]
    assert len(errors(doc, SCHEMA)) >= 1


def test_filters_and_files(runs: Path, tmp_path: Path):
    out = tmp_path / "out"
    res = invoke(runs, "--metric", "auroc", "--ood", "gaussian", "-d", "mmles", "--loss",
                 "dismax", "--output", out, "-f", "markdown")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "report.json").read_text())
    (g,) = doc["groups"]
    assert [(r["loss"], r["detector"]) for r in g["rows"]] == [("dismax", "mmles")]
    assert list(g["ood_sets"]) == ["gaussian"]
    assert set(g["rows"][0]["ood"]["gaussian"]) == {"auroc"}
    assert errors(doc, SCHEMA) == []
    assert "AUROC" in res.stdout and "near1" not in res.stdout
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    ood_rows = [r for r in rows if r["metric"] == "auroc"]
    assert {r["column"] for r in ood_rows} == {"gaussian", "all"}
    assert all(r["unit"] == "fraction" for r in ood_rows)
    assert "**" in (out / "report.md").read_text()


def test_unknown_metric_is_a_clean_error(runs: Path):
    res = invoke(runs, "--metric", "auc")
    assert res.exit_code == 2 and "unknown metric" in res.output


@pytest.mark.parametrize(("gate", "code"), [
    (["--fail-under", "auroc=0.5"], 0),
    (["--fail-under", "auroc=0.99"], 1),
    (["--fail-under", "auroc:gaussian:dismax=0.9"], 0),
    (["--fail-under", "auroc:near1:softmax=0.9"], 1),
    (["--fail-over", "fpr_at_tpr95=1.0"], 0),
    (["--fail-over", "fpr_at_tpr95:mmles=0.05"], 1),
    (["--fail-under", "accuracy=0.7", "--fail-over", "ece:calibrated=0.03"], 0),
    (["--fail-over", "cost=1.01"], 1),
])
def test_gates_exit_codes(runs: Path, gate: list[str], code: int):
    res = invoke(runs, "--no-write", *gate)
    assert res.exit_code == code, res.output
    assert ("FAIL" in res.output) == bool(code)


def test_gate_prints_the_failed_cells(runs: Path):
    res = invoke(runs, "--no-write", "--fail-under", "auroc:mean=0.99", "-d", "msp")
    assert res.exit_code == 1
    fails = [line for line in res.output.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2 and all("msp" in f and "mean" in f for f in fails)


@pytest.mark.parametrize("spec", ["auroc:cifar=0.9", "auroc", "auroc=high", "speed=1",
                                  "auroc=90"])
def test_bad_gates_are_errors(runs: Path, spec: str):
    res = invoke(runs, "--no-write", "--fail-under", spec)
    assert res.exit_code == 2, res.output


def test_compare_shows_deltas(runs: Path, tmp_path: Path):
    res = invoke("--compare", runs / "softmax-seed0", runs / "softmax-seed1", "--output", tmp_path,
                 "--metric", "auroc")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert errors(doc, SCHEMA) == []
    a = json.loads((runs / "softmax-seed0" / "metrics.json").read_text())
    b = json.loads((runs / "softmax-seed1" / "metrics.json").read_text())
    cell = next(r for r in doc["groups"][0]["rows"] if r["detector"] == "msp")["columns"]
    want = b["detectors"]["msp"]["ood"]["gaussian"]["auroc"] - \
        a["detectors"]["msp"]["ood"]["gaussian"]["auroc"]
    assert cell["gaussian"]["auroc"]["delta"] == pytest.approx(want)
    assert "→" in res.stdout


def test_paper_style(runs: Path):
    res = invoke(runs, "--style", "paper", "-f", "markdown", "--no-write",
                 "--pair", "softmax:msp", "--pair", "dismax:mmles")
    assert res.exit_code == 0, res.output
    assert "TNR@95 softmax+msp" in res.stdout and "DTACC dismax+mmles" in res.stdout
    assert "| near1 (near) |" in res.stdout
    res = invoke(runs, "--style", "paper", "--no-write", "--pair", "isomax:es")
    assert res.exit_code == 2
    assert "the losses here: dismax, softmax" in " ".join(res.output.split())


def test_bootstrap_interval(runs: Path):
    res = invoke(runs, "-f", "json", "--no-write", "--bootstrap", "50", "-d", "msp",
                 "--metric", "auroc")
    doc = json.loads(res.stdout)
    assert errors(doc, SCHEMA) == []
    for r in doc["groups"][0]["rows"]:
        for cell in [*(c["auroc"] for c in r["ood"].values()), r["means"]["all"]["auroc"]]:
            lo, hi = cell["ci95"]
            assert lo <= hi and lo - 0.05 < cell["mean"] < hi + 0.05


def test_plots_are_written(runs: Path, tmp_path: Path):
    res = invoke(runs, "--no-write", "--plots", tmp_path / "figs", "-d", "msp")
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert files == ["toy_dismax_seed0_msp_hist.png", "toy_dismax_seed0_msp_roc.png",
                     "toy_dismax_seed0_reliability.png", "toy_softmax_seed0_msp_hist.png",
                     "toy_softmax_seed0_msp_roc.png", "toy_softmax_seed0_reliability.png"]
    for f in (tmp_path / "figs").iterdir():
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_nonfinite_scores_are_shown_and_block_the_means(runs: Path):
    """A set whose scores held NaN/inf has no metric: its cell says so, and no mean is taken
    over the remaining sets (that would compare detectors over different sets)."""
    for seed in (0, 1):
        path = runs / f"softmax-seed{seed}" / "metrics.json"
        m = json.loads(path.read_text())
        del m["detectors"]["msp"]["ood"]["gaussian"]
        m["detectors"]["msp"]["nonfinite"] = {"gaussian": 3}
        path.write_text(json.dumps(m))
    doc = json.loads(invoke(runs, "-f", "json", "--no-write").stdout)
    assert errors(doc, SCHEMA) == []
    row = next(r for r in doc["groups"][0]["rows"]
               if (r["loss"], r["detector"]) == ("softmax", "msp"))
    assert row["nonfinite"] == {"gaussian": 6}
    assert "gaussian" not in row["ood"] and "near1" in row["ood"]
    assert set(row["means"]) == {"near"}  # far and overall would leave gaussian out
    md = invoke(runs, "-f", "markdown", "--no-write").stdout
    line = next(ln for ln in md.splitlines() if ln.startswith("| softmax | msp |"))
    assert "NaN×6" in line
    res = invoke(runs, "--no-write", "--fail-under", "auroc:gaussian:msp=0.0")
    assert res.exit_code == 1 and "gaussian" in res.output  # NaN fails even a zero bar
    assert invoke(runs, "--no-write", "--fail-under", "auroc:gaussian:mmles=0.0").exit_code == 0


def _set(d: dict, dotted: str, value) -> None:
    *path, last = dotted.split("/")
    for k in path:
        d = d[k]
    d[last] = value


@pytest.mark.parametrize(("key", "value", "named"), [
    ("detectors", [], "`detectors` is a list ([]), expected an object"),
    ("detectors/msp/ood/gaussian/auroc", "0.9",
     '`detectors.msp.ood.gaussian.auroc` is a string ("0.9"), expected a number'),
    ("seed", "x", '`seed` is a string ("x"), expected an integer'),
    ("seed", True, "`seed` is a boolean (true), expected an integer"),
    ("ood_sets", ["near1", "gaussian"], "`ood_sets` is a list"),
    ("ood_sets/gaussian", "middle", '`ood_sets.gaussian` is a string ("middle"), expected '
                                    '"near" or "far"'),
    ("classification/uncalibrated/accuracy", None,
     "`classification.uncalibrated.accuracy` is null (null), expected a number"),
    ("detectors/msp", 3, "`detectors.msp` is a number (3), expected an object"),
    ("detectors/msp/ood/near1", {"auroc": 0.5}, "`detectors.msp.ood.near1` lacks"),
    ("detectors/msp/cost", "cheap", "`detectors.msp.cost` is a string"),
    ("calibration/temperature", "1.5", "`calibration.temperature` is a string"),
    ("loss", 7, "`loss` is a number (7), expected a string"),
])
def test_a_hand_edited_metrics_file_with_wrong_types_exits_2_naming_file_and_key(
        tmp_path, key, value, named):
    run = write_run(tmp_path / "runs", "softmax", 0, 2.0)
    metrics = json.loads((run / "metrics.json").read_text())
    _set(metrics, key, value)
    (run / "metrics.json").write_text(json.dumps(metrics))
    res = runner.invoke(app, ["report", str(tmp_path / "runs"), "--no-write"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert named in text and str(run / "metrics.json") in text.replace(" ", "")
    assert "fix:" in text


def report_json(*args) -> dict:
    """`oodbench report ARGS -f json --no-write`, checked against the schema."""
    res = invoke(*args, "-f", "json", "--no-write")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert errors(doc, SCHEMA) == []
    return doc



def test_losses_with_disjoint_seeds_are_not_called_a_two_seed_group(tmp_path: Path):
    """dismax seed 0 beside softmax seed 1: the group's seeds are [0, 1] but no row averages two
    seeds, so neither the caption nor the warning may say "2 seeds"."""
    write_run(tmp_path, "dismax", 0, 1.0)
    write_run(tmp_path, "softmax", 1, 1.0)
    res = invoke(tmp_path, "-f", "markdown", "--no-write")
    assert res.exit_code == 0, res.output
    assert "2 seeds" not in res.output
    assert ("_mean ± std over the seeds each loss has (dismax: 1 seed [0]; softmax: 1 seed "
            "[1])_" in res.output)
    assert "dismax has 1 seed (0); softmax has 1 seed (1); with fewer than 3" in res.output


def test_compare_of_two_losses_says_what_each_side_holds(tmp_path: Path):
    a = write_run(tmp_path / "a", "dismax", 0, 1.0)
    b = write_run(tmp_path / "b", "softmax", 0, 1.0)
    res = invoke("--compare", a, b, "--no-write")
    assert res.exit_code == 2
    assert "holds toy · smallcnn8: dismax" in res.output
    assert "holds toy · smallcnn8: softmax" in res.output
    assert f"report both: `oodbench report {a} {b}`" in " ".join(res.output.split())


def test_plots_skip_a_detector_that_refused_the_head(runs: Path, tmp_path: Path):
    """react is n/a on a DisMax head (no scores saved): --plots draws the others and says so."""
    path = runs / "dismax-seed0" / "metrics.json"
    m = json.loads(path.read_text())
    m["detectors"]["react"] = {"applicable": False, "reason": "needs a linear head", "ood": {}}
    path.write_text(json.dumps(m))
    res = invoke(runs, "--no-write", "--plots", tmp_path / "figs")
    assert res.exit_code == 0, res.output
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert "toy_dismax_seed0_mmles_roc.png" in names and not any("react" in n for n in names)
    assert "react is n/a" in " ".join(res.output.split())


@pytest.mark.parametrize("a, b, shown", [
    (0.9, 0.95, "90.0 → 95.0 (+5.0)"),
    (1.0, 0.99998, "100.0 → 100.0 (-0.002)"),   # −0.002 points, not "-0.0"
    (1.0, 0.9999996, "100.0 → 100.0 (-<0.001)"),
    (0.5, 0.5, "50.0 → 50.0 (+0.0)"),
])
def test_a_tiny_compare_delta_is_not_shown_as_zero(a, b, shown):
    from oodbench.render import _delta_text

    assert _delta_text({"a": a, "b": b, "delta": b - a, "significant": True}) == shown + " sig."
