"""Each detector score equals its formula on small hand-made tensors (no model, no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodbench.detectors import DETECTORS, DetectorInput, create
from oodbench.detectors import mahalanobis as maha
from oodbench.errors import OodbenchError
from oodbench.summaries import SOFTMAX_STATS, channel_softmax_stats

LOGITS = torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 0.5], [30.0, -30.0, 0.0]])


def _inp(logits=LOGITS, temperature=1.0, **kw) -> DetectorInput:
    return DetectorInput("x", logits, torch.zeros(len(logits), dtype=torch.long),
                         temperature=temperature, **kw)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_logit_scores_match_formulas(t: float) -> None:
    z = LOGITS.double().numpy() / t
    p = _softmax(z)
    negent = (p * np.log(p)).sum(1)
    expected = {
        "msp": p.max(1), "mps": p.max(1), "maxlogit": z.max(1), "mds": z.max(1),
        "entropy": negent, "es": negent, "misp": -p.min(1),
        "mmls": z.max(1) + z.mean(1), "mmles": z.max(1) + z.mean(1) + negent,
        "mmleps": z.max(1) + z.mean(1) + negent + p.max(1),
    }
    for name, want in expected.items():
        np.testing.assert_allclose(create(name)(_inp(temperature=t)), want, rtol=1e-12,
                                   err_msg=name)


def test_energy_formula_and_extreme_logits_are_finite() -> None:
    z = LOGITS.double().numpy()
    for t in (1.0, 10.0):
        want = t * np.log(np.exp(z / t).sum(1))
        np.testing.assert_allclose(create("energy", T=t)(_inp()), want, rtol=1e-12)
    extreme = torch.tensor([[1e4, -1e4, 0.0]])
    for name in ("msp", "entropy", "misp", "mmleps", "energy"):
        assert np.isfinite(create(name)(_inp(extreme))).all(), name


def _block_stats(b: np.ndarray) -> dict[str, np.ndarray]:
    n, c = b.shape[:2]
    p = _softmax(b.reshape(n, c, -1).transpose(0, 2, 1).reshape(-1, c)).reshape(n, -1, c)
    per = {"msp": p.max(2), "misp": p.min(2), "asp": p.mean(2)}
    return {f"{a}-{s}": getattr(v, a)(1) for s, v in per.items() for a in ("max", "min", "mean")}


def test_channel_softmax_stats_match_formula_and_asp_is_one_over_c() -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(5, 7, 3, 4, generator=g) * 3
    stats = channel_softmax_stats(b).double().numpy()
    want = _block_stats(b.double().numpy())
    for i, col in enumerate(SOFTMAX_STATS):
        np.testing.assert_allclose(stats[:, i], want[col], rtol=1e-5, err_msg=col)
    # The mean over channels of a softmax is 1/C everywhere: no information, not a detector.
    np.testing.assert_allclose(stats[:, [SOFTMAX_STATS.index(f"{a}-asp") for a in
                                         ("max", "min", "mean")]], 1 / 7, rtol=1e-6)
    assert not [n for n in DETECTORS.names() if "asp" in n]


def test_intermediate_detectors_read_the_right_column_and_layer() -> None:
    g = torch.Generator().manual_seed(1)
    blocks = {"b1": torch.randn(6, 4, 2, 2, generator=g),
              "b2": torch.randn(6, 5, 3, 3, generator=g)}
    cached = {f"{k}.softmax": channel_softmax_stats(v) for k, v in blocks.items()}
    data = _inp(torch.zeros(6, 3), blocks=cached)
    want = {k: _block_stats(v.double().numpy()) for k, v in blocks.items()}
    np.testing.assert_allclose(create("intermediate-misp")(data), -want["b2"]["min-misp"],
                               rtol=1e-5)  # default layer: the last block
    np.testing.assert_allclose(create("intermediate-misp", layer="b1")(data),
                               -want["b1"]["min-misp"], rtol=1e-5)
    np.testing.assert_allclose(create("intermediate-msp-mean", layer="b1")(data),
                               want["b1"]["mean-msp"], rtol=1e-5)
    with pytest.raises(OodbenchError, match="choose from"):
        create("intermediate-misp", layer="nope")(data)
    with pytest.raises(OodbenchError, match="named blocks"):
        create("intermediate-misp")(_inp(torch.zeros(6, 3)))


def _sklearn_mahalanobis(x, y, q, classes):
    from sklearn.covariance import EmpiricalCovariance

    means = np.stack([x[y == c].mean(0) for c in range(classes)])
    prec = EmpiricalCovariance().fit(x - means[y]).precision_
    d = np.stack([np.einsum("nd,de,ne->n", q - m, prec, q - m) for m in means], 1)
    return -d.min(1)


@pytest.mark.parametrize("chunk", [4096, 7])  # one chunk, and streaming over many
def test_mahalanobis_matches_sklearn_empirical_covariance(monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(maha, "CHUNK", chunk)
    rng = np.random.default_rng(0)
    classes, dim = 3, 6
    y = rng.integers(0, classes, 300)
    x = rng.normal(size=(300, dim)) @ rng.normal(size=(dim, dim)) + 5 * y[:, None] + 40.0
    q = rng.normal(size=(50, dim)) * 3 + 40.0
    train = DetectorInput("train", torch.zeros(300, classes), torch.from_numpy(y),
                          features=torch.from_numpy(x).float())
    det = create("mahalanobis").fit(train)
    got = det(DetectorInput("q", torch.zeros(50, classes), torch.zeros(50, dtype=torch.long),
                            features=torch.from_numpy(q).float()))
    want = _sklearn_mahalanobis(x.astype(np.float32).astype(np.float64), y,
                                q.astype(np.float32).astype(np.float64), classes)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mahalanobis_ensemble_fits_every_block_and_needs_no_grad_without_selection() -> None:
    rng = np.random.default_rng(1)
    y = torch.from_numpy(rng.integers(0, 2, 200))
    blocks = {f"b{i}.mean": torch.randn(200, 3 + i) + y[:, None] for i in range(3)}
    det = create("mahalanobis-ensemble", selection="none")
    assert "grad" not in det.needs and not det.scores_with_model
    det.fit(DetectorInput("train", torch.zeros(200, 2), y, blocks=blocks))
    assert det.layers == ["b0", "b1", "b2"]
    s = det(DetectorInput("q", torch.zeros(200, 2), y, blocks=blocks))
    # scored without `select`: the plain sum of the per-layer Mahalanobis scores
    want = sum(_sklearn_mahalanobis(v.double().numpy(), y.numpy(), v.double().numpy(), 2)
               for v in blocks.values())
    np.testing.assert_allclose(s, want, rtol=1e-9)
    assert "grad" in create("mahalanobis-ensemble").needs  # default: FGSM-selected weights


def test_bad_hyperparameters_are_refused() -> None:
    with pytest.raises(OodbenchError, match="no hyperparameter"):
        create("odin", temperature=3)
    with pytest.raises(OodbenchError, match=r"odin\.selection must be one of 'none', 'id'"):
        create("odin", selection="test-set")
