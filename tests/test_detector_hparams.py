"""Typed hyperparameters, the given / selected / effective split, `required_outputs` per family,
literal registrations, and the Mahalanobis statistics following the input's device."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from oodbench.detectors import DETECTORS, DetectorInput, create
from oodbench.detectors.base import Detector, HParam
from oodbench.detectors.mahalanobis import ClassGaussian
from oodbench.errors import OodbenchError

BLOCKS = ("block1", "block2", "block3")


def test_strings_are_coerced_to_the_declared_type() -> None:
    det = create("mahalanobis", epsilon="1e-3", search_samples="200", eps_grid=[0, "1e-3"])
    assert det.params["epsilon"] == 0.001 and type(det.params["epsilon"]) is float
    assert det.params["search_samples"] == 200 and type(det.params["search_samples"]) is int
    assert det.params["eps_grid"] == [0.0, 0.001]
    assert all(type(e) is float for e in det.params["eps_grid"])
    assert create("energy", T=2).params["T"] == 2.0  # an int is a valid float
    assert create("odin", batch_size=64.0).params["batch_size"] == 64  # integral float


@pytest.mark.parametrize("name", ["energy", "odin"])
@pytest.mark.parametrize("value", ["abc", 0, -1, 0.0, "nan", "inf", True, None])
def test_bad_temperatures_are_refused_naming_parameter_and_range(name: str, value) -> None:
    with pytest.raises(OodbenchError) as e:
        create(name, T=value)
    assert e.value.message == f"{name}.T must be a float > 0, got {value!r}"
    assert e.value.hint and f"{name}.T=" in e.value.hint


@pytest.mark.parametrize(("name", "hp", "msg"), [
    ("odin", {"eps_grid": [0, "abc"]}, "odin.eps_grid must be a non-empty list of floats, "
                                       "each >= 0, got [0, 'abc']"),
    ("odin", {"eps_grid": []}, "odin.eps_grid must be a non-empty list"),
    ("odin", {"eps_grid": 0.1}, "odin.eps_grid must be a non-empty list"),
    ("odin", {"T_grid": [1, 0]}, "odin.T_grid must be a non-empty list of floats, each > 0"),
    ("odin", {"epsilon": -0.01}, "odin.epsilon must be a float >= 0, got -0.01"),
    ("mahalanobis", {"eps_grid": [-1e-3]}, "mahalanobis.eps_grid must be"),
    ("mahalanobis", {"shrinkage": -1}, "mahalanobis.shrinkage must be a float >= 0"),
    ("mahalanobis", {"layer": ""}, "mahalanobis.layer must be a non-empty string"),
    ("mahalanobis", {"layer": 3}, "mahalanobis.layer must be a non-empty string"),
    ("mahalanobis-ensemble", {"search_samples": 0}, "search_samples must be an int >= 1"),
    ("mahalanobis-ensemble", {"batch_size": 2.5}, "batch_size must be an int >= 1"),
    ("mahalanobis-ensemble", {"batch_size": True}, "batch_size must be an int >= 1"),
    ("mahalanobis-ensemble", {"selection": "id"}, "selection must be one of 'none', 'fgsm'"),
    ("intermediate-misp", {"layer": ""}, "intermediate-misp.layer must be a non-empty"),
])
def test_bad_values_are_refused(name: str, hp: dict, msg: str) -> None:
    with pytest.raises(OodbenchError, match=re.escape(msg)):
        create(name, **hp)


def test_hparam_spec_rejects_its_own_bad_default_and_plain_dict_specs() -> None:
    with pytest.raises(ValueError):
        HParam(0.0, float, gt=0)
    with pytest.raises(TypeError, match="must be HParam"):
        type("Bad", (Detector,), {"hparams": {"T": 1.0}})
    assert HParam(True, bool).coerce("false") is False


def test_every_detector_declares_typed_hparams_with_valid_defaults() -> None:
    for name, cls in DETECTORS.items():
        assert all(isinstance(h, HParam) for h in cls.hparams.values()), name
        det = cls()
        assert det.given == {} and det.selected == {}, name
        d = det.describe()
        assert set(d) == {"hparams", "given", "selected", "selection"}, name
        assert d["hparams"] == {n: (list(h.default) if h.type is list else h.default)
                                for n, h in cls.hparams.items()}, name


def test_given_is_kept_apart_from_defaults_and_params_is_a_copy() -> None:
    det = create("odin", T="10", eps_grid=[0, 0.001])
    assert det.given == {"T": 10.0, "eps_grid": [0.0, 0.001]}
    det.params["eps_grid"].append(5.0)  # mutating the effective view changes nothing
    assert det.params["eps_grid"] == [0.0, 0.001] and det.params["epsilon"] == 0.0014
    assert create("odin").params["eps_grid"][0] == 0.0


@pytest.mark.parametrize(("name", "hp", "want"), [
    ("msp", {}, {"logits"}),
    ("energy", {}, {"logits"}),
    ("mmleps", {}, {"logits"}),
    ("odin", {}, set()),
    ("odin", {"selection": "fgsm"}, set()),
    ("mahalanobis", {}, {"features"}),
    ("mahalanobis", {"epsilon": 0.001}, {"features"}),
    ("mahalanobis", {"layer": "block2"}, {"block2.mean"}),
    ("mahalanobis", {"layer": "block2", "epsilon": 0.001}, {"block2.mean"}),
    ("mahalanobis-ensemble", {}, {"block1.mean", "block2.mean", "block3.mean"}),
    ("intermediate-misp", {}, {"block3.softmax"}),
    ("intermediate-msp-max", {"layer": "block1"}, {"block1.softmax"}),
    ("intermediate-misp-mean", {"layer": "last"}, {"block3.softmax"}),
])
def test_required_outputs_name_exactly_what_is_read(name: str, hp: dict, want: set) -> None:
    assert create(name, **hp).required_outputs(BLOCKS) == frozenset(want)


@pytest.mark.parametrize(("name", "hp"), [("mahalanobis", {"layer": "block9"}),
                                          ("intermediate-misp", {"layer": "block9"})])
def test_required_outputs_refuse_an_unknown_block_listing_the_valid_ones(name, hp) -> None:
    with pytest.raises(OodbenchError, match=r"no block 'block9'") as e:
        create(name, **hp).required_outputs(BLOCKS)
    assert "block1" in str(e.value.hint) and "block3" in str(e.value.hint)


@pytest.mark.parametrize("name", ["mahalanobis-ensemble", "intermediate-misp"])
def test_required_outputs_refuse_a_model_without_blocks(name: str) -> None:
    with pytest.raises(OodbenchError, match="named blocks"):
        create(name).required_outputs(())


def test_grad_taps_and_shared_forward_flags() -> None:
    assert create("odin").uses_shared_forward and create("odin").grad_taps(BLOCKS) == ()
    assert not create("mahalanobis").uses_shared_forward
    maha = create("mahalanobis", layer="block2", epsilon=0.001)
    assert maha.uses_shared_forward and maha.grad_taps(BLOCKS) == ("block2",)
    assert create("mahalanobis", epsilon=0.001).grad_taps(BLOCKS) == ()
    assert not create("mahalanobis-ensemble").uses_shared_forward
    ens = create("mahalanobis-ensemble", epsilon=0.001)
    assert ens.uses_shared_forward and ens.grad_taps(BLOCKS) == BLOCKS
    assert not create("msp").uses_shared_forward and create("msp").grad_taps(BLOCKS) == ()


def test_last_layer_follows_block_names_not_dict_order() -> None:
    stats = {"b2.softmax": torch.rand(4, 9), "b1.softmax": torch.rand(4, 9)}
    data = DetectorInput("x", None, torch.zeros(4, dtype=torch.long), blocks=stats,
                         block_names=("b1", "b2"))
    col = 1 * 3 + 1  # "min-misp": SOFTMAX_STATS = (max,min,mean)-msp, then (max,min,mean)-misp
    np.testing.assert_array_equal(create("intermediate-misp")(data),
                                  -stats["b2.softmax"][:, col].double().numpy())
    no_names = DetectorInput("x", None, data.labels, blocks=stats)  # falls back to dict order
    np.testing.assert_array_equal(create("intermediate-misp")(no_names),
                                  -stats["b1.softmax"][:, col].double().numpy())


def test_mahalanobis_statistics_follow_the_input_device() -> None:
    """The bug: fitted statistics stayed on the CPU, so a CUDA input failed. A meta-device input
    fails the same way without a GPU."""
    rng = np.random.default_rng(0)
    means, whiten = (torch.from_numpy(rng.normal(size=s)) for s in ((3, 4), (4, 4)))
    gauss = ClassGaussian(means, whiten)
    x = torch.empty(5, 4, device="meta", requires_grad=True)
    d = gauss.distances(x)
    assert d.device.type == "meta" and d.shape == (5, 3) and d.requires_grad
    assert means.device.type == "cpu"  # the CPU statistics themselves are untouched
    q = rng.normal(size=(5, 4))
    z, m = q @ whiten.numpy(), means.numpy() @ whiten.numpy()
    want = ((z[:, None, :] - m[None]) ** 2).sum(-1)
    np.testing.assert_allclose(gauss.distances(torch.from_numpy(q)).numpy(), want, rtol=1e-12)


def test_the_readme_adding_a_detector_example_works() -> None:
    class MyScore(Detector):
        summary = "what it measures"
        needs = frozenset({"logits"})
        hparams = {"T": HParam(1.0, float, gt=0, doc="temperature")}

        def score(self, data):
            return (data.logits / self.params["T"]).logsumexp(1).numpy()

    logits = torch.tensor([[0.0, np.log(3.0)]])
    data = DetectorInput("x", logits, torch.zeros(1, dtype=torch.long))
    np.testing.assert_allclose(MyScore(T="1")(data), [np.log(4.0)], rtol=1e-6)
    assert MyScore().required_outputs(()) == {"logits"}
    with pytest.raises(OodbenchError, match=r"MyScore\.T must be a float > 0, got -2"):
        MyScore(T=-2)


def test_a_list_may_be_given_comma_separated_and_the_hint_is_accepted() -> None:
    """`-p odin.eps_grid=0,0.001` reaches the detector as the YAML string "0,0.001"; and the
    value a refusal suggests must itself be accepted (it once suggested this form and refused
    it)."""
    import yaml

    assert create("odin", eps_grid=yaml.safe_load("0,0.001")).params["eps_grid"] == [0.0, 0.001]
    with pytest.raises(OodbenchError) as e:
        create("odin", eps_grid="0,abc")
    hint = e.value.hint
    value = hint.split("-p odin.eps_grid=")[1].split(" ")[0]
    assert create("odin", eps_grid=yaml.safe_load(value)).params["eps_grid"] == [
        0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2]
