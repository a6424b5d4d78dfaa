"""The losses that compete with DisMax: LogitNorm, T2FNorm, Outlier Exposure and energy-
regularised training. Each against its formula computed here in numpy; T2FNorm's train / eval
switch; the auxiliary outlier set (config, disjointness by content, training from the CLI, and a
bit-identical resume with outliers on CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.config import BenchmarkConfig, OutlierSet, RunConfig, load_benchmark
from oodbench.data import DataContext, get_dataset
from oodbench.errors import OodbenchError
from oodbench.experiment import load_outliers
from oodbench.losses import LOSSES
from oodbench.losses.logitnorm import LogitNormLoss
from oodbench.losses.outliers import EnergyRegularisedLoss, OutlierExposureLoss
from oodbench.losses.t2fnorm import T2FNormHead, T2FNormLoss
from oodbench.runs import Run
from oodbench.train import clean_rows, train

REPO = Path(__file__).resolve().parent.parent
LOGITS = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-2.0, 4.0, 1.0], [1.0, 1.0, -3.0]])
TARGETS = np.array([0, 2, 1, 0])


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def _np_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-_np_log_softmax(z)[np.arange(len(y)), y].mean())


def _np_energy(z: np.ndarray) -> np.ndarray:
    return -np.log(np.exp(z).sum(axis=1))


def test_logitnorm_is_cross_entropy_of_normalised_logits() -> None:
    for tau in (0.04, 0.5):
        norms = np.sqrt((LOGITS ** 2).sum(axis=1, keepdims=True)) + 1e-7
        expected = _np_ce(LOGITS / (tau * norms), TARGETS)
        got = LogitNormLoss(tau=tau)(torch.tensor(LOGITS), torch.tensor(TARGETS))
        assert got.item() == pytest.approx(expected, rel=1e-9)
    # scale-invariant: the loss sees the logits' direction only
    x = torch.tensor(LOGITS)
    assert LogitNormLoss()(7 * x, torch.tensor(TARGETS)).item() == pytest.approx(
        LogitNormLoss()(x, torch.tensor(TARGETS)).item(), rel=1e-9)
    assert LOSSES.get("logitnorm").head is torch.nn.Linear


def test_t2fnorm_head_normalises_in_train_mode_only() -> None:
    head = T2FNormHead(3, 2)
    w = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    b = np.array([0.25, -1.0])
    with torch.no_grad():
        head.weight.copy_(torch.tensor(w, dtype=torch.float32))
        head.bias.copy_(torch.tensor(b, dtype=torch.float32))
    h = np.array([[3.0, 4.0, 0.0], [1.0, -1.0, 2.0]])
    normalised = h / np.sqrt((h ** 2).sum(axis=1, keepdims=True)) / 0.1
    head.train()
    train_logits = head(torch.tensor(h, dtype=torch.float32)).detach().double().numpy()
    assert np.allclose(train_logits, normalised @ w.T + b, rtol=1e-6)
    head.eval()
    eval_logits = head(torch.tensor(h, dtype=torch.float32)).detach().double().numpy()
    assert np.allclose(eval_logits, h @ w.T + b, rtol=1e-6)  # raw features at inference
    y = np.array([1, 0])
    assert T2FNormLoss()(torch.tensor(train_logits), torch.tensor(y)).item() == pytest.approx(
        _np_ce(train_logits, y), rel=1e-9)


def test_t2fnorm_model_follows_train_and_eval() -> None:
    from oodbench.experiment import build_model

    model = build_model(RunConfig(load_benchmark("digits"), "t2fnorm", 0))
    assert isinstance(model.head, T2FNormHead)
    x = torch.randn(4, 1, 8, 8)
    model.train()
    out = model.forward_all(x)
    feats = out.features.detach()
    expected = torch.nn.functional.linear(feats / feats.norm(dim=1, keepdim=True) / 0.1,
                                          model.head.weight, model.head.bias)
    assert torch.allclose(out.logits, expected, atol=1e-4)
    model.eval()
    out = model.forward_all(x)
    assert torch.allclose(out.logits, out.features @ model.head.weight.T + model.head.bias,
                          atol=1e-5)


def _with_outliers() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """4 in-distribution rows (LOGITS) and 2 outlier rows (target -1)."""
    out = np.array([[0.5, 0.0, -0.5], [3.0, -1.0, 2.0]])
    logits = torch.tensor(np.concatenate([LOGITS, out]))
    targets = torch.tensor(np.concatenate([TARGETS, [-1, -1]]))
    return logits, targets, out, LOGITS


def test_outlier_exposure_formula() -> None:
    logits, targets, out, ind = _with_outliers()
    to_uniform = -_np_log_softmax(out).mean(axis=1).mean()  # CE to the uniform distribution
    for lam in (0.5, 2.0):
        expected = _np_ce(ind, TARGETS) + lam * to_uniform
        assert OutlierExposureLoss(weight=lam)(logits, targets).item() == pytest.approx(
            expected, rel=1e-9)
    # without outlier rows it is plain cross-entropy
    assert OutlierExposureLoss()(torch.tensor(ind), torch.tensor(TARGETS)).item() == \
        pytest.approx(_np_ce(ind, TARGETS), rel=1e-9)


def test_energy_regularised_formula() -> None:
    logits, targets, out, ind = _with_outliers()
    for lam, m_in, m_out in ((0.1, -25.0, -7.0), (1.0, -2.0, -1.0)):
        e_in, e_out = _np_energy(ind), _np_energy(out)
        hinge = ((np.maximum(0, e_in - m_in) ** 2).mean()
                 + (np.maximum(0, m_out - e_out) ** 2).mean())
        expected = _np_ce(ind, TARGETS) + lam * hinge
        crit = EnergyRegularisedLoss(weight=lam, m_in=m_in, m_out=m_out)
        assert crit(logits, targets).item() == pytest.approx(expected, rel=1e-9)
    crit = EnergyRegularisedLoss()
    assert (crit.weight, crit.m_in, crit.m_out) == (0.1, -25.0, -7.0)
    assert crit.needs_outliers and OutlierExposureLoss.needs_outliers
    assert not LOSSES.get("softmax").criterion.needs_outliers


def test_outlier_rows_do_not_count_for_accuracy() -> None:
    assert clean_rows(torch.tensor([3, 0, -1, -1])).tolist() == [True, True, False, False]


def test_outliers_config_forms_and_checks(tmp_path: Path) -> None:
    raw = load_benchmark("digits").to_dict()
    bench = BenchmarkConfig.from_dict({**raw, "outliers": "blobs"})
    assert bench.outliers == OutlierSet("blobs", "train", False, 1.0)
    again = BenchmarkConfig.from_dict(bench.to_dict())  # round trip
    assert again.outliers == bench.outliers
    assert BenchmarkConfig.from_dict({**raw, "outliers": None}).outliers is None
    for bad, where in (({"dataset": "blobs", "ratio": 0}, "outliers.ratio"),
                       ({"dataset": "blobs", "adapt": "yes"}, "outliers.adapt"),
                       ({"dataset": "blobs", "nosuch": 1}, "outliers.nosuch"),
                       ({"split": "train"}, "outliers.dataset"), (3, "outliers")):
        with pytest.raises(OodbenchError, match=where.replace(".", r"\.")):
            BenchmarkConfig.from_dict({**raw, "outliers": bad})


def test_blobs_are_shaped_like_the_model_and_splits_differ() -> None:
    ctx = DataContext.resolve()
    like = get_dataset("mnist").info_for()
    a = get_dataset("blobs").load("train", ctx, like=like)
    b = get_dataset("blobs").load("test", ctx, like=like)
    assert a.shape == (1, 28, 28) and len(a) == 5000
    assert not torch.equal(a.images[:1000], b.images)
    assert torch.equal(a.images, get_dataset("blobs").load("train", ctx, like=like).images)


@pytest.mark.parametrize("outliers,clash", [
    ({"dataset": "gaussian", "split": "test"}, "OOD test set 'gaussian'"),
    ({"dataset": "patches", "split": "test"}, "OOD test set 'patches'"),
    ({"dataset": "digits", "split": "test"}, "in-distribution test split"),
    ({"dataset": "digits", "split": "train"}, "in-distribution train split"),
])
def test_outliers_overlapping_a_test_set_are_refused(outliers, clash) -> None:
    bench = BenchmarkConfig.from_dict({**load_benchmark("digits").to_dict(),
                                       "outliers": outliers})
    for loss in ("oe", "energy-ft"):
        with pytest.raises(OodbenchError, match=clash) as e:
            load_outliers(RunConfig(bench, loss, 0), DataContext.resolve())
        assert re.search(r"shares [1-9]\d* image\(s\)", e.value.message)


def test_gaussian_val_split_is_content_disjoint_from_its_test_split() -> None:
    """The check is by content: another split of a test set's dataset passes it (whether that
    is a good auxiliary set is the benchmark author's call; the shipped ones use blobs)."""
    bench = BenchmarkConfig.from_dict({**load_benchmark("digits").to_dict(),
                                       "outliers": {"dataset": "gaussian", "split": "val"}})
    data = load_outliers(RunConfig(bench, "oe", 0), DataContext.resolve())
    assert len(data) == 1000 and (data.labels == -1).all()


def test_a_benchmark_without_outliers_is_refused_for_oe(tmp_path: Path) -> None:
    cfg = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
    del cfg["outliers"]
    cfg["name"] = "no-outliers"
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["train", "--benchmark", str(path), "--loss", "oe",
                                 "--epochs", "1", "--run-dir", str(tmp_path / "r"),
                                 "--device", "cpu"])
    assert r.exit_code == 2 and "names none" in r.output, r.output


def test_cli_refuses_overlapping_outliers_before_training(tmp_path: Path) -> None:
    cfg = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
    cfg["outliers"] = {"dataset": "uniform", "split": "test"}
    cfg["name"] = "leaky"
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["train", "--benchmark", str(path), "--loss", "energy-ft",
                                 "--epochs", "1", "--run-dir", str(tmp_path / "r"),
                                 "--device", "cpu"])
    assert r.exit_code == 2 and "uniform" in r.output and "shares" in r.output, r.output
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["logitnorm", "t2fnorm", "oe", "energy-ft"])
def test_cli_trains_each_new_loss_on_digits(tmp_path: Path, loss: str) -> None:
    run_dir = tmp_path / loss
    args = ["train", "--benchmark", "digits", "--loss", loss, "--epochs", "1", "--run-dir",
            str(run_dir), "--device", "cpu"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    run = Run.open(run_dir)
    assert run.is_trained()
    history = run.require_checkpoint()["history"]
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    manifest = yaml.safe_load(run.manifest_path.read_text())
    assert ("outliers" in manifest["data"]) == (loss in ("oe", "energy-ft"))


def _oe_cfg() -> RunConfig:
    bench = load_benchmark("digits-near")  # 5 classes: 535 training images, 8 steps of 64
    bench.outliers = OutlierSet("blobs", ratio=0.5)
    bench.train.epochs = 2
    bench.train.batch_size = 64
    bench.train.checkpoint_seconds = 0.0
    return RunConfig(bench, "oe", 3)


@pytest.mark.slow
def test_oe_resume_after_interruption_gives_identical_weights(tmp_path: Path) -> None:
    """The outlier draw and its augmentation replay exactly after a resume (CPU)."""
    ctx, cpu = DataContext.resolve(), torch.device("cpu")
    cfg = _oe_cfg()
    full = Run.create(tmp_path / "full", cfg)
    history = train(full, ctx, cpu)
    ctrl_c = Run.create(tmp_path / "ctrl_c", cfg)
    with pytest.raises(KeyboardInterrupt):
        train(ctrl_c, ctx, cpu, stop_after_steps=5)
    resumed = train(ctrl_c, ctx, cpu)

    def kill(steps: int) -> None:
        if steps == 10:
            raise RuntimeError("killed")

    killed = Run.create(tmp_path / "killed", cfg)
    with pytest.raises(RuntimeError, match="killed"):
        train(killed, ctx, cpu, on_step=kill)
    train(killed, ctx, cpu)
    reference = full.require_checkpoint()["model"]
    for other in (ctrl_c, killed):
        weights = other.require_checkpoint()["model"]
        for k, v in reference.items():
            assert torch.equal(weights[k], v), f"{other.path.name}: {k} differs"
    assert [h["loss"] for h in history] == [h["loss"] for h in resumed]
