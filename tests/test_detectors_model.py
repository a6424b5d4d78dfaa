"""Detectors on a real (tiny) trained digits model, and the scoring pipeline's honesty rules:
no fit / selection sees an OOD sample by default; non-finite scores are reported, not scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodbench.config import RunConfig, load_benchmark
from oodbench.data import DATASETS, DataContext, InputTransform
from oodbench.detectors import DETECTORS, Detector, DetectorInput, create
from oodbench.experiment import build_model, load_in_distribution
from oodbench.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Run:
    """A digits softmax run whose smallcnn8 is trained for a few quick epochs (not via the
    training loop: only the detectors are under test here)."""
    torch.manual_seed(0)
    bench = load_benchmark("digits")
    cfg = RunConfig(bench, "softmax", 0, {})
    run = Run.create(tmp_path_factory.mktemp("runs") / "r", cfg)
    ctx = DataContext.resolve(tmp_path_factory.mktemp("data"))
    train = load_in_distribution(cfg, "train", ctx)
    tf = InputTransform.for_model(train.info)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_all, y_all = tf(train.images), train.labels
    model.train()
    for _ in range(3):
        perm = torch.randperm(len(y_all))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            opt.step()
    model.eval()
    torch.save({"model": model.state_dict(), "finished": True}, run.checkpoint_path)
    return run


def _input(run: Run, dataset: str, split: str = "test") -> DetectorInput:
    cfg = run.config()
    ctx = DataContext.resolve("unused")
    model = build_model(cfg)
    model.load_state_dict(torch.load(run.checkpoint_path, weights_only=True)["model"])
    model.eval()
    like = DATASETS.get("digits").info_for()
    data = (load_in_distribution(cfg, split, ctx) if dataset == "digits"
            else DATASETS.get(dataset).load("test", ctx, like=like))
    return DetectorInput(data.name, None, data.labels, model=model, images=data,
                         transform=InputTransform.for_model(like), device=torch.device("cpu"))


def _odin_gain(data: DetectorInput, temperature: float, epsilon: float) -> float:
    base = create("odin", T=temperature, epsilon=0.0)(data)
    return float(np.mean(create("odin", T=temperature, epsilon=epsilon)(data) - base))


def test_odin_preprocessing_raises_the_in_distribution_msp(digits_run):
    data = _input(digits_run, "digits")
    assert _odin_gain(data, 1000.0, 0.0014) > 0  # the paper's defaults
    assert _odin_gain(data, 1.0, 0.01) > 0
    # the exact step (sign and per-channel std) is checked by hand in test_detector_gradients


@pytest.mark.xfail(strict=True, reason=(
    "measured on this tiny digits CNN: ODIN's step raises the MSP of 8×8 noise MORE than that of "
    "digits (mean gain at T=1, ε=0.01: digits 0.015, gaussian 0.085; at T=1000, ε=0.0014: "
    "5.8e-6 vs 6.1e-6; on the default 30-epoch SGD digits model too: 1.1e-5 vs 1.5e-5), so the "
    "paper's observation does not carry over to 8×8 digits; it does hold on the pretrained "
    "CIFAR ResNet-20 (next test). Strict, so it is noticed if it starts to hold"))
def test_odin_raises_msp_more_on_in_distribution_than_on_noise(digits_run):
    gains = {n: _odin_gain(_input(digits_run, n), 1.0, 0.01) for n in ("digits", "gaussian")}
    assert gains["digits"] > gains["gaussian"], gains


def test_odin_raises_msp_more_on_in_distribution_than_on_noise_on_pretrained_resnet20(
        real_data):
    """The ODIN paper's observation, at its defaults (T=1000, ε=0.0014), on a real network:
    measured here 4.8e-4 (CIFAR-10 JPEG) vs 1.2e-4 (Gaussian noise), 300 samples each."""
    from oodbench.data import get_dataset
    from oodbench.models import build_classifier
    from oodbench.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, read_foreign_checkpoint

    ckpts = sorted((real_data / "models" / "akamaster-resnet-cifar10").glob("resnet20-*.th"))
    if not ckpts or not (real_data / "cifar10-jpeg").is_dir():
        pytest.skip("needs the akamaster ResNet-20 and cifar10-jpeg in the real-data folder")
    _, state, _ = read_foreign_checkpoint(ckpts[0])
    model = build_classifier("resnet20", torch.nn.Linear, 10, 3, 32)
    model.load_state_dict(state, strict=True)
    model.eval()
    ctx = DataContext.resolve(real_data)
    cifar = get_dataset("cifar10-jpeg").load("test", ctx)
    tf = InputTransform(tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    gains = {}
    for data in (cifar, get_dataset("gaussian").load("test", ctx, like=cifar.info)):
        data = data.subset(torch.arange(300))
        inp = DetectorInput(data.name, None, data.labels, model=model, images=data,
                            transform=tf, device=torch.device("cpu"))
        gains[data.name] = _odin_gain(inp, 1000.0, 0.0014)
    assert gains["cifar10-jpeg"] > 2 * gains["gaussian"] > 0, gains


def test_odin_fgsm_selection_uses_no_ood_data_and_records_its_choice(digits_run):
    val = _input(digits_run, "digits", "val")
    det = create("odin", selection="fgsm", T_grid=[1.0, 1000.0], eps_grid=[0.0, 0.0014])
    det.select(val)
    assert det.selection["mode"] == "fgsm"
    assert det.selection["negatives"] == "fgsm(digits)"
    assert set(det.selection["table"]) == {str((t, e)) for t in (1.0, 1000.0)
                                           for e in (0.0, 0.0014)}
    assert (det.params["T"], det.params["epsilon"]) == tuple(det.selection["chosen"].values())


class _NaNOnNoise(Detector):
    summary = "test detector: NaN on two uniform-noise samples"

    def score(self, data: DetectorInput) -> np.ndarray:
        s = data.logits.double().max(dim=1).values.numpy().copy()
        if data.name == "uniform":
            s[:2] = np.nan
        return s


def test_nonfinite_scores_are_reported_with_count_and_detector(digits_run, monkeypatch):
    from oodbench.pipeline import score_run

    # registered for this test only (the registry is global; other tests list its names)
    monkeypatch.setattr(DETECTORS, "_members", dict(DETECTORS._members))
    DETECTORS.register("test-nan")(_NaNOnNoise)
    m = score_run(digits_run, DataContext.resolve("unused"), torch.device("cpu"),
                  ["test-nan", "maxlogit"])
    r = m["detectors"]["test-nan"]
    assert r["nonfinite"] == {"uniform": 2}
    assert "uniform" not in r["ood"] and "patches" in r["ood"]  # no metric from NaN scores
    assert "nonfinite" not in m["detectors"]["maxlogit"]
    np.testing.assert_allclose(r["ood"]["patches"]["auroc"],
                               m["detectors"]["maxlogit"]["ood"]["patches"]["auroc"])
    assert Path(digits_run.scores_dir / "test-nan" / "uniform.npy").exists()
