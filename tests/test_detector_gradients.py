"""ODIN and Mahalanobis input preprocessing against hand derivations on a linear model.

The model is linear (1×1 convolutions, spatial mean, linear head), so every logit and pooled
feature is an affine map of the per-channel input mean m, and input gradients have a closed form:
for a loss L(m), ∂L/∂x[c, h, w] = (∂L/∂m)[c] / HW, whose sign is that of ∂L/∂m. With the
normalisation std ≠ 1 per channel, the expected perturbed input is x̃ = x − ε·sign(∇)/std, i.e.
m̃ = m − ε·sign(∂L/∂m)/std. Everything expected is computed here in numpy float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from oodbench.data import InputTransform
from oodbench.data.base import DatasetInfo, ImageSet
from oodbench.detectors import DetectorInput, create
from oodbench.models.base import Backbone, Classifier

MEAN, STD = (0.2, 0.5, 0.7), (0.5, 0.25, 2.0)
W1 = np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.4], [-0.6, 0.3, 0.9]])
C1 = np.array([0.1, -0.2, 0.3])
W2 = np.array([[0.7, -0.4, 0.5], [0.3, 0.8, -0.6]])
C2 = np.array([0.05, -0.1])
WH = np.array([[1.5, -0.5], [-1.0, 1.2], [0.4, 0.9]])
CH = np.array([0.1, 0.0, -0.2])


class _Linear(Backbone):
    feature_dim = 2
    block_names = ("b1", "b2")

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 2, 1)
        for conv, w, b in ((self.c1, W1, C1), (self.c2, W2, C2)):
            conv.weight.data = torch.tensor(w, dtype=torch.float32)[:, :, None, None]
            conv.bias.data = torch.tensor(b, dtype=torch.float32)

    def forward_features(self, x, taps=()):
        b1 = self.c1(x)
        b2 = self.c2(b1)
        return b2.mean(dim=(2, 3)), {k: v for k, v in (("b1", b1), ("b2", b2)) if k in taps}


def _model() -> Classifier:
    head = nn.Linear(2, 3)
    head.weight.data = torch.tensor(WH, dtype=torch.float32)
    head.bias.data = torch.tensor(CH, dtype=torch.float32)
    return Classifier(_Linear(), head).eval()


# Affine maps of the channel mean m: block-1 mean, features (= block-2 mean), logits.
MAPS = {"b1": (W1, C1), "features": (W2 @ W1, W2 @ C1 + C2)}
MAPS["logits"] = (WH @ MAPS["features"][0], WH @ MAPS["features"][1] + CH)


def _set(seed: int, n: int, shift: int = 0) -> tuple[ImageSet, np.ndarray]:
    """uint8 2×2 RGB images with class-dependent brightness; and their normalised channel
    means m (N×3) computed by hand."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    img = rng.integers(0, 120, (n, 3, 2, 2)) + 60 * np.eye(3, dtype=int)[labels][:, :, None, None]
    img = np.clip(img + shift, 0, 255).astype(np.uint8)
    info = DatasetInfo(3, 2, 3, mean=MEAN, std=STD)
    data = ImageSet(f"s{seed}", torch.from_numpy(img), torch.from_numpy(labels), info)
    m = ((img / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]).mean((2, 3))
    return data, m


def _input(data: ImageSet, model: Classifier) -> DetectorInput:
    """What the pipeline hands a detector: cached outputs plus model, images and transform."""
    tf = InputTransform(MEAN, STD)
    with torch.no_grad():
        out = model.forward_all(tf(data.images), taps=("b1", "b2"))
    blocks = {f"{k}.mean": v.mean(dim=(2, 3)) for k, v in out.blocks.items()}
    return DetectorInput(data.name, out.logits, data.labels, out.features, blocks, 1.0, model,
                         data, tf, torch.device("cpu"), block_names=("b1", "b2"))


def _affine(key: str, m: np.ndarray) -> np.ndarray:
    a, b = MAPS[key]
    return m @ a.T + b


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _odin_expected(m: np.ndarray, t: float, eps: float) -> np.ndarray:
    p = _softmax(_affine("logits", m) / t)
    onehot = np.eye(3)[p.argmax(1)]
    grad = (p - onehot) @ MAPS["logits"][0] / t  # ∂(−log S_ŷ)/∂m
    assert (np.abs(grad) > 1e-9).all()  # no sign tie: the expectation is well defined
    m_step = m - eps * np.sign(grad) / np.array(STD)
    return _softmax(_affine("logits", m_step) / t).max(1)


def _gaussian(train_feats: np.ndarray, labels: np.ndarray):
    means = np.stack([train_feats[labels == c].mean(0) for c in range(3)])
    centred = train_feats - means[labels]
    return means, np.linalg.inv(centred.T @ centred / len(centred))


def _maha_expected(key: str, m: np.ndarray, train: DetectorInput, eps: float) -> np.ndarray:
    cached = train.features if key == "features" else train.blocks[f"{key}.mean"]
    means, prec = _gaussian(cached.double().numpy(), train.labels.numpy())

    def dist(f):
        diff = f[:, None, :] - means[None]
        return np.einsum("ncd,de,nce->nc", diff, prec, diff)

    f = _affine(key, m)
    closest = means[dist(f).argmin(1)]
    grad = 2 * (f - closest) @ prec @ MAPS[key][0]  # ∂ d²_closest / ∂m
    assert (np.abs(grad) > 1e-9).all()
    return -dist(_affine(key, m - eps * np.sign(grad) / np.array(STD))).min(1)


@pytest.fixture(scope="module")
def linear():
    model = _model()
    train, _ = _set(0, 90)
    test, m = _set(1, 40)
    return model, _input(train, model), _input(test, model), m


def _shared_forward(det_list, data: DetectorInput) -> list[np.ndarray]:
    """The pipeline's path: ONE forward with gradients per batch, shared by every detector."""
    model = data.model
    taps = tuple(sorted({t for d in det_list for t in d.grad_taps(data.block_names)}))
    for p in model.parameters():
        p.requires_grad_(False)
    x = data.transform(data.images.images).requires_grad_(True)
    with torch.enable_grad():
        out = model.forward_all(x, taps=taps)
        return [d.score_batch(x, out, data) for d in det_list]


@pytest.mark.parametrize(("t", "eps"), [(1000.0, 0.0014), (2.0, 0.05), (1.0, 0.0)])
def test_odin_matches_the_hand_derived_step_and_score(linear, t: float, eps: float) -> None:
    model, _, test, m = linear
    want = _odin_expected(m, t, eps)
    det = create("odin", T=t, epsilon=eps)
    np.testing.assert_allclose(det(test), want, rtol=1e-5)
    np.testing.assert_allclose(_shared_forward([det], test)[0], want, rtol=1e-5)
    if eps >= 0.05:  # the step moves the score well beyond the tolerance: the test has teeth
        assert np.abs(want - _odin_expected(m, t, 0.0)).min() > 1e-3


@pytest.mark.parametrize("layer", ["features", "b1"])
def test_mahalanobis_preprocessing_matches_the_hand_derived_step(linear, layer: str) -> None:
    model, train, test, m = linear
    det = create("mahalanobis", layer=layer, epsilon=0.05).fit(train)
    want = _maha_expected(layer, m, train, 0.05)
    np.testing.assert_allclose(det(test), want, rtol=1e-4)
    np.testing.assert_allclose(_shared_forward([det], test)[0], want, rtol=1e-4)
    assert np.abs(want - _maha_expected(layer, m, train, 0.0)).min() > 1e-3
    plain = create("mahalanobis", layer=layer).fit(train)
    np.testing.assert_allclose(plain(test), _maha_expected(layer, m, train, 0.0), rtol=1e-4)


def test_one_shared_forward_serves_several_gradient_detectors(linear) -> None:
    model, train, test, m = linear
    dets = [create("odin", T=2.0, epsilon=0.05),
            create("mahalanobis", layer="b1", epsilon=0.05).fit(train),
            create("mahalanobis", epsilon=0.05).fit(train)]
    got = _shared_forward(dets, test)  # retain_graph: each differentiates the same graph
    np.testing.assert_allclose(got[0], _odin_expected(m, 2.0, 0.05), rtol=1e-5)
    np.testing.assert_allclose(got[1], _maha_expected("b1", m, train, 0.05), rtol=1e-4)
    np.testing.assert_allclose(got[2], _maha_expected("features", m, train, 0.05), rtol=1e-4)


def test_odin_id_selection_keeps_given_apart_from_selected(linear) -> None:
    model, train, test, m = linear
    det = create("odin", selection="id", T="2", eps_grid=[0, 0.01, 0.05])
    det.select(test)
    # "id" keeps T and picks the ε with the highest mean in-distribution score
    best = max((0.0, 0.01, 0.05), key=lambda e: _odin_expected(m, 2.0, e).mean())
    assert det.given == {"selection": "id", "T": 2.0, "eps_grid": [0.0, 0.01, 0.05]}
    assert det.selected == {"epsilon": best}
    assert det.params["T"] == 2.0 and det.params["epsilon"] == best
    d = det.describe()
    assert d["given"] == det.given and d["selected"] == det.selected
    assert d["hparams"]["epsilon"] == best and d["selection"]["mode"] == "id"
    assert d["selection"]["validation"] == test.name


def test_ensemble_through_the_pipeline_path_none_and_fgsm(linear) -> None:
    """fit on train, select (equal weights / FGSM logistic regression), score: in-distribution
    inputs score higher than strongly shifted ones, and the record says what was used."""
    model, train, test, _ = linear
    shifted = _input(_set(2, 40, shift=150)[0], model)
    val = _input(_set(3, 60)[0], model)
    for mode in ("none", "fgsm"):
        det = create("mahalanobis-ensemble", selection=mode).fit(train)
        assert det.layers == ["b1", "b2"]
        det.select(val)
        rec = det.selection
        assert rec["mode"] == mode and rec["validation"] == val.name and rec["n"] == len(val)
        if mode == "fgsm":
            assert rec["negatives"] == f"fgsm({val.name})"
            assert set(rec["weights"]) == {"b1", "b2"}
        s_in, s_out = det(test), det(shifted)
        assert s_in.mean() > s_out.mean(), mode
        assert not det.uses_shared_forward


def test_ensemble_with_preprocessing_sums_each_layers_own_step(linear) -> None:
    """Without `select`, the ensemble is the plain sum of per-layer scores, each after the
    input step towards its own layer's closest class mean (block b2's mean = the features)."""
    model, train, test, m = linear
    det = create("mahalanobis-ensemble", selection="none", epsilon=0.05).fit(train)
    want = (_maha_expected("b1", m, train, 0.05) + _maha_expected("features", m, train, 0.05))
    assert det.grad_taps(test.block_names) == ("b1", "b2")
    np.testing.assert_allclose(det(test), want, rtol=1e-4)
    np.testing.assert_allclose(_shared_forward([det], test)[0], want, rtol=1e-4)
