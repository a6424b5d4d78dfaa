"""No OOD set, test or validation, may share an image with the in-distribution test split or the
validation split used for calibration and selection: compared by content (per-image hashes), so
`train` refuses before any folder is made and `score` refuses a run whose config slipped past.
Held-out classes of the in-distribution dataset (digits-near's digits 5-9) stay legitimate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, make_digits_run
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.config import RunConfig, load_benchmark
from oodbench.data import DataContext
from oodbench.errors import OodbenchError
from oodbench.experiment import check_benchmark_sets
from oodbench.scoring import build_detectors, load_sets, plan

CPU = torch.device("cpu")
TEST_FIX = "from another dataset or split, or give its entry `classes:` disjoint"
VALIDATION_FIX = "pass another dataset to --ood-validation"


pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def said(output: str) -> str:
    return " ".join(output.split())  # rich wraps long lines


def near_benchmark(tmp_path: Path, near: list[dict] | None = None, **changes) -> Path:
    """oodbench/benchmarks/digits-near.yaml, one epoch, with `near` as its near-OOD entries."""
    raw = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits-near.yaml").read_text())
    raw["train"]["epochs"] = 1
    if near is not None:
        raw["ood"]["near"] = near
    raw.update(changes)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("entry, split", [
    ({"dataset": "digits", "split": "val", "name": "digits-val"}, "val"),
    ({"dataset": "digits", "name": "digits-all"}, "test"),
    ({"dataset": "digits", "classes": [4, 5, 6, 7, 8, 9], "name": "digits-4to9"}, "test"),
])
def test_train_refuses_an_ood_set_sharing_in_distribution_images(tmp_path: Path, entry: dict,
                                                                 split: str) -> None:
    run_dir = tmp_path / "runs" / "r"
    r = invoke("train", "--benchmark", near_benchmark(tmp_path, [entry]), "--loss", "softmax",
               "--run-dir", run_dir)
    assert r.exit_code == 2, r.output
    out = said(r.output)
    assert f"OOD test set '{entry['name']}' shares" in out
    assert f"the in-distribution {split} split (digits)" in out and TEST_FIX in out
    assert "Traceback" not in r.output and not run_dir.exists()


def test_digits_near_held_out_classes_pass(tmp_path: Path) -> None:
    """Held-out classes of the in-distribution dataset share no image with its test or val
    split (classes 0-4): train checks them, and `score` validates on their val split."""
    ctx = DataContext.resolve(tmp_path / "data")
    cfg = RunConfig(load_benchmark("digits-near"), "softmax", 0)
    assert check_benchmark_sets(cfg, ctx) is None
    p = plan(build_detectors(["odin"], None, "ood"), (), ood_validation="digits")
    sets = load_sets(cfg, p, ctx, CPU)
    assert sets.ood_val is not None and sets.ood_val.name == "digits-validation"
    assert len(sets.ood_val.data) == 94  # the val split's digits 5-9, not all ten
    assert sets.val is not None and len(sets.val.data) == 95  # its digits 0-4


def test_the_carved_out_validation_split_is_the_one_checked(tmp_path: Path) -> None:
    """A folder with train/ and test/ only: val is carved out of train (val_fraction), and an
    OOD entry reading train shares those images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 3)):
        for c in ("a", "b"):
            (tmp_path / "id" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                    tmp_path / "id" / split / c / f"{i}.png")
    folder = f"folder:{tmp_path / 'id'}"
    bench = near_benchmark(tmp_path, [{"dataset": folder, "split": "train", "name": "carved"}],
                           in_distribution={"dataset": folder})
    cfg = RunConfig(load_benchmark(str(bench)), "softmax", 0)
    with pytest.raises(OodbenchError) as e:
        check_benchmark_sets(cfg, DataContext.resolve(tmp_path / "data"))
    assert "OOD test set 'carved' shares 2 image(s) with the in-distribution val split" \
        in e.value.message and TEST_FIX in e.value.message


def edit_config(run_dir: Path, edit) -> None:
    path = run_dir / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    edit(raw["benchmark"])
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_score_refuses_a_run_whose_ood_set_is_the_validation_split(tmp_path: Path) -> None:
    run = make_digits_run(tmp_path / "runs" / "r")
    edit_config(run.path, lambda b: b["ood"].append(
        {"dataset": "digits", "group": "near", "name": "digits-val", "split": "val"}))
    r = invoke("score", run.path, "-d", "msp")
    assert r.exit_code == 2, r.output
    out = said(r.output)
    assert "OOD test set 'digits-val' shares 189 image(s) with the in-distribution val split" \
        in out and TEST_FIX in out
    assert not (run.path / "metrics.json").exists()


def test_score_refuses_ood_validation_on_the_in_distribution_validation_split(
        tmp_path: Path) -> None:
    run = make_digits_run(tmp_path / "runs" / "r")
    r = invoke("score", run.path, "-d", "odin", "--selection", "ood", "--ood-validation",
               "digits")
    assert r.exit_code == 2, r.output
    out = said(r.output)
    assert "OOD validation set 'digits-validation' shares 189 image(s) with the " \
        "in-distribution val split (digits)" in out and VALIDATION_FIX in out
    assert not (run.path / "metrics.json").exists()
