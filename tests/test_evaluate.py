"""`oodbench.evaluate`: any nn.Module scored from Python, with hooks for features and blocks; the
same metrics as the CLI path for a registered model; the torchvision example as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import oodbench
from oodbench.api import EvaluationReport, to_image_set
from oodbench.cli import app
from oodbench.data import DATASETS, DataContext
from oodbench.errors import OodbenchError
from oodbench.models import HookedClassifier, build_classifier

REPO = Path(__file__).resolve().parent.parent


class Net(nn.Module):
    def __init__(self, linear: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10) if linear else nn.Conv2d(16, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.body(x))
        return self.fc(h.flatten(1)) if isinstance(self.fc, nn.Linear) else self.fc(h).flatten(1)


def digits(split: str):
    return DATASETS.get("digits").load(split, DataContext.resolve())


def data():
    test, train = digits("test"), digits("train")
    g = torch.Generator().manual_seed(0)
    return (test.images, test.labels), (train.images, train.labels), {
        "noise": torch.rand((100, 1, 8, 8), generator=g), "gaussian": "gaussian"}


def test_hooks_read_the_input_of_the_last_linear_and_named_blocks():
    torch.manual_seed(0)
    net = Net().eval()
    hooked = HookedClassifier(net, block_layers=["body.1"])
    x = torch.rand(4, 1, 8, 8)
    out = hooked.check(x)
    assert hooked.head is net.fc and hooked.block_names == ("body.1",)
    expected = net.pool(net.body(x)).flatten(1)
    assert torch.allclose(out.features, expected) and torch.allclose(out.logits, net(x))
    assert out.blocks["body.1"].shape == (4, 8, 8, 8)
    assert not net._forward_hooks and not net.fc._forward_pre_hooks  # hooks removed


def test_feature_layer_override_and_the_errors_that_name_candidates():
    torch.manual_seed(0)
    net = Net(linear=False).eval()
    with pytest.raises(OodbenchError, match="no nn.Linear") as e:
        HookedClassifier(net)
    assert "feature_layer" in str(e.value) and "pool" in str(e.value)
    hooked = HookedClassifier(net, feature_layer="pool")
    out = hooked.check(torch.rand(3, 1, 8, 8))
    assert out.features.shape == (3, 16)
    assert not isinstance(hooked.head, nn.Linear)  # no W, b: detectors needing them say n/a
    with pytest.raises(OodbenchError, match="no module named 'pooll'") as e:
        HookedClassifier(net, feature_layer="pooll")
    assert "pool" in str(e.value)
    with pytest.raises(OodbenchError, match="not N×C×H×W"):
        HookedClassifier(Net().eval(), block_layers=["fc"]).check(torch.rand(2, 1, 8, 8))


def test_a_last_linear_that_does_not_give_the_logits_is_refused():
    class Odd(Net):
        def forward(self, x):
            return super().forward(x) * 2.0

    with pytest.raises(OodbenchError, match="does not produce the logits"):
        HookedClassifier(Odd().eval()).check(torch.rand(2, 1, 8, 8))


def test_evaluate_a_hand_made_model_tables_json_and_gates(tmp_path: Path):
    torch.manual_seed(0)
    net = Net()
    test, train, ood = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = oodbench.evaluate(net, test, ood, train=train,
                              detectors=("msp", "energy", "knn", "vim", "mahalanobis",
                                         "intermediate-msp-max"),
                              block_layers=("body.3",), cache_dir=tmp_path)
    assert any("no mean/std given" in str(w.message) for w in caught)
    assert isinstance(r, EvaluationReport) and net.training  # mode restored
    assert set(r.metrics["detectors"]) == {"msp", "energy", "knn", "vim", "mahalanobis",
                                           "intermediate-msp-max"}
    assert r.metrics["evaluate"]["features"] == "input of fc"
    assert "| external | knn |" in r.tables() and "AUROC" in r.tables()
    assert json.loads(r.to_json())["schema"] == "oodbench.report/2"
    assert r.gate("auroc>=0.0") and r.check(fail_under=["auroc=0.0"]).passed
    failed = r.gate("auroc:noise>=1.0")
    assert not failed and "FAIL auroc:noise >= 1" in str(failed)
    # the result folder is a run folder the CLI reads
    res = CliRunner().invoke(app, ["report", str(r.path.parent), "--format", "markdown",
                                   "--fail-under", "auroc=0.0"])
    assert res.exit_code == 0, res.output
    # a second call hits the cache: no forward pass
    r2 = oodbench.evaluate(net, test, ood, train=train, detectors=("msp", "knn"),
                           block_layers=("body.3",), mean=(0.0,), std=(1.0,), cache_dir=tmp_path)
    assert all("from the cache" in line for line in r2.forward_log)
    assert r2.auroc("knn", "noise") == r.auroc("knn", "noise")


def test_evaluate_errors_are_clear(tmp_path: Path):
    net = Net()
    test, train, ood = data()
    with pytest.raises(OodbenchError, match="(?s)fit statistics.*pass train="):
        oodbench.evaluate(net, test, ood, detectors=("knn",), mean=(0.5,), std=(0.5,),
                          cache_dir=tmp_path)
    with pytest.raises(OodbenchError, match="need block outputs"):
        oodbench.evaluate(net, test, ood, train=train, detectors=("intermediate-msp-max",),
                          mean=(0.5,), std=(0.5,), cache_dir=tmp_path)
    with pytest.raises(OodbenchError, match="already normalised"):
        to_image_set(torch.randn(4, 1, 8, 8), "x", labelled=False)
    with pytest.raises(OodbenchError, match="is 3×8×8 but in_test is 1×8×8"):
        oodbench.evaluate(net, test, {"rgb": torch.rand(5, 3, 8, 8)}, mean=(0.5,), std=(0.5,),
                          cache_dir=tmp_path)


def test_datasets_and_loaders_convert_like_tensors():
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.rand(10, 1, 8, 8)
    y = torch.arange(10) % 3
    a = to_image_set((x, y), "a", labelled=True)
    b = to_image_set(TensorDataset(x, y), "b", labelled=True)
    c = to_image_set(DataLoader(TensorDataset(x, y), batch_size=4), "c", labelled=True)
    assert a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
    assert torch.equal(a.labels, c.labels)
    assert (a.images.float() / 255 - x).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit quantisation


def test_same_auroc_as_the_cli_for_a_registered_model(tmp_path: Path):
    """A smallcnn8 state_dict imported and scored by the CLI, and the same network given to
    evaluate (as the Classifier, and behind hooks as a plain module): the same AUROCs."""
    torch.manual_seed(0)
    model = build_classifier("smallcnn8", nn.Linear, 10, 1, 8)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    runner = CliRunner()
    for args in (["import-checkpoint", tmp_path / "w.pt", "--model", "smallcnn8",
                  "--benchmark", "digits", "--run-dir", tmp_path / "run"],
                 ["score", tmp_path / "run", "--detector", "msp", "--detector", "energy",
                  "--detector", "vim"]):
        res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    cli = json.loads((tmp_path / "run" / "metrics.json").read_text())

    class Plain(nn.Module):  # no forward_all: features come from hooks
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    test, train = digits("test"), digits("train")
    ood = {"patches": "patches", "gaussian": "gaussian", "uniform": "uniform"}
    info = DATASETS.get("digits").info
    for m in (model, Plain(model)):
        r = oodbench.evaluate(m, (test.images, test.labels), ood,
                              train=(train.images, train.labels),
                              detectors=("msp", "energy", "vim"), mean=info.mean, std=info.std,
                              cache_dir=tmp_path / "cache")
        for det in ("msp", "energy", "vim"):
            for o in ood:
                assert r.auroc(det, o) == pytest.approx(
                    cli["detectors"][det]["ood"][o]["auroc"], abs=1e-6), (det, o)
        assert r.metrics["classification"]["uncalibrated"]["accuracy"] == pytest.approx(
            cli["classification"]["uncalibrated"]["accuracy"])


def test_the_torchvision_example_prints_the_auroc_table_and_a_gate():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "examples" / "evaluate_torchvision.py")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "ResNet · AUROC" in r.stdout
    rows = [line for line in r.stdout.splitlines() if line.startswith("| external |")]
    assert {row.split("|")[2].strip() for row in rows} >= {"msp", "energy", "knn", "vim"}
    assert "gate: passed" in r.stdout and "all 2 gate(s) passed" in r.stdout
