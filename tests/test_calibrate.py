"""Temperature scaling: lowers NLL/ECE of an over-confident model, reports a bound, fits on the
validation split of a run, and the calibrated temperature reaches the detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from oodbench.calibrate import fit_temperature
from oodbench.cli import app
from oodbench.errors import OodbenchError
from oodbench.metrics import ece, nll


def overconfident(n: int = 2000, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a ~70 %-accurate classifier, multiplied by 8: right often, sure always."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += 1.8
    return 8.0 * logits, labels


def test_calibration_lowers_nll_of_an_overconfident_model() -> None:
    logits, labels = overconfident()
    res = fit_temperature(logits, labels)
    assert res["temperature"] > 4.0
    assert res["after"]["nll"] < 0.5 * res["before"]["nll"]
    assert res["after"]["ece"] < res["before"]["ece"]
    assert res["after"]["accuracy"] == res["before"]["accuracy"]  # T never changes argmax
    assert not res["at_bound"] and res["bound"] is None
    # a true minimum: nudging T either way does not help
    t = res["temperature"]
    assert nll(logits, labels, t) <= min(nll(logits, labels, t * 1.01),
                                         nll(logits, labels, t / 1.01)) + 1e-9


def test_ece_objective() -> None:
    logits, labels = overconfident(seed=1)
    res = fit_temperature(logits, labels, "ece")
    assert res["objective"] == "ece"
    assert res["after"]["ece"] < 0.3 * res["before"]["ece"]
    assert res["objective_after"] == pytest.approx(ece(logits, labels, res["temperature"]))


def test_stopping_at_a_bound_is_reported() -> None:
    labels = torch.arange(10).repeat(5)
    logits = 1e-3 * torch.nn.functional.one_hot(labels, 10).float()  # always right, never sure
    res = fit_temperature(logits, labels)
    assert res["at_bound"] and res["bound"] == "lower"
    with pytest.raises(OodbenchError):
        fit_temperature(logits, labels, "brier")


@pytest.mark.slow
def test_calibrate_command_uses_validation_split_and_score_uses_temperature(tmp_path) -> None:
    from oodbench.io import read_json
    from oodbench.runs import Run

    runner = CliRunner()
    run_dir = tmp_path / "run"
    r = runner.invoke(app, ["train", "--benchmark", "digits", "--loss", "softmax", "--epochs",
                            "1", "--run-dir", str(run_dir), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["calibrate", str(run_dir), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "before" in r.output and "after" in r.output and "NLL" in r.output
    from oodbench.data import DataContext
    from oodbench.experiment import load_in_distribution

    run = Run.open(run_dir)
    cal = run.calibration()
    val = load_in_distribution(run.config(), "val", DataContext.resolve())
    test = load_in_distribution(run.config(), "test", DataContext.resolve())
    assert cal["split"] == "val" and cal["n"] == len(val) != len(test)
    r = runner.invoke(app, ["score", str(run_dir), "--calibrated", "-d", "msp", "--device",
                            "cpu"])
    assert r.exit_code == 0, r.output
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["detectors"]["msp"]["temperature"] == pytest.approx(cal["temperature"])


def test_a_plateau_reaching_the_bound_is_reported() -> None:
    """A perfectly separated split with large margins: NLL is exactly 0 in float64 for every T
    below about 0.5, so the optimiser may stop anywhere on that plateau, not at the bound."""
    labels = torch.arange(10).repeat(5)
    logits = 20.0 * torch.nn.functional.one_hot(labels, 10).float()
    nll = torch.nn.functional.cross_entropy(logits.double() / 0.01, labels).item()
    assert nll == 0.0  # the plateau this test is about (independent of the code under test)
    res = fit_temperature(logits, labels)
    assert res["at_bound"] and res["bound"] == "lower"
    # every sample right: no temperature is identifiable, T = 1 is kept, after == before
    assert res["fitted"] is False and res["temperature"] == 1.0
    assert res["after"] == res["before"]
    assert res["objective_after"] == res["objective_before"] > 0


def test_one_error_makes_the_temperature_identifiable() -> None:
    """The same split with one sample wrong: NLL now has an interior minimum (too small a T
    blows up the wrong sample's loss), so a temperature is fitted, below 1 (over-separated)."""
    labels = torch.arange(10).repeat(5)
    logits = 20.0 * torch.nn.functional.one_hot(labels, 10).float()
    logits[0] = 20.0 * torch.nn.functional.one_hot(torch.tensor(1), 10).float()
    res = fit_temperature(logits, labels)
    assert res["fitted"] is True and not res["at_bound"]
    ts = np.exp(np.linspace(np.log(0.01), np.log(100), 4001))
    want = ts[np.argmin([torch.nn.functional.cross_entropy(logits.double() / t, labels).item()
                         for t in ts])]
    assert res["temperature"] == pytest.approx(want, rel=0.01)


def test_an_unfitted_temperature_is_warned_as_such() -> None:
    from oodbench.workflow import calibration_warnings

    labels = torch.arange(10).repeat(5)
    res = fit_temperature(20.0 * torch.nn.functional.one_hot(labels, 10).float(), labels)
    (w,) = calibration_warnings({**res, "n": 50})
    assert "(50 images) is classified without error" in w and "T = 1 kept" in w
    assert "stopped at" not in w  # not the generic bound warning: T did not stop anywhere
