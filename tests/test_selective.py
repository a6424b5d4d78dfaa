"""Misclassification detection and risk–coverage metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from oodbench.metrics import selective_metrics, selective_with_ood


def test_hand_computed_without_ties():
    m = selective_metrics(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool))
    # top-k risks 0, 1/2, 1/3, 1/2; generalized 0, 1/4, 1/4, 2/4
    assert m["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert m["augrc"] == pytest.approx((0 + 1 / 4 + 1 / 4 + 2 / 4) / 4)
    assert m["e_aurc"] == pytest.approx(m["aurc"] - (0.5 + 0.5 * math.log(0.5)))
    assert m["risk_at_80"] == pytest.approx(0.5) and m["risk_at_95"] == pytest.approx(0.5)
    assert m["misclassification_auroc"] == pytest.approx(3 / 4)


def test_tied_scores_are_accepted_together():
    m = selective_metrics(np.array([1.0, 1.0, 0.5]), np.array([1, 0, 1], bool))
    # thresholds: 1.0 → coverage 2/3, risk 1/2; 0.5 → coverage 1, risk 1/3
    assert m["aurc"] == pytest.approx(0.5 * 2 / 3 + (1 / 3) * (1 / 3))
    assert m["augrc"] == pytest.approx((1 / 3) * (2 / 3) + (1 / 3) * (1 / 3))
    assert m["risk_at_80"] == pytest.approx(1 / 3)


def test_random_scores_match_the_mean_over_k_and_sklearn():
    rng = np.random.default_rng(0)
    s = rng.normal(size=500)
    ok = rng.random(500) < 1 / (1 + np.exp(-2 * s))
    err = ~ok[np.argsort(-s)]
    k = np.arange(1, 501)
    m = selective_metrics(s, ok)
    assert m["aurc"] == pytest.approx(np.mean(np.cumsum(err) / k))
    assert m["augrc"] == pytest.approx(np.mean(np.cumsum(err) / 500))
    assert m["risk_at_80"] == pytest.approx(np.cumsum(err)[399] / 400)
    assert m["misclassification_auroc"] == pytest.approx(roc_auc_score(ok, s))


def test_accepted_ood_samples_count_as_errors():
    m = selective_with_ood(np.array([0.9, 0.6]), np.array([1, 1], bool), np.array([0.8]))
    assert m["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)
    assert m["misclassification_auroc"] == pytest.approx(1 / 2)  # OOD 0.8 between 0.9 and 0.6
