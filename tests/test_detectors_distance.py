"""Feature-distance / density detectors: each score equals its formula, computed independently
here with numpy / scipy / scikit-learn on small hand-made tensors; chunked exact search equals
brute force; in-distribution-like inputs score higher than clearly OOD ones; head=None."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from scipy.stats import entropy, multivariate_normal, weibull_min
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from oodbench.detectors import DETECTORS, DetectorInput, create, streaming
from oodbench.detectors import mahalanobis as maha
from oodbench.errors import OodbenchError

NAMES = ["knn", "nnguide", "mahalanobis++", "rmds", "gmm", "vim", "she", "kl-matching",
         "openmax"]
C, D = 3, 6


def _inp(feats, logits=None, labels=None, head=None, temperature=1.0) -> DetectorInput:
    feats = torch.as_tensor(np.asarray(feats, dtype=np.float32))
    n = len(feats)
    lab = torch.zeros(n, dtype=torch.long) if labels is None else torch.as_tensor(labels).long()
    lg = None if logits is None else torch.as_tensor(np.asarray(logits, dtype=np.float32))
    return DetectorInput("x", lg, lab, features=feats, head=head, temperature=temperature)


def _data(seed=0, n=240, q=40):
    """Train features with class structure, a linear head, and query features."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % C
    centres = rng.normal(size=(C, D)) * 3
    x = (rng.normal(size=(n, D)) @ rng.normal(size=(D, D)) * 0.5 + centres[y] + 2.0)
    w, b = rng.normal(size=(C, D)), rng.normal(size=C)
    xq = rng.normal(size=(q, D)) * 2 + 2.0
    # the detectors read float32 features; compare on the same numbers
    x, xq = x.astype(np.float32).astype(np.float64), xq.astype(np.float32).astype(np.float64)
    lx = (x @ w.T + b).astype(np.float32).astype(np.float64)
    lq = (xq @ w.T + b).astype(np.float32).astype(np.float64)
    head = (torch.from_numpy(w), torch.from_numpy(b))
    return x, y, lx, xq, lq, head


def _fit_score(name, x, y, lx, xq, lq, head=None, **hp):
    det = create(name, **hp).fit(_inp(x, lx, y, head))
    return det, det(_inp(xq, lq, None, head))


def _norm(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks far smaller than N: every streamed statistic and the top-k search span many."""
    monkeypatch.setattr(streaming, "CHUNK", 13)
    monkeypatch.setattr(streaming, "QUERY_CHUNK", 7)
    monkeypatch.setattr(streaming, "BANK_CHUNK", 11)
    monkeypatch.setattr(maha, "CHUNK", 17)


# --------------------------------------------------------------------------------------- knn
@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("chunked", [False, True])
def test_knn_is_minus_kth_neighbour_distance_of_normalised_features(request, k, chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    x, y, lx, xq, lq, _ = _data()
    _, got = _fit_score("knn", x, y, lx, xq, lq, k=k)
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(_norm(x))
    want = -nn.kneighbors(_norm(xq))[0][:, -1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_knn_default_k_and_refusals():
    assert create("knn").params["k"] == 50 and DETECTORS.get("knn").grid["k"] == [
        1, 5, 10, 50, 100, 200]
    x, y, lx, xq, lq, _ = _data(n=30)
    det = create("knn", k=31).fit(_inp(x, lx, y))
    with pytest.raises(OodbenchError, match="exceeds the 30 training samples"):
        det(_inp(xq, lq))
    with pytest.raises(OodbenchError, match="knn must be fitted"):
        create("knn")(_inp(xq, lq))


def test_knn_bank_is_float32_and_changing_k_needs_no_refit():
    x, y, lx, xq, lq, _ = _data()
    det = create("knn").fit(_inp(x, lx, y))
    assert det.bank.dtype == torch.float32 and det.bank.shape == x.shape
    det.selected = {"k": 5}
    np.testing.assert_allclose(det(_inp(xq, lq)), _fit_score("knn", x, y, lx, xq, lq, k=5)[1])


# ----------------------------------------------------------------------------------- nnguide
@pytest.mark.parametrize("chunked", [False, True])
def test_nnguide_is_energy_times_mean_topk_guidance(request, chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    x, y, lx, xq, lq, _ = _data()
    k = 10
    _, got = _fit_score("nnguide", x, y, lx, xq, lq, k=k)
    bank = _norm(x) * logsumexp(lx, axis=1)[:, None]
    sims = _norm(xq) @ bank.T
    want = logsumexp(lq, axis=1) * np.sort(sims, axis=1)[:, -k:].mean(1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------------- gaussian detectors
def _md(x, y, q, classes):
    """Squared Mahalanobis distances N×C with the tied ML covariance (sklearn)."""
    means = np.stack([x[y == c].mean(0) for c in range(classes)])
    prec = EmpiricalCovariance().fit(x - means[y]).precision_
    return np.stack([np.einsum("nd,de,ne->n", q - m, prec, q - m) for m in means], 1)


@pytest.mark.parametrize("chunked", [False, True])
def test_mahalanobis_plus_plus_is_mahalanobis_on_normalised_features(request, chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    x, y, lx, xq, lq, _ = _data()
    _, got = _fit_score("mahalanobis++", x, y, lx, xq, lq)
    want = -_md(_norm(x), y, _norm(xq), C).min(1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # and it differs from plain Mahalanobis on unnormalised features
    _, plain = _fit_score("mahalanobis", x, y, lx, xq, lq)
    assert not np.allclose(got, plain)


@pytest.mark.parametrize("chunked", [False, True])
def test_rmds_is_class_minus_background_mahalanobis(request, chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    x, y, lx, xq, lq, _ = _data()
    _, got = _fit_score("rmds", x, y, lx, xq, lq)
    md0 = EmpiricalCovariance().fit(x).mahalanobis(xq)  # squared, background Gaussian
    want = -(_md(x, y, xq, C) - md0[:, None]).min(1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("chunked", [False, True])
def test_gmm_tied_is_the_mixture_log_likelihood(request, chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    x, y, lx, xq, lq, _ = _data()
    y = np.where(np.arange(len(y)) < 40, 0, y)  # unequal priors
    _, got = _fit_score("gmm", x, y, lx, xq, lq)
    means = np.stack([x[y == c].mean(0) for c in range(C)])
    cov = np.cov((x - means[y]).T, bias=True)
    prior = np.bincount(y) / len(y)
    want = logsumexp(np.stack([np.log(prior[c]) + multivariate_normal(means[c], cov).logpdf(xq)
                               for c in range(C)], 1), axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_gmm_full_covariance_and_shrinkage():
    x, y, lx, xq, lq, _ = _data()
    a = 0.1
    _, got = _fit_score("gmm", x, y, lx, xq, lq, covariance="full", shrinkage=a)
    parts = []
    for c in range(C):
        xc = x[y == c]
        cov = np.cov(xc.T, bias=True)
        cov = cov + a * np.trace(cov) / D * np.eye(D)
        parts.append(np.log(np.mean(y == c)) + multivariate_normal(xc.mean(0), cov).logpdf(xq))
    np.testing.assert_allclose(got, logsumexp(np.stack(parts, 1), axis=1), rtol=1e-8)


def test_gmm_refuses_scoring_after_a_fit_parameter_changed():
    x, y, lx, xq, lq, _ = _data()
    det = create("gmm").fit(_inp(x, lx, y))
    det.selected = {"covariance": "full"}
    with pytest.raises(OodbenchError, match="call fit"):
        det(_inp(xq, lq))


# ---------------------------------------------------------------------------------------- vim
def _vim(x, lx, xq, lq, w, b, dim):
    u = -np.linalg.pinv(w) @ b
    _, _, vt = np.linalg.svd(x - u, full_matrices=False)  # principal axes around u
    p = vt[:dim]

    def residual(f):
        z = f - u
        return np.linalg.norm(z - z @ p.T @ p, axis=1)

    alpha = lx.max(1).mean() / residual(x).mean()
    return logsumexp(lq, axis=1) - alpha * residual(xq)


@pytest.mark.parametrize("dim", [1, 2, 4])
@pytest.mark.parametrize("chunked", [False, True])
def test_vim_is_energy_minus_scaled_residual(request, dim, chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    x, y, lx, xq, lq, head = _data()
    _, got = _fit_score("vim", x, y, lx, xq, lq, head, dim=dim)
    want = _vim(x, lx, xq, lq, head[0].numpy(), head[1].numpy(), dim)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_vim_default_dim_rule_and_dim_change_without_refit():
    from oodbench.detectors.vim import auto_dim

    assert (auto_dim(2048), auto_dim(768), auto_dim(512), auto_dim(6)) == (1000, 512, 256, 3)
    x, y, lx, xq, lq, head = _data()
    det, got = _fit_score("vim", x, y, lx, xq, lq, head)
    np.testing.assert_allclose(got, _vim(x, lx, xq, lq, head[0].numpy(), head[1].numpy(), 3),
                               rtol=1e-6, atol=1e-8)
    det.selected = {"dim": 2}
    np.testing.assert_allclose(det(_inp(xq, lq, None, head)),
                               _fit_score("vim", x, y, lx, xq, lq, head, dim=2)[1])
    det.selected = {"dim": D}
    with pytest.raises(OodbenchError, match="vim is not applicable: vim.dim"):
        det(_inp(xq, lq, None, head))


def test_vim_refuses_prototype_heads_and_others_do_not_need_a_head():
    x, y, lx, xq, lq, _ = _data()
    assert DETECTORS.get("vim").applies_to_prototype_heads is False
    assert "head" in DETECTORS.get("vim").needs
    with pytest.raises(OodbenchError, match="vim is not applicable: ViM"):
        create("vim").fit(_inp(x, lx, y, head=None))
    for name in NAMES:
        if name == "vim":
            continue
        cls = DETECTORS.get(name)
        assert "head" not in cls.needs and cls.applies_to_prototype_heads is True, name
        s = create(name, **({"k": 5} if "k" in cls.hparams else {})).fit(
            _inp(x, lx, y, head=None))(_inp(xq, lq, head=None))
        assert s.shape == (len(xq),) and np.isfinite(s).all(), name


# -------------------------------------------------------------------------------- templates
@pytest.mark.parametrize("chunked", [False, True])
def test_she_is_inner_product_with_the_predicted_class_pattern(request, chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    x, y, lx, xq, lq, _ = _data()
    _, got = _fit_score("she", x, y, lx, xq, lq)
    ok = lx.argmax(1) == y
    patterns = np.stack([x[ok & (y == c)].mean(0) if (ok & (y == c)).any() else x[y == c].mean(0)
                         for c in range(C)])
    want = np.einsum("nd,nd->n", xq, patterns[lq.argmax(1)])
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_she_falls_back_to_all_samples_of_a_class_never_classified_correctly():
    x, y, lx, xq, lq, _ = _data()
    lx = lx.copy()
    lx[y == 1, 1] = -1e3  # class 1 is never predicted
    det, got = _fit_score("she", x, y, lx, xq, lq)
    np.testing.assert_allclose(det.patterns[1].numpy(), x[y == 1].mean(0), rtol=1e-10)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_kl_matching_is_minus_min_kl_to_predicted_class_templates(t):
    x, y, lx, xq, lq, _ = _data()
    det = create("kl-matching").fit(_inp(x, lx, y, temperature=t))
    got = det(_inp(xq, lq, temperature=t))
    p_train, p = softmax(lx / t, axis=1), softmax(lq / t, axis=1)
    pred = p_train.argmax(1)
    templates = [p_train[pred == c].mean(0) for c in range(C) if (pred == c).any()]
    want = -np.array([min(entropy(pi, d) for d in templates) for pi in p])
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)


def _openmax(x_logits, y, q_logits, alpha, tail, kind="euclidean"):
    """OpenMax written out per class and per sample (Bendale & Boult 2016, Alg. 1-2)."""
    def dist(v, m):
        eu = np.linalg.norm(v - m)
        return eu if kind == "euclidean" else eu / 200 + 1 - v @ m / (
            np.linalg.norm(v) * np.linalg.norm(m))

    means, fits = [], []
    for c in range(C):
        av = x_logits[(y == c) & (x_logits.argmax(1) == c)]
        m = av.mean(0)
        tail_d = np.sort([dist(v, m) for v in av])[-tail:]
        means.append(m)
        fits.append(weibull_min.fit(tail_d, floc=0))
    out = []
    for v in q_logits:
        ranked = np.argsort(-v)[:alpha]
        omega = np.ones(C)
        for i, c in enumerate(ranked, start=1):
            shape, loc, scale = fits[c]
            w = weibull_min.cdf(dist(v, means[c]), shape, loc, scale)
            omega[c] = 1 - (alpha + 1 - i) / alpha * w
        vhat = v * omega
        probs = softmax(np.r_[vhat, (v * (1 - omega)).sum()])
        out.append(probs[:C].max())
    return np.array(out)


def _openmax_data():
    x, y, lx, x_id, l_id, x_ood, l_ood, _ = _separable(n=300, q=30)
    lx = lx + np.random.default_rng(3).normal(size=lx.shape) * 2  # some misclassified
    return x, y, lx, np.r_[x_id, x_ood], np.r_[l_id, l_ood]


@pytest.mark.parametrize(("alpha", "tail", "kind"), [(3, 20, "euclidean"), (2, 10, "eucos")])
def test_openmax_matches_the_written_out_recalibration(alpha, tail, kind):
    x, y, lx, xq, lq = _openmax_data()
    _, got = _fit_score("openmax", x, y, lx, xq, lq, alpha=alpha, tail=tail, distance=kind)
    np.testing.assert_allclose(got, _openmax(lx, y, lq, alpha, tail, kind), rtol=1e-5)


def test_openmax_streamed_fit_equals_one_chunk(small_chunks):
    x, y, lx, xq, lq = _openmax_data()
    _, got = _fit_score("openmax", x, y, lx, xq, lq)
    np.testing.assert_allclose(got, _openmax(lx, y, lq, 3, 20), rtol=1e-5)


# ------------------------------------------------------------------------------- orientation
def _separable(seed=0, n=600, q=200):
    """Classes at 6·e_c with a head reading them off (logits = f_c), OOD noise at the origin."""
    rng = np.random.default_rng(seed)
    dim = 12
    y = np.arange(n) % C
    centres = np.zeros((C, dim))
    centres[np.arange(C), np.arange(C)] = 6.0
    x = centres[y] + rng.normal(size=(n, dim)) * 0.7
    yt = np.arange(q) % C
    x_id = centres[yt] + rng.normal(size=(q, dim)) * 0.7
    x_ood = rng.normal(size=(q, dim)) * 1.5
    w = np.eye(C, dim)
    b = np.zeros(C)
    head = (torch.from_numpy(w), torch.from_numpy(b))
    return x, y, x @ w.T + b, x_id, x_id @ w.T + b, x_ood, x_ood @ w.T + b, head


@pytest.mark.parametrize("name", NAMES)
def test_in_distribution_scores_higher_than_ood(name):
    x, y, lx, x_id, l_id, x_ood, l_ood, head = _separable()
    det = create(name).fit(_inp(x, lx, y, head))
    s_id, s_ood = det(_inp(x_id, l_id, None, head)), det(_inp(x_ood, l_ood, None, head))
    auroc = roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])
    assert auroc > 0.9, (name, auroc)


def test_every_new_detector_declares_a_grid_and_a_paper_formula_docstring():
    for name in NAMES:
        cls = DETECTORS.get(name)
        assert set(cls.grid) <= set(cls.hparams), name
        for hp, values in cls.grid.items():
            for v in values:
                cls.hparams[hp].coerce(v)  # every grid value is valid
        assert cls.requires_fit and cls.summary, name
        assert "features" in cls.needs or "logits" in cls.needs, name


@pytest.mark.parametrize("name", ["knn", "nnguide"])
def test_grid_selection_searches_each_set_once_and_slices_every_k(name, monkeypatch):
    """One top-K search per selection set serves the whole k grid (K = max of the grid), and
    each grid point scores as a detector created with that k does."""
    cls = DETECTORS.get(name)
    x, y, lx, xq, lq, _ = _data()
    xn, ln = xq[::-1] * 3 + 1, lq[::-1] * 2  # another set as the negatives
    calls: list[int] = []
    derive = cls.derive
    monkeypatch.setattr(cls, "derive", lambda self, d: calls.append(len(d)) or derive(self, d))
    det = create(name, selection="ood").fit(_inp(x, lx, y))
    det.select(_inp(xq, lq), _inp(xn, ln))
    assert calls == [len(xq), len(xn)] and det.k_max() == max(cls.grid["k"])
    for k in cls.grid["k"]:
        key = f"k={k}"
        alone = create(name, k=k).fit(_inp(x, lx, y))
        assert det.selection["table"][key] == pytest.approx(
            roc_auc_score(np.r_[np.ones(len(xq)), np.zeros(len(xn))],
                          np.r_[alone(_inp(xq, lq)), alone(_inp(xn, ln))]), abs=1e-12), key
