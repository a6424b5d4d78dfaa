"""Metric definitions: agreement with scikit-learn, hand-computed tie cases, Lee et al.'s script."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from oodbench.metrics import (
    bootstrap_auroc,
    ece,
    ood_metrics,
    percentile_interval,
    reliability_bins,
    roc_curve,
)


def _sk(pos, neg):
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    return roc_auc_score(y, s), average_precision_score(y, s), average_precision_score(1 - y, -s)


@pytest.mark.parametrize("seed", range(5))
def test_equal_to_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 12, rng.integers(20, 300)).astype(float)  # heavy ties
    neg = rng.integers(-3, 9, rng.integers(20, 300)).astype(float)
    m = ood_metrics(pos, neg)
    auroc, ap_in, ap_out = _sk(pos, neg)
    assert m["auroc"] == pytest.approx(auroc, abs=1e-12)
    assert m["aupr_in"] == pytest.approx(ap_in, abs=1e-12)
    assert m["aupr_out"] == pytest.approx(ap_out, abs=1e-12)
    assert m["tnr_at_tpr95"] + m["fpr_at_tpr95"] == pytest.approx(1.0)


def test_hand_computed_ties():
    # 20 in-dist: 18 at 1.0, 2 at 0.5. 10 OOD: 1 at 1.0, 3 at 0.5, 6 at 0.0.
    # ROC points (FPR, TPR): (0, 0), (.1, .9) at t=1, (.4, 1) at t=.5, (1, 1) at t=0.
    # |TPR - .95| is .05 for both .9 and 1.0: the higher TPR wins -> FPR .4, TNR .6.
    # DTACC = max(.5, .5(.9 + .9), .5(1 + .6), .5) = .9.
    # AUROC = (18*9 + 2*6 + .5*(18*1 + 2*3)) / 200 = .93.
    pos = np.r_[np.ones(18), [0.5, 0.5]]
    neg = np.r_[1.0, [0.5] * 3, np.zeros(6)]
    m = ood_metrics(pos, neg)
    assert m["tnr_at_tpr95"] == pytest.approx(0.6)
    assert m["fpr_at_tpr95"] == pytest.approx(0.4)
    assert m["dtacc"] == pytest.approx(0.9)
    assert m["auroc"] == pytest.approx(0.93)
    fpr, tpr, thr = roc_curve(pos, neg)
    np.testing.assert_allclose(fpr, [0, 0.1, 0.4, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.9, 1.0, 1.0])
    np.testing.assert_allclose(thr, [np.inf, 1.0, 0.5, 0.0])


def test_tie_block_threshold_vs_lee():
    # 100 in-dist: 93 at 1.0, 7 at 0.5. 10 OOD: 1 at 1.0, 4 at 0.5, 5 at 0.0.
    # Reachable points: TPR .93 (FPR .1) and TPR 1.0 (FPR .5): .93 is closer -> TNR .9.
    # Lee et al.'s walk rejects the tied in-dist samples one by one before the tied OOD ones
    # and stops inside the tie at TPR .95 with FPR still .5 -> TNR .5.
    pos = np.r_[np.ones(93), [0.5] * 7]
    neg = np.r_[1.0, [0.5] * 4, np.zeros(5)]
    assert ood_metrics(pos, neg)["tnr_at_tpr95"] == pytest.approx(0.9)
    lee = ood_metrics(pos, neg, convention="lee")
    assert lee["tnr_at_tpr95"] == pytest.approx(0.5)
    # Lee's AUROC counts ties as errors: P(in > out) = (93*9 + 7*5) / 1000.
    assert lee["auroc"] == pytest.approx((93 * 9 + 7 * 5) / 1000)
    assert ood_metrics(pos, neg)["dtacc"] == pytest.approx(lee["dtacc"])


def test_operating_point_takes_the_lowest_threshold_at_the_chosen_tpr():
    # 20 in-dist at 1..20; OOD at 1.5, 1.6, 1.7 lie between the lowest two in-dist scores.
    # TPR .95 (19 of 20 accepted) holds for any threshold in (1, 2]: Lee et al. (and this
    # module) take the lowest, accepting all three OOD samples -> FPR 3/4.
    pos = np.arange(1.0, 21.0)
    neg = np.array([1.5, 1.6, 1.7, 0.0])
    assert ood_metrics(pos, neg)["fpr_at_tpr95"] == pytest.approx(0.75)
    assert ood_metrics(pos, neg, convention="lee")["fpr_at_tpr95"] == pytest.approx(0.75)


def _lee_loop(known, novel):
    """A plain loop over Lee et al.'s ROC walk (the published algorithm), as an oracle."""
    known, novel = np.sort(known), np.sort(novel)
    nk, nn = len(known), len(novel)
    tp, fp = [nk], [nn]
    k = n = 0
    while k < nk or n < nn:
        if k < nk and (n == nn or not novel[n] < known[k]):
            k += 1
            tp.append(tp[-1] - 1)
            fp.append(fp[-1])
        else:
            n += 1
            tp.append(tp[-1])
            fp.append(fp[-1] - 1)
    tp, fp = np.array(tp, float), np.array(fp, float)
    tnr = 1 - fp[np.abs(tp / nk - 0.95).argmin()] / nn
    tpr, fpr = np.r_[1, tp / nk, 0], np.r_[1, fp / nn, 0]
    return tnr, -np.trapezoid(1 - fpr, tpr), 0.5 * (tp / nk + 1 - fp / nn).max()


@pytest.mark.parametrize("ties", [False, True])
def test_lee_convention_matches_the_walk(ties):
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(1, 1, 157), rng.normal(0, 1, 83)
    if ties:
        pos, neg = np.round(pos), np.round(neg)
    tnr, auroc, dtacc = _lee_loop(pos, neg)
    lee = ood_metrics(pos, neg, convention="lee")
    assert lee["tnr_at_tpr95"] == pytest.approx(tnr)
    assert lee["auroc"] == pytest.approx(auroc)
    assert lee["dtacc"] == pytest.approx(dtacc)
    if not ties:  # without ties the conventions agree on everything but the AUPR integration
        ours = ood_metrics(pos, neg)
        for key in ("tnr_at_tpr95", "auroc", "dtacc"):
            assert ours[key] == pytest.approx(lee[key])
        assert abs(ours["aupr_in"] - lee["aupr_in"]) < 0.02


def test_perfect_and_inverted_separation():
    m = ood_metrics(np.array([2.0, 3.0]), np.array([0.0, 1.0]))
    assert m == {"tnr_at_tpr95": 1.0, "fpr_at_tpr95": 0.0, "auroc": 1.0, "dtacc": 1.0,
                 "aupr_in": 1.0, "aupr_out": 1.0}
    assert ood_metrics(np.array([0.0]), np.array([1.0]))["auroc"] == 0.0


def test_rejects_nan_and_empty():
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics(np.array([1.0, np.nan]), np.array([0.0]))
    with pytest.raises(ValueError, match="empty"):
        ood_metrics(np.array([]), np.array([0.0]))
    with pytest.raises(ValueError, match="convention"):
        ood_metrics(np.array([1.0]), np.array([0.0]), convention="openood")


def test_bootstrap_auroc_centres_on_the_point_estimate():
    rng = np.random.default_rng(0)
    pos, neg = np.round(rng.normal(1, 1, 400), 1), np.round(rng.normal(0, 1, 300), 1)
    reps = bootstrap_auroc(pos, neg, n_boot=400, seed=1)
    auroc = roc_auc_score(np.r_[np.ones(400), np.zeros(300)], np.r_[pos, neg])
    lo, hi = percentile_interval(reps)
    assert lo < auroc < hi and hi - lo < 0.1
    assert reps.mean() == pytest.approx(auroc, abs=0.01)
    # Each replicate is an exact AUROC: resampling everything once equals the identity draw.
    np.testing.assert_array_equal(bootstrap_auroc(pos, neg, 5, seed=2),
                                  bootstrap_auroc(pos, neg, 5, seed=2))


def test_ece_hand_computed_and_bin_edges():
    # Two samples, confidences .9 (correct) and .6 (wrong): |1 - .9| + |0 - .6| over 2 = .35.
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.4, 0.6]]))
    labels = torch.tensor([0, 0])
    assert ece(logits, labels) == pytest.approx(0.35)
    # A confidence exactly on an edge (.5 with 10 bins) falls in the bin it closes, (.4, .5].
    _, _, count = reliability_bins(torch.zeros(1, 2), torch.tensor([0]), bins=10)
    assert count[4] == 1 and count.sum() == 1
