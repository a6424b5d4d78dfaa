"""Shaping / head-geometry detectors: each score equals its paper's formula computed here with
numpy (independently of the detector's helpers), in-distribution-like inputs score higher than
OOD-like ones, prototype heads are refused with the reason, and train statistics are streamed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from oodbench.detectors import DETECTORS, DetectorInput, create
from oodbench.detectors import shaping as sh
from oodbench.detectors.base import NotApplicable
from oodbench.errors import OodbenchError
from oodbench.metrics import ood_metrics

F = np.array([[0.5, 2.0, 0.1, 1.0], [3.0, 0.0, 0.2, 0.4], [0.01, 0.02, 0.03, 5.0],
              [1.0, 1.1, 0.9, 1.2], [0.2, 0.3, 4.0, 0.1], [2.5, 0.5, 0.05, 0.0]])
W = np.array([[1.0, -0.5, 0.2, 0.3], [-0.4, 1.2, 0.1, -0.2], [0.3, 0.1, -1.0, 0.8]])
B = np.array([0.1, -0.2, 0.05])
TRAIN = np.abs(np.random.default_rng(0).normal(1.0, 1.0, size=(40, 4)))

HEAD_DETECTORS = ["react", "vra", "bfact", "ash-p", "ash-b", "ash-s", "scale", "dice",
                  "gradnorm", "fdbd", "nci"]
ALL = HEAD_DETECTORS + ["gen", "neco", "lts"]


def _inp(f: np.ndarray, head=True, name="x") -> DetectorInput:
    ft = torch.tensor(f, dtype=torch.float32)
    logits = torch.tensor(f @ W.T + B, dtype=torch.float32)
    return DetectorInput(name, logits, torch.zeros(len(f), dtype=torch.long), features=ft,
                         head=(torch.tensor(W), torch.tensor(B)) if head else None)


def _fitted(name: str, train: np.ndarray = TRAIN, **hp) -> object:
    det = create(name, **hp)
    if det.requires_fit:
        det.fit(_inp(train, name="train"))
    return det


def _energy(z: np.ndarray) -> np.ndarray:
    m = z.max(1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _topk_mask(f: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros_like(f, dtype=bool)
    for i, row in enumerate(f):
        mask[i, np.argsort(-row)[:k]] = True
    return mask


def _check(name: str, want: np.ndarray, **hp) -> None:
    np.testing.assert_allclose(_fitted(name, **hp)(_inp(F)), want, rtol=1e-6, atol=1e-9,
                               err_msg=name)


@pytest.mark.parametrize("p", [90.0, 50.0])
def test_react_clips_at_the_train_percentile(p: float) -> None:
    c = np.percentile(TRAIN.ravel(), p)
    _check("react", _energy(np.minimum(F, c) @ W.T + B), percentile=p)


def test_vra_piecewise() -> None:
    lo, hi = np.percentile(TRAIN.ravel(), 10), np.percentile(TRAIN.ravel(), 90)
    f = F
    g = np.where(f < lo, 0.0, f + 0.3)
    g = np.where(f > hi, hi, g)
    _check("vra", _energy(g @ W.T + B), gamma=0.3)


@pytest.mark.parametrize("order", [1, 3])
def test_bfact_butterworth(order: int) -> None:
    t = np.percentile(TRAIN.ravel(), 90)
    g = F / np.sqrt(1 + (F / t) ** (2 * order))
    _check("bfact", _energy(g @ W.T + B), order=order)


def test_bfact_refuses_features_with_no_positive_value() -> None:
    """A log-softmax network's penultimate features are log-probabilities (all < 0): BFAct's
    filter has no positive T there, so it is n/a for that model, not a failed run."""
    with pytest.raises(NotApplicable, match="non-negative"):
        _fitted("bfact", train=-TRAIN - 0.1)


@pytest.mark.parametrize("p,k", [(90.0, 1), (50.0, 2)])  # k = max(1, 4 - round(4 p / 100))
def test_ash_variants(p: float, k: int) -> None:
    mask = _topk_mask(F, k)
    s1 = F.sum(1, keepdims=True)
    pruned = np.where(mask, F, 0.0)
    s2 = pruned.sum(1, keepdims=True)
    _check("ash-p", _energy(pruned @ W.T + B), percentile=p)
    _check("ash-b", _energy(np.where(mask, s1 / k, 0.0) @ W.T + B), percentile=p)
    _check("ash-s", _energy((pruned * np.exp(s1 / s2)) @ W.T + B), percentile=p)
    _check("scale", _energy((F * np.exp(s1 / s2)) @ W.T + B), percentile=p)


@pytest.mark.parametrize("p,k", [(95.0, 1), (50.0, 2), (0.0, 4)])  # k = max(1, 4 - round(4p/100))
def test_lts_scales_the_logits_by_the_squared_activation_ratio(p: float, k: int) -> None:
    f = np.vstack([F, [[-1.0, 2.0, -0.5, 1.0]], [[-1.0, -2.0, 0.0, -3.0]]])  # negatives; all ≤ 0
    a = np.maximum(f.astype(np.float32).astype(np.float64), 0.0)  # as _inp passes them
    s2 = np.array([np.sort(row)[::-1][:k].sum() for row in a])
    s = np.where(s2 > 0, a.sum(1) / np.where(s2 > 0, s2, 1.0), 1.0) ** 2
    z = (f @ W.T + B).astype(np.float32).astype(np.float64)  # the cached (float32) logits
    np.testing.assert_allclose(create("lts", percentile=p)(_inp(f)), _energy(s[:, None] * z),
                               rtol=1e-12)


def test_lts_by_hand() -> None:
    """f = (1, 1, 1, 1, 0, 0, 0, 0), p = 75: k = 8 − 6 = 2, S = (4 / 2)² = 4; logits (1, 0, −1)
    → log(e⁴ + 1 + e⁻⁴); a unit vector (only one active unit) has S = 1: plain energy."""
    f = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 3, 0, 0, 0, 0]], dtype=np.float64)
    z = np.array([[1.0, 0.0, -1.0], [2.0, 0.5, 0.0]])
    inp = DetectorInput("x", torch.tensor(z, dtype=torch.float32),
                        torch.zeros(2, dtype=torch.long), features=torch.tensor(f))
    want = [np.log(np.exp(4.0) + 1 + np.exp(-4.0)), np.log(np.exp(2.0) + np.exp(0.5) + 1)]
    np.testing.assert_allclose(create("lts", percentile=75.0)(inp), want, rtol=1e-12)


@pytest.mark.parametrize("p", [90.0, 50.0])
def test_dice_sparsifies_by_train_contribution(p: float) -> None:
    v = W * TRAIN.mean(0)
    ws = np.where(v > np.percentile(v, p), W, 0.0)
    _check("dice", _energy(F @ ws.T + B), p=p)


@pytest.mark.parametrize("bias", [False, True])
def test_gradnorm_closed_form_equals_autograd(bias: bool) -> None:
    p = _softmax(F @ W.T + B)
    want = np.abs(p - 1 / 3).sum(1) * (np.abs(F).sum(1) + bias)
    _check("gradnorm", want, include_bias=bias)
    # the closed form is the L1 norm of the real gradient of KL(u || softmax) w.r.t. W (and b)
    for i, f in enumerate(F):
        lin = torch.nn.Linear(4, 3).double()
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(W))
            lin.bias.copy_(torch.tensor(B))
        logp = torch.log_softmax(lin(torch.tensor(f)[None]), dim=1)
        (-(logp / 3).sum()).backward()
        g = lin.weight.grad.abs().sum() + (lin.bias.grad.abs().sum() if bias else 0)
        assert float(g) == pytest.approx(want[i], rel=1e-9)


def test_gradnorm_temperature() -> None:
    p = _softmax((F @ W.T + B) / 2.0)
    _check("gradnorm", np.abs(p - 1 / 3).sum(1) * np.abs(F).sum(1) / 2.0, T=2.0)


@pytest.mark.parametrize("normalise", [True, False])
def test_fdbd_boundary_distances(normalise: bool) -> None:
    mu = TRAIN.mean(0)
    want = []
    for f in F:
        z = f @ W.T + B
        c = int(np.argmax(z))
        d = [(z[c] - z[j]) / np.linalg.norm(W[c] - W[j]) for j in range(3) if j != c]
        s = np.mean(d)
        want.append(s / np.linalg.norm(f - mu) if normalise else s)
    _check("fdbd", np.array(want), distance_as_normalizer=normalise)


@pytest.mark.parametrize("alpha", [1e-4, 0.5])
def test_nci_proximity_plus_norm(alpha: float) -> None:
    mu = TRAIN.mean(0)
    want = [W[np.argmax(f @ W.T + B)] @ (f - mu) / np.linalg.norm(f - mu)
            + alpha * np.abs(f).sum() for f in F]
    _check("nci", np.array(want), alpha=alpha)


@pytest.mark.parametrize("gamma,m,t", [(0.1, 100, 1.0), (0.5, 2, 1.0), (0.1, 100, 3.0)])
def test_gen_generalized_entropy(gamma: float, m: int, t: float) -> None:
    p = -np.sort(-_softmax((F @ W.T + B) / t), axis=1)[:, :min(m, 3)]
    want = -(p ** gamma * (1 - p) ** gamma).sum(1)
    det = create("gen", gamma=gamma, M=m)
    np.testing.assert_allclose(det(replace(_inp(F), temperature=t)), want, rtol=1e-5)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_neco_principal_subspace_ratio(d: int) -> None:
    mean, std = TRAIN.mean(0), TRAIN.std(0)  # ddof 0, as sklearn's StandardScaler
    zt = (TRAIN - mean) / std
    _, _, vt = np.linalg.svd(zt - zt.mean(0), full_matrices=False)  # PCA by SVD
    z = (F - mean) / std
    want = np.linalg.norm(z @ vt[:d].T, axis=1) / np.linalg.norm(z, axis=1)
    _check("neco", want, d=d)
    logit_max = (F @ W.T + B).max(1)
    _check("neco", want * logit_max, d=d, use_max_logit=True)


def test_neco_with_every_direction_is_refused() -> None:
    """d = D keeps the whole space: every ratio is exactly 1, so any AUROC is rounding noise."""
    with pytest.raises(OodbenchError, match="must be below the feature dimension D = 4"):
        _fitted("neco", d=4)(_inp(F))


def test_neco_auto_dimension_explains_90_percent() -> None:
    zt = (TRAIN - TRAIN.mean(0)) / TRAIN.std(0)
    lam = np.sort(np.linalg.eigvalsh(np.cov(zt.T)))[::-1]
    d = int(np.argmax(np.cumsum(lam) / lam.sum() >= 0.9)) + 1
    assert _fitted("neco").dim == d  # (here d = D = 4: allowed when chosen automatically)


# ------------------------------------------------------------------------------ orientation
W_ORIENT = np.array([[2.0, 0.1, -0.1, 0.0], [0.1, 2.0, 0.1, 0.0], [-0.1, 0.1, 2.0, 0.0]])


def _class_features(rng: np.random.Generator, n: int) -> np.ndarray:
    """In-distribution: a strong activation on the unit of the class, small noise elsewhere."""
    f = rng.uniform(0, 0.2, size=(n, 4))
    f[np.arange(n), rng.integers(0, 3, n)] += 3.0
    return f


def _orient_inp(f: np.ndarray, name: str) -> DetectorInput:
    ft = torch.tensor(f)
    return DetectorInput(name, ft @ torch.tensor(W_ORIENT).T, torch.zeros(len(f), dtype=torch.long),
                         features=ft, head=(torch.tensor(W_ORIENT), torch.zeros(3)))


@pytest.mark.parametrize("name", ALL)
def test_in_distribution_scores_higher(name: str) -> None:
    rng = np.random.default_rng(1)
    train, test_id = _class_features(rng, 300), _class_features(rng, 50)
    ood = rng.uniform(0, 0.2, size=(50, 4))
    ood[:, 3] += 2.0  # a unit the head ignores fires: a far-OOD activation pattern
    # dice at p = 90 keeps one weight of 12; neco: the class-mean (ETF) subspace has C - 1 dims
    det = create(name, **{"dice": {"p": 50.0}, "neco": {"d": 2}}.get(name, {}))
    if det.requires_fit:
        det.fit(_orient_inp(train, "train"))
    pos, neg = det(_orient_inp(test_id, "id")), det(_orient_inp(ood, "ood"))
    assert ood_metrics(pos, neg)["auroc"] > 0.95, name


# --------------------------------------------------------------------------- prototype heads
@pytest.mark.parametrize("name", HEAD_DETECTORS)
def test_prototype_head_is_refused_with_the_reason(name: str) -> None:
    cls = DETECTORS.get(name)
    assert "head" in cls.needs and cls.applies_to_prototype_heads is False
    det = create(name)
    with pytest.raises(NotApplicable, match="prototype") as e:
        if det.requires_fit:
            det.fit(_inp(TRAIN, head=False))
        else:
            det(_inp(F, head=False))
    assert "W, b" in str(e.value) and e.value.reason == cls.prototype_head_reason
    if det.requires_fit:  # fitted on a linear head, scored without one: refused too
        det = _fitted(name)
        with pytest.raises(NotApplicable):
            det(_inp(F, head=False))


@pytest.mark.parametrize("name", ["gen", "neco", "lts"])
def test_head_free_detectors_apply_to_prototype_heads(name: str) -> None:
    assert DETECTORS.get(name).applies_to_prototype_heads is True
    det = create(name)
    if det.requires_fit:
        det.fit(_inp(TRAIN, head=False))
    assert np.isfinite(det(_inp(F, head=False))).all()


# -------------------------------------------------------------------------------- streaming
class ChunkGuard:
    """An N×D array that only hands out slices of at most `limit` rows (a fit that
    materialised the whole set would fail here)."""

    def __init__(self, a: np.ndarray, limit: int) -> None:
        self.a, self.limit = a, limit

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, key: slice) -> np.ndarray:
        assert isinstance(key, slice), key
        out = self.a[key]
        assert len(out) <= self.limit, len(out)
        return out


FIT = ["react", "vra", "bfact", "dice", "fdbd", "nci", "neco"]


@pytest.mark.parametrize("name", FIT)
def test_fit_streams_a_memory_mapped_array_in_chunks(name, tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(2)
    train = np.abs(rng.normal(1, 1, size=(53, 4))).astype(np.float32)
    want = _fitted(name, train=train.astype(np.float64))(_inp(F))  # in memory, one chunk
    monkeypatch.setattr(sh, "CHUNK", 7)
    mm = np.memmap(tmp_path / "f.npy", dtype=np.float32, mode="w+", shape=train.shape)
    mm[:] = train
    mm.flush()
    mm = np.memmap(tmp_path / "f.npy", dtype=np.float32, mode="r", shape=train.shape)
    det = create(name)
    det.fit(replace(_inp(F), name="train", features=ChunkGuard(mm, 7),
                    labels=torch.zeros(53, dtype=torch.long)))
    np.testing.assert_allclose(det(_inp(F)), want, rtol=1e-9, err_msg=name)


def test_activation_sample_is_exact_when_small_and_bounded_otherwise(monkeypatch) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 5))
    monkeypatch.setattr(sh, "CHUNK", 8)
    np.testing.assert_array_equal(sh.activation_sample(x, size=300), np.sort(x.ravel()))
    s = sh.activation_sample(x, size=100)
    assert len(s) == 100 and np.isin(s, x.ravel()).all() and len(np.unique(s)) == 100
    np.testing.assert_array_equal(s, sh.activation_sample(x, size=100))  # seeded
    big = rng.uniform(size=(20000, 10))  # 200k values, 20k kept: percentiles within ~0.01
    monkeypatch.setattr(sh, "CHUNK", 4096)
    s = sh.activation_sample(big, size=20000)
    assert abs(np.percentile(s, 90) - np.percentile(big, 90)) < 0.01


def test_dice_keeping_no_weight_is_refused() -> None:
    """p = 100: no contribution exceeds its own maximum, every weight is dropped and every
    sample would get the same score."""
    with pytest.raises(OodbenchError, match="keeps no weight"):
        _fitted("dice", p=100.0)(_inp(F))
