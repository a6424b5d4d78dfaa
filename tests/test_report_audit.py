"""Report defects found by an audit: compare rows it cannot pair, seed counts in captions,
rich markup in captions, --ood typos, wrong paths and --output, stale metrics.json."""

import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from test_report import invoke, write_run
from test_report import report_json as report

from oodbench.render import TableModel, to_rich

WEIGHTS = "ab" * 32  # what write_run puts in metrics.json


def edit(run: Path, change) -> None:
    path = run / "metrics.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def calibrated_msp(m: dict[str, Any]) -> None:
    m["detectors"]["msp"].update(calibrated=True, temperature=1.5)


def uncalibrated(m: dict[str, Any]) -> None:
    """A seed scored before it was calibrated: no calibration, no calibrated figures."""
    m["calibration"] = None
    del m["classification"]["calibrated"]


def two_sides(tmp_path: Path) -> tuple[Path, Path]:
    """A: softmax seeds 0-2, seed 1's msp scored calibrated; B: the same, all msp plain;
    both: dismax seeds 0-1."""
    sides = tmp_path / "a", tmp_path / "b"
    for side in sides:
        for seed in (0, 1, 2):
            run = write_run(side, "softmax", seed, 1.0)
            if side.name == "a" and seed == 1:
                edit(run, calibrated_msp)
        for seed in (0, 1):
            write_run(side, "dismax", seed, 3.0)
    return sides


def caption(markdown: str, title_part: str) -> str:
    """The caption line (`_..._`) under the first table whose title has `title_part`."""
    lines = markdown.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("### ") and title_part in x)
    return next(x for x in lines[start:] if x.startswith("_"))


def compare_markdown(a: Path, b: Path, detector: str):
    """`report --compare A B` of one detector's AUROC as Markdown, checked to exit 0."""
    res = invoke("--compare", a, b, "--metric", "auroc", "-d", detector, "-f", "markdown",
                 "--no-write")
    assert res.exit_code == 0, res.output
    return res


def test_compare_names_the_rows_it_cannot_pair(tmp_path: Path):
    a, b = two_sides(tmp_path)
    res = compare_markdown(a, b, "msp")
    # the only row shown is dismax msp, of seeds 0 and 1 on both sides (not the groups' 0-2)
    assert caption(res.stdout, "AUROC") == (
        f"_A: 2 seeds [0, 1], B: 2 seeds [0, 1]; not compared (no row of that name on the other "
        f"side): only {a} has softmax msp [calibrated], softmax msp [uncalibrated]; only {b} "
        "has softmax msp_")
    doc = json.loads(invoke("--compare", a, b, "--metric", "auroc", "-d", "msp", "-f", "json",
                            "--no-write").stdout)
    g = doc["groups"][0]
    assert g["unpaired"] == {"a": ["softmax msp [calibrated]", "softmax msp [uncalibrated]"],
                             "b": ["softmax msp"]}
    assert g["seeds"] == {"a": [0, 1], "b": [0, 1]}
    assert any("rows not compared" in w and "softmax msp [calibrated]" in w
               for w in doc["warnings"])


def test_compare_caption_gives_each_loss_its_seeds(tmp_path: Path):
    a, b = two_sides(tmp_path)
    res = compare_markdown(a, b, "mmles")
    assert caption(res.stdout, "AUROC") == (
        "_A: 2 seeds [0, 1] (dismax), 3 seeds [0, 1, 2] (softmax); "
        "B: 2 seeds [0, 1] (dismax), 3 seeds [0, 1, 2] (softmax)_")


def test_classification_caption_names_columns_over_fewer_seeds(tmp_path: Path):
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        run = write_run(root, "softmax", seed, 1.0)
        edit(run, lambda m, seed=seed: m["classification"].update(selective_msp={
            "uncalibrated": {"aurc": 0.1}, **({"calibrated": {"aurc": 0.2}} if seed == 1 else {})}))
        if seed != 1:
            edit(run, uncalibrated)
    res = invoke(root, "--metric", "auroc", "--metric", "aurc", "-f", "markdown", "--no-write")
    assert res.exit_code == 0, res.output
    assert caption(res.stdout, "classification") == (
        "_mean ± std over 3 seeds [0, 1, 2]; softmax: ECE calibrated, NLL calibrated, T over 1 "
        "of its 3 seeds_")
    # the MSP baseline at the fitted temperature: seed 1's AURC alone
    assert "| softmax | MSP baseline (T = 1) | **10.0 ± 0.0** |" in res.stdout  # best AURC
    assert "| softmax | MSP baseline (calibrated T; 1 of 3 seeds) | 20.0 |" in res.stdout


def test_rich_keeps_brackets_in_titles_and_captions():
    t = TableModel("toy · msp [calibrated]", ["detector [x]"],
                   caption="softmax msp [calibrated]: 1 seed [1]")
    t.add(["msp [calibrated]"])
    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None)
    for table in to_rich([t]):
        console.print(table)
    text = " ".join(buf.getvalue().split())  # title and caption wrap to the table's width
    assert "toy · msp [calibrated]" in text
    assert "softmax msp [calibrated]: 1 seed [1]" in text
    assert "detector [x]" in text


def test_an_unknown_ood_set_is_an_error_naming_the_sets(tmp_path: Path):
    root = tmp_path / "runs"
    write_run(root, "softmax", 0, 1.0)
    res = invoke(root, "--ood", "bogus", "--no-write")
    assert res.exit_code == 2
    assert "'bogus'" in res.output and "near1, gaussian" in res.output


def test_a_file_that_is_not_metrics_is_named_as_such(tmp_path: Path):
    run = write_run(tmp_path / "runs", "softmax", 0, 1.0)
    (run / "config.yaml").write_text("loss: softmax\n")
    res = invoke(run / "config.yaml", "--no-write")
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "does not exist" not in text and "is not a metrics file" in text


def test_output_that_is_a_file_is_an_error(tmp_path: Path):
    run = write_run(tmp_path / "runs", "softmax", 0, 1.0)
    afile = tmp_path / "afile"
    afile.write_text("")
    res = invoke(run, "--output", afile)
    assert res.exit_code == 2
    assert "is a file, not a folder" in " ".join(res.output.split())
    assert afile.read_text() == ""
    res = invoke(run, "--no-write", "--plots", afile)
    assert res.exit_code == 2
    assert "--plots" in res.output and "is a file, not a folder" in " ".join(res.output.split())


def stale_warnings(run: Path) -> list[str]:
    return [w for w in report(run)["warnings"] if "out of date" in w]


def test_metrics_scored_with_another_calibration_warn(tmp_path: Path):
    run = write_run(tmp_path / "runs", "softmax", 0, 1.0)  # scored with temperature 1.5
    calibration = run / "calibration.json"
    calibration.write_text(json.dumps({"temperature": 1.5, "weights": WEIGHTS}))
    assert stale_warnings(run) == []  # the calibration it was scored with
    calibration.write_text(json.dumps({"temperature": 1.7, "weights": WEIGHTS}))
    assert stale_warnings(run) == [
        f"{run / 'metrics.json'} is out of date: it was scored with the fitted temperature 1.5 "
        "(calibrated figures, --calibrated detectors); its calibration.json now holds 1.7; run "
        f"`oodbench score {run}` again"]


def test_metrics_on_other_weights_or_before_calibration_warn(tmp_path: Path):
    run = write_run(tmp_path / "runs", "softmax", 0, 1.0)
    (run / "calibration.json").write_text(json.dumps({"temperature": 1.5, "weights": "cd" * 32}))
    [w] = stale_warnings(run)
    assert "fitted on other weights" in w
    assert w.endswith(f"run `oodbench calibrate {run}`, then `oodbench score {run}`")
    (run / "calibration.json").write_text(json.dumps({"temperature": 1.5, "weights": WEIGHTS}))
    edit(run, uncalibrated)
    [w] = stale_warnings(run)
    assert "scored before its calibration.json was written" in w
    assert w.endswith(f"run `oodbench score {run}` again")
