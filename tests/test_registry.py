import pytest

from oodbench.data import DATASETS
from oodbench.detectors import DETECTORS
from oodbench.errors import OodbenchError, UnknownNameError
from oodbench.losses import LOSSES
from oodbench.models import MODELS
from oodbench.registry import Registry


def test_unknown_name_lists_valid_ones():
    reg: Registry[int] = Registry("widget")
    reg.add("b", 2)
    reg.add("a", 1)
    with pytest.raises(UnknownNameError) as e:
        reg.get("c")
    assert "unknown widget 'c'" in str(e.value)
    assert "a, b" in str(e.value)
    assert isinstance(e.value, OodbenchError)


def test_double_registration_is_refused():
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1)
    with pytest.raises(ValueError):
        reg.add("a", 2)


@pytest.mark.parametrize("registry,members", [
    (LOSSES, {"softmax", "dismax"}),
    (DETECTORS, {"msp", "maxlogit", "entropy", "energy", "mmles"}),
    (MODELS, {"smallcnn8", "resnet18", "resnet34"}),
    (DATASETS, {"digits", "patches", "gaussian", "uniform"}),
])
def test_foundation_members_are_registered(registry, members):
    assert members <= set(registry.names())
