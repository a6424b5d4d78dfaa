"""Generic grid selection on cached outputs (base.Detector.select) and the oracle mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodbench.detectors import DETECTORS, DetectorInput, create
from oodbench.detectors import gradients as grads
from oodbench.detectors.base import GRID_SELECTION_MODES, ORACLE_MODE
from oodbench.errors import OodbenchError

# Train activations 1..100: the p-th percentile is 1 + 0.99 p, i.e. the ReAct grid
# [80, 85, 90, 95, 99] clips at 80.2, 85.15, 90.1, 95.05, 99.01.
TRAIN = np.arange(1.0, 101.0).reshape(25, 4)
W = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def _inp(first_unit: list[float], name: str, model=None) -> DetectorInput:
    f = torch.zeros(len(first_unit), 4, dtype=torch.float64)
    f[:, 0] = torch.tensor(first_unit)
    return DetectorInput(name, f @ torch.tensor(W).T, torch.zeros(len(f), dtype=torch.long),
                         features=f, head=(torch.tensor(W), torch.zeros(3)), model=model)


def _train() -> DetectorInput:
    f = torch.tensor(TRAIN)
    return DetectorInput("train", f @ torch.tensor(W).T, torch.zeros(25, dtype=torch.long),
                         features=f, head=(torch.tensor(W), torch.zeros(3)))


# In-distribution first unit = 92, negatives = 86 and 200. Only the clip at 90.1 separates
# them (92 and 200 both clip to 90.1: a tie; 86 stays below): AUROC 0.75; every other grid
# point gives 0.5 (all tied at 80.2 / 85.15, or 86 < 92 < 200 unclipped at 95.05 / 99.01).
VAL, NEG = [92.0, 92.0], [86.0, 200.0]


def test_the_only_separating_percentile_is_chosen() -> None:
    det = create("react", selection="ood")
    det.fit(_train())
    det.select(_inp(VAL, "val"), _inp(NEG, "ood-val"))
    assert det.selected == {"percentile": 90.0}
    assert det.params["percentile"] == 90.0
    assert det.given == {"selection": "ood"}  # the user's values are untouched
    sel = det.selection
    assert sel["mode"] == "ood" and sel["criterion"] == "AUROC" and sel["oracle"] is False
    assert sel["validation"] == "val" and sel["negatives"] == "ood-val"
    assert sel["chosen"] == {"percentile": 90.0}
    assert sel["table"] == pytest.approx({"percentile=80": 0.5, "percentile=85": 0.5,
                                          "percentile=90": 0.75, "percentile=95": 0.5,
                                          "percentile=99": 0.5})


def test_a_given_grid_hyperparameter_is_held_fixed() -> None:
    det = create("react", selection="ood", percentile=95)
    det.fit(_train())
    det.select(_inp(VAL, "val"), _inp(NEG, "ood-val"))
    assert det.given == {"selection": "ood", "percentile": 95.0}
    assert det.selected == {"percentile": 95.0} and list(det.selection["table"]) == [
        "percentile=95"]


SHAPING = sorted(n for n, c in DETECTORS.items()
                 if c.grid and c.__module__ == "oodbench.detectors.shaping")


@pytest.mark.parametrize("name", SHAPING)
def test_the_table_has_one_entry_per_grid_point(name: str) -> None:
    cls = DETECTORS.get(name)
    det = create(name, selection="ood")
    rng = np.random.default_rng(0)
    train = _train()
    if det.requires_fit:
        det.fit(train)
    val = _inp(list(rng.uniform(1, 100, 8)), "val")
    neg = _inp(list(rng.uniform(1, 100, 8)), "neg")
    det.select(val, neg)
    n_points = int(np.prod([len(v) for v in cls.grid.values()]))
    assert len(det.selection["table"]) == n_points, name
    assert set(det.selected) == set(cls.grid), name
    assert det.given == {"selection": "ood"}


def test_id_mode_is_refused_for_grid_detectors() -> None:
    """The mean in-distribution score ranks ReAct's clips by scale: energy grows with the
    clip, so the largest percentile would always win, whatever detects best."""
    with pytest.raises(OodbenchError, match="selection must be one of 'none', 'fgsm', 'ood'"):
        create("react", selection="id")


def test_fgsm_negatives_are_computed_once_for_the_whole_grid(monkeypatch) -> None:
    calls = []

    def standin(val, taps=()):
        calls.append(val.name)
        return _inp(NEG, f"fgsm({val.name})")

    monkeypatch.setattr(grads, "fgsm_standin", standin)
    det = create("bfact", selection="fgsm")  # 5 × 4 grid points
    assert "grad" in det.needs  # the stand-in runs the model (once)
    det.fit(_train())
    det.select(_inp(VAL, "val"))
    assert calls == ["val"] and len(det.selection["table"]) == 20
    assert det.selection["negatives"] == "fgsm(val)"


def test_no_forward_pass_per_grid_point() -> None:
    class Boom:
        def __call__(self, *a, **k):
            raise AssertionError("the model was run")

        forward_all = __call__

    det = create("vra", selection="ood")
    det.fit(_train())
    det.select(_inp(VAL, "val", model=Boom()), _inp(NEG, "neg", model=Boom()))
    assert len(det.selection["table"]) == 16


def test_ood_mode_without_an_ood_set_is_refused() -> None:
    det = create("react", selection="ood")
    det.fit(_train())
    with pytest.raises(OodbenchError, match="OOD validation set"):
        det.select(_inp(VAL, "val"))


# ------------------------------------------------------------------------------------ oracle
def test_oracle_is_not_a_default_mode_and_needs_to_be_asked_for() -> None:
    assert ORACLE_MODE not in GRID_SELECTION_MODES
    for name, cls in DETECTORS.items():
        assert ORACLE_MODE not in cls.selection_modes, name
        if "selection" in cls.hparams:
            assert ORACLE_MODE not in cls.hparams["selection"].choices, name
    with pytest.raises(OodbenchError, match="--oracle"):
        create("react", selection="oracle")
    with pytest.raises(OodbenchError, match="no grid selection"):
        create("odin", oracle=True, selection="oracle")


def test_oracle_selects_on_the_test_set_and_says_so() -> None:
    det = create("react", oracle=True, selection="oracle")
    assert det.wants_ood_data
    det.fit(_train())
    det.select(_inp(VAL, "val"), _inp(NEG, "svhn-test"))
    assert det.selected == {"percentile": 90.0}
    assert det.selection["oracle"] is True and det.selection["mode"] == "oracle"
    assert det.selection["negatives"] == "svhn-test"
    with pytest.raises(OodbenchError, match="OOD test set"):
        det.select(_inp(VAL, "val"))


def test_selection_none_keeps_the_defaults() -> None:
    det = create("react")
    det.fit(_train())
    det.select(_inp(VAL, "val"), _inp(NEG, "neg"))
    assert det.selected == {} and det.selection == {"mode": "none"}


def test_grid_points_a_detector_cannot_take_are_skipped() -> None:
    """ViM's subspace must be smaller than the features: larger grid points are no candidate."""
    rng = np.random.default_rng(0)
    d, c = 8, 3
    w, b = torch.tensor(rng.normal(size=(c, d))), torch.tensor(rng.normal(size=c))

    def inp(x: np.ndarray, name: str) -> DetectorInput:
        f = torch.tensor(x)
        return DetectorInput(name, f @ w.T + b, torch.tensor(rng.integers(0, c, len(x))), f,
                             head=(w, b))

    det = create("vim", selection="ood")
    det.fit(inp(rng.normal(size=(40, d)), "train"))
    det.select(inp(rng.normal(size=(12, d)), "val"), inp(rng.normal(3, 1, size=(12, d)), "neg"))
    table = det.selection["table"]
    assert {k for k, v in table.items() if np.isfinite(v)} == {"dim=0"}  # auto: D/2 = 4
    assert np.isnan(table["dim=16"]) and det.selected == {"dim": 0}
