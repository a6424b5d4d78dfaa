import re
from pathlib import Path

import pytest

import oodbench
from oodbench.data import DATASETS
from oodbench.detectors import DETECTORS
from oodbench.errors import OodbenchError, UnknownNameError
from oodbench.losses import LOSSES
from oodbench.models import MODELS
from oodbench.models.pretrained import CHECKPOINT_FORMATS
from oodbench.registry import Registry
from oodbench.render import OUTPUT_FORMATS

SOURCE = "\n".join(p.read_text(encoding="utf-8")
                   for p in sorted(Path(oodbench.__file__).parent.rglob("*.py")))


def test_unknown_name_lists_valid_ones():
    reg: Registry[int] = Registry("widget", entry=lambda value: value)
    reg.register("b")(2)
    reg.register("a")(1)
    with pytest.raises(UnknownNameError) as e:
        reg.get("c")
    assert "unknown widget 'c'" in str(e.value)
    assert "a, b" in str(e.value)
    assert isinstance(e.value, OodbenchError)


def test_double_registration_is_refused():
    reg: Registry[int] = Registry("widget", entry=lambda value: value)
    reg.register("a")(1)
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(2)


def test_decorator_returns_the_member_and_stores_the_entry():
    reg: Registry[tuple] = Registry("widget", entry=lambda f, **meta: ("spec", f, meta))

    @reg.register("double", size=3)
    def double(x: int) -> int:
        return 2 * x

    assert double(4) == 8  # the decorated function itself is unchanged
    assert reg.get("double") == ("spec", double, {"size": 3})


def test_default_entry_sets_metadata_as_attributes():
    reg: Registry[type] = Registry("widget")

    @reg.register("plain", summary="a plain widget")
    class Plain:
        summary = ""

    assert reg.get("plain") is Plain
    assert Plain.summary == "a plain widget"


def test_model_and_loss_registrations_build_their_specs():
    spec = MODELS.get("smallcnn8")
    assert spec.image_sizes == (8,)
    assert spec.block_activations == ("relu", "logsoftmax")
    assert spec.build(1, 8).feature_dim == 128
    assert MODELS.get("densenet100").block_activations == ("relu",)
    loss = LOSSES.get("logsoftmax-resnet")
    assert loss.block_activation == "logsoftmax"
    assert loss.head.__name__ == "Linear"
    # one criterion class registered twice, with different heads
    assert LOSSES.get("isomax").criterion is LOSSES.get("isomaxplus").criterion
    assert LOSSES.get("isomax").head.__name__ == "IsoMaxHead"
    assert LOSSES.get("isomaxplus").head.__name__ == "IsoMaxPlusHead"
    assert type(DATASETS.get("digits")).__name__ == "Digits"  # an instance of the class
    assert CHECKPOINT_FORMATS.get("akamaster").models == (
        "resnet20", "resnet32", "resnet44", "resnet56")


@pytest.mark.parametrize("registry,members", [
    (LOSSES, {"softmax", "dismax", "isomax", "isomaxplus", "logsoftmax-resnet"}),
    (DETECTORS, {"msp", "maxlogit", "entropy", "energy", "mmles"}),
    (MODELS, {"smallcnn8", "resnet18", "resnet34", "resnet20", "resnet56", "wrn28-10"}),
    (DATASETS, {"digits", "patches", "gaussian", "uniform", "mnist", "cifar10", "svhn"}),
    (CHECKPOINT_FORMATS, {"akamaster"}),
    (OUTPUT_FORMATS, {"rich", "markdown", "csv", "json"}),
])
def test_foundation_members_are_registered(registry, members):
    assert members <= set(registry.names())


def _not_literal(registry: Registry) -> list[str]:
    """Names with no `.register("name"` in the source: built at run time, so grep misses them."""
    return [n for n in registry.names()
            if not re.search(r"\.register\(\s*([\"'])" + re.escape(n) + r"\1", SOURCE)]


@pytest.mark.parametrize("registry", [MODELS, LOSSES, DATASETS, CHECKPOINT_FORMATS,
                                      OUTPUT_FORMATS], ids=lambda r: r.kind)
def test_every_name_is_registered_literally(registry):
    assert _not_literal(registry) == []


def test_every_detector_name_is_registered_literally():
    assert _not_literal(DETECTORS) == []


DIGITS = {"name": "t", "in_distribution": "digits", "model": "smallcnn8", "losses": ["softmax"],
          "detectors": ["msp"], "ood": {"far": ["gaussian"]}}


@pytest.mark.parametrize("key,value,message", [
    ("model", "resnet99", "unknown model 'resnet99'"),
    ("in_distribution", "digitz", "unknown dataset 'digitz'"),
    ("losses", ["softmax", "nope"], "unknown loss 'nope'"),
    ("detectors", ["msp", "nope"], "unknown detector 'nope'"),
    ("ood", {"far": ["gaussian", "nope"]}, "unknown dataset 'nope'"),
    ("ood", {"far": ["folder:"]}, "`folder:` needs a path"),
    ("normalization", {"mean": [0.5, 0.5, 0.5], "std": [1, 1, 1]}, "with 1 value(s) each"),
])
def test_check_benchmark_rejects_unknown_names(key, value, message):
    from oodbench.config import BenchmarkConfig
    from oodbench.experiment import check_benchmark

    bench = BenchmarkConfig.from_dict({**DIGITS, key: value})  # config alone does not look up
    with pytest.raises(OodbenchError) as e:
        check_benchmark(bench)
    assert message in e.value.message


def test_check_benchmark_accepts_a_valid_one_and_checks_the_run_loss():
    from oodbench.config import BenchmarkConfig, RunConfig
    from oodbench.experiment import check_benchmark, check_run_config

    bench = BenchmarkConfig.from_dict({**DIGITS, "normalization": {"mean": [0.1], "std": [2]}})
    assert check_benchmark(bench) is bench
    run = RunConfig(bench, "softmax", 0)
    assert check_run_config(run) is run
    with pytest.raises(UnknownNameError, match="unknown loss 'nope'"):
        check_run_config(RunConfig(bench, "nope", 0))


def test_load_checked_benchmark(tmp_path):
    import yaml

    from oodbench.experiment import load_checked_benchmark

    assert load_checked_benchmark("digits").dataset == "digits"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**DIGITS, "detectors": ["msp", "nope"]}))
    with pytest.raises(UnknownNameError, match="unknown detector 'nope'") as e:
        load_checked_benchmark(str(path))
    assert "maxlogit" in (e.value.hint or "")  # the valid names are listed
    with pytest.raises(UnknownNameError, match="unknown benchmark 'no-such-benchmark'"):
        load_checked_benchmark("no-such-benchmark")


def test_config_structural_checks_need_no_registry():
    from oodbench.config import BenchmarkConfig

    with pytest.raises(OodbenchError, match="std > 0"):
        BenchmarkConfig.from_dict({**DIGITS, "normalization": {"mean": [0.5], "std": [0]}})
    with pytest.raises(OodbenchError, match="std > 0"):
        BenchmarkConfig.from_dict({**DIGITS, "normalization": {"mean": [0.5]}})
    with pytest.raises(OodbenchError, match="OOD set names repeat"):
        BenchmarkConfig.from_dict({**DIGITS, "ood": {"far": ["gaussian", "gaussian"]}})


def test_the_readme_detector_table_is_generated_from_the_detectors():
    """The README's table equals `oodbench list detectors --markdown`: docs never drift."""
    from oodbench.catalog import detector_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- detector-table:start -->\n") + len("<!-- detector-table:start -->\n")
    end = readme.index("<!-- detector-table:end -->")
    assert readme[start:end] == detector_markdown(), (
        "regenerate it: oodbench list detectors --markdown")


def test_linear_head_detectors_are_na_on_prototype_losses():
    from oodbench.catalog import applicability, head_kind

    assert head_kind("softmax") == "linear" and head_kind("dismax") == "prototype"
    assert applicability(DETECTORS.get("react"), "dismax") == "n/a"
    assert applicability(DETECTORS.get("react"), "softmax") == "✓"
    assert applicability(DETECTORS.get("knn"), "dismax") == "✓"
