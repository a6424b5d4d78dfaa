"""Selective classification in `report` ("Beyond AUROC"): the detectors' scores judged as
confidences (in-distribution and with OOD inputs) and the MSP baseline, in JSON, Markdown, CSV
and gates, with expected values computed by hand from the numbers the test writes; runs scored
before these metrics existed report as before."""

import csv
import io
import json
import math
from pathlib import Path

import pytest
from jsonschema_lite import errors
from test_report import SCHEMA, invoke, report_json, write_run

from oodbench.metrics import SELECTIVE_METRICS


def sel(aurc: float, mauroc: float = 0.9, **other: float) -> dict[str, float]:
    base = {"misclassification_auroc": mauroc, "aurc": aurc, "e_aurc": 0.01, "augrc": 0.02,
            "risk_at_80": 0.05, "risk_at_95": 0.08}
    return {**base, **other}


def add_selective(run: Path, seed: int) -> None:
    """msp: in-dist AURC 0.04 / 0.08 and misclassification AUROC 0.70 / 0.80 (seeds 0 / 1),
    with OOD: near1 0.20 / 0.30, gaussian 0.10; mmles: in-dist AURC 0.03, misclassification
    AUROC 0.9 (undefined, NaN, on seed 1), with OOD 0.10 / 0.05; the MSP baseline: AURC 0.045
    at T = 1 and 0.040 calibrated."""
    path = run / "metrics.json"
    m = json.loads(path.read_text())
    m["detectors"]["msp"]["selective"] = {
        "in_distribution": sel(0.04 + 0.04 * seed, 0.70 + 0.1 * seed),
        "with_ood": {"near1": sel(0.20 + 0.1 * seed), "gaussian": sel(0.10)}}
    m["detectors"]["mmles"]["selective"] = {
        "in_distribution": sel(0.03, math.nan if seed else 0.9),
        "with_ood": {"near1": sel(0.10), "gaussian": sel(0.05)}}
    m["classification"]["selective_msp"] = {"uncalibrated": sel(0.045),
                                            "calibrated": sel(0.040)}
    path.write_text(json.dumps(m))  # NaN as the scorer writes it


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs" / "toy"
    for seed in (0, 1):
        for loss, shift in (("softmax", 1.0), ("dismax", 3.0)):
            add_selective(write_run(root, loss, seed, shift), seed)
    return root


def rows(doc: dict, loss: str = "softmax") -> dict[str, dict]:
    return {r["detector"]: r for r in doc["groups"][0]["rows"] if r["loss"] == loss}


def test_cells_are_means_over_seeds(runs: Path):
    doc = report_json(runs)
    msp = rows(doc)["msp"]["selective"]
    aurc = msp["in_distribution"]["aurc"]
    assert aurc["mean"] == pytest.approx(0.06) and aurc["n"] == 2
    assert aurc["std"] == pytest.approx(math.sqrt(2 * 0.02 ** 2))
    assert msp["in_distribution"]["misclassification_auroc"]["mean"] == pytest.approx(0.75)
    assert set(msp["in_distribution"]) == set(SELECTIVE_METRICS)
    assert msp["with_ood"]["near1"]["aurc"]["mean"] == pytest.approx(0.25)
    assert msp["with_ood"]["gaussian"]["aurc"]["std"] == 0.0
    # means over the sets per seed (0.15, 0.20), then over seeds
    assert msp["with_ood_means"]["all"]["aurc"]["mean"] == pytest.approx(0.175)
    assert msp["with_ood_means"]["all"]["aurc"]["values"] == pytest.approx([0.15, 0.20])
    assert msp["with_ood_means"]["near"]["aurc"]["mean"] == pytest.approx(0.25)
    assert msp["with_ood_means"]["far"]["aurc"]["mean"] == pytest.approx(0.10)
    # NaN (no wrong prediction to detect) leaves that seed out of the cell
    mm = rows(doc)["mmles"]["selective"]["in_distribution"]["misclassification_auroc"]
    assert mm["n"] == 1 and mm["mean"] == pytest.approx(0.9)
    base = doc["groups"][0]["classification"]["softmax"]["selective_msp"]
    assert base["uncalibrated"]["aurc"]["mean"] == pytest.approx(0.045)
    assert base["calibrated"]["aurc"]["mean"] == pytest.approx(0.040)


def test_markdown_tables(runs: Path):
    md = invoke(runs, "-f", "markdown", "--no-write").stdout
    assert "selective classification, in-distribution test set" in md
    assert "selective classification with OOD inputs" in md
    lines = md.splitlines()
    ind = lines.index(next(ln for ln in lines if "in-distribution test set (%)" in ln))
    table = lines[ind:lines.index("", ind + 2)]
    assert table[2].startswith("| loss | detector | misclass. AUROC ↑ | AURC ↓ | E-AURC ↓")
    assert "| softmax | MSP baseline (T = 1) | **90.0 ± 0.0** | 4.5 ± 0.0 |" in md
    assert "| softmax | msp | 75.0 ± 7.1 | 6.0 ± 2.8 |" in md
    # the best AURC emphasised; one seed's misclassification AUROC is NaN: one value
    assert "| softmax | mmles | **90.0** | **3.0 ± 0.0** |" in md
    wo = next(ln for ln in lines[ind + len(table):] if ln.startswith("| softmax | msp |"))
    assert "17.5 ± 3.5" in wo


def test_metric_filter_keeps_only_the_selective_metric(runs: Path, tmp_path: Path):
    out = tmp_path / "out"
    res = invoke(runs, "--metric", "aurc", "--output", out, "-f", "markdown")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "report.json").read_text())
    assert errors(doc, SCHEMA) == []
    row = rows(doc)["msp"]
    assert row["ood"] == {} and row["means"] == {}
    assert set(row["selective"]["in_distribution"]) == {"aurc"}
    assert "AUROC ↑ (%)" not in res.stdout and "| AURC ↓ |" in res.stdout
    lines = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    got = {(r["loss"], r["detector"], r["column"], r["group"]): float(r["mean"])
           for r in lines if r["metric"] == "aurc"}
    assert got[("softmax", "msp", "in_dist", "selective")] == pytest.approx(0.06)
    assert got[("softmax", "msp", "near1", "with_ood near")] == pytest.approx(0.25)
    assert got[("softmax", "msp", "all", "with_ood mean")] == pytest.approx(0.175)
    assert got[("softmax", "msp baseline", "calibrated", "selective")] == pytest.approx(0.04)
    assert {r["metric"] for r in lines} <= {"aurc", "accuracy", "ece", "nll", "temperature",
                                            "cost"}


@pytest.mark.parametrize(("gate", "code"), [
    (["--fail-over", "aurc=0.05"], 1),  # msp's in-dist 0.06
    (["--fail-over", "aurc=0.07"], 0),  # with-OOD cells (up to 0.25) only when named
    (["--fail-over", "aurc:in_dist:mmles=0.05"], 0),
    (["--fail-over", "aurc:with_ood=0.07"], 1),
    (["--fail-over", "aurc:with_ood:mmles=0.11"], 0),
    (["--fail-over", "aurc:gaussian=0.11"], 0),
    (["--fail-over", "aurc:near1=0.11"], 1),
    (["--fail-over", "aurc:mean:msp=0.18"], 0),  # with-OOD mean 0.175
    (["--fail-over", "aurc:mean:msp=0.17"], 1),
    (["--fail-under", "misclassification_auroc:msp=0.8"], 1),  # 0.75
    (["--fail-under", "misclassification_auroc:msp=0.7"], 0),
    (["--fail-over", "aurc:baseline=0.044"], 1),  # uncalibrated 0.045
    (["--fail-over", "aurc:baseline:calibrated=0.044"], 0),  # 0.040
    (["--fail-over", "aurc:baseline:dismax=0.05"], 0),
])
def test_gates(runs: Path, gate: list[str], code: int):
    res = invoke(runs, "--no-write", *gate)
    assert res.exit_code == code, res.output
    assert ("FAIL" in res.output) == bool(code)


def test_gate_failures_name_the_cells(runs: Path):
    res = invoke(runs, "--no-write", "--fail-over", "aurc=0.05")
    fails = [ln for ln in res.output.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 2 and all("msp" in f and "in_dist" in f for f in fails)
    res = invoke(runs, "--no-write", "--fail-over", "aurc:near1:softmax=0.11")
    out = " ".join(res.output.split())
    assert out.count("FAIL ") == 1
    assert "softmax · msp · with_ood · near1 = 0.25" in out


def test_compare_has_selective_deltas(runs: Path, tmp_path: Path):
    res = invoke("--compare", runs / "softmax-seed0", runs / "softmax-seed1", "--output",
                 tmp_path, "-f", "markdown")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert errors(doc, SCHEMA) == []
    msp = next(r for r in doc["groups"][0]["rows"] if r["detector"] == "msp")
    assert msp["selective"]["aurc"]["delta"] == pytest.approx(0.04)
    assert "selective classification, in-distribution" in res.stdout


# ------------------------------------------------------------------------- older metrics.json
@pytest.fixture
def old_runs(tmp_path: Path) -> Path:
    root = tmp_path / "old"
    for seed in (0, 1):
        write_run(root, "softmax", seed, 1.0)
    return root


def test_older_runs_report_as_before(old_runs: Path):
    doc = report_json(old_runs)
    assert all("selective" not in r for r in doc["groups"][0]["rows"])
    assert "selective_msp" not in doc["groups"][0]["classification"]["softmax"]
    md = invoke(old_runs, "-f", "markdown", "--no-write").stdout
    assert "selective" not in md and "AUROC ↑" in md


def test_selective_options_on_older_runs_are_clean_errors(old_runs: Path):
    res = invoke(old_runs, "--no-write", "--metric", "aurc")
    assert res.exit_code == 2 and "selective" in res.output
    res = invoke(old_runs, "--no-write", "--fail-over", "aurc=0.1")
    assert res.exit_code == 2 and "selects no cell" in " ".join(res.output.split())


def test_mixed_old_and_new_runs(runs: Path, old_runs: Path):
    doc = report_json(runs / "softmax-seed0", old_runs / "softmax-seed1")
    cell = rows(doc)["msp"]["selective"]["in_distribution"]["aurc"]
    assert cell["n"] == 1 and cell["mean"] == pytest.approx(0.04)


def test_a_selective_value_of_the_wrong_type_names_the_key(runs: Path):
    path = runs / "softmax-seed0" / "metrics.json"
    m = json.loads(path.read_text())
    m["detectors"]["msp"]["selective"]["with_ood"]["near1"]["aurc"] = "low"
    path.write_text(json.dumps(m))
    res = invoke(runs, "--no-write")
    assert res.exit_code == 2
    assert "detectors.msp.selective.with_ood.near1.aurc" in " ".join(res.output.split())
