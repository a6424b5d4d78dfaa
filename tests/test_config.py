"""Hostile benchmark YAML, run configs and loss options: each fails through the CLI with exit
code 2, a message naming the key (or option) and the fix, and nothing written; the valid
benchmark files still load."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.config import (
    BenchmarkConfig,
    OODSet,
    RunConfig,
    TrainConfig,
    default_ood_name,
    load_benchmark,
)
from oodbench.errors import OodbenchError
from oodbench.runs import Run

REPO = Path(__file__).resolve().parent.parent
DIGITS = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
runner = CliRunner()


def invoke(*args: Any):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def flat(text: str) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(text.split())


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def write_benchmark(tmp_path: Path, **changes: Any) -> Path:
    raw = copy.deepcopy(DIGITS)
    raw["train"]["epochs"] = 1
    for key, value in changes.items():
        if key.startswith("train."):
            raw["train"][key[len("train."):]] = value
        else:
            raw[key] = value
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_refused(tmp_path: Path, args: list[Any], *expected: str) -> str:
    """`oodbench ARGS` exits 2, its output holds every `expected` text, nothing is written."""
    before = tree(tmp_path)
    r = invoke(*args)
    out = flat(r.output)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for text in expected:
        assert text in out, f"{text!r} not in {out!r}"
    assert tree(tmp_path) == before  # no run folder, no cache, nothing
    return out


HOSTILE = [
    # types: a string is not a boolean, a scalar is not a list, words are not numbers
    ({"train.flip": "no"}, ["`train.flip` must be true or false, got 'no'", "flip: true"]),
    ({"losses": "softmax"}, ["`losses` must be a list of strings, got 'softmax'"]),
    ({"train.epochs": "ten"}, ["`train.epochs` must be an integer, got 'ten'"]),
    ({"train.batch_size": [64]}, ["`train.batch_size` must be an integer, got [64]"]),
    ({"train.lr": "fast"}, ["`train.lr` must be a number, got 'fast'"]),
    ({"train.epochs": True}, ["`train.epochs` must be an integer, got True"]),
    ({"seeds": 0}, ["`seeds` must be a list of integers"]),
    ({"ood": {"far": "gaussian"}}, ["`ood.far` must be a list"]),
    ({"ood": {"far": ["gaussian", "uniform", {"dataset": "patches", "adapt": "yes"}]}},
     ["`ood.far[2].adapt` must be true or false, got 'yes'"]),
    # unknown keys list the valid ones
    ({"ood": {"far": [{"dataset": "gaussian", "adpt": True}]}},
     ["`ood.far[0].adpt` is not a known key", "adapt, classes, dataset, name, split"]),
    ({"ood": {"middle": ["gaussian"]}}, ["`ood.middle` is not an OOD group", "far"]),
    ({"train.epoch": 3}, ["`train.epoch` is not a known key", "epochs"]),
    ({"detector": ["msp"]}, ["`detector` is not a known key", "detectors"]),
    # ranges
    ({"train.epochs": 0}, ["`train.epochs` must be >= 1, got 0"]),
    ({"train.batch_size": 1}, ["`train.batch_size` must be >= 2, got 1"]),
    ({"train.lr": 0}, ["`train.lr` must be > 0"]),
    ({"train.momentum": 1}, ["`train.momentum` must be in [0, 1), got 1.0"]),
    ({"train.weight_decay": -0.1}, ["`train.weight_decay` must be >= 0"]),
    ({"train.gamma": 0}, ["`train.gamma` must be > 0"]),
    ({"train.val_fraction": 1}, ["`train.val_fraction` must be in (0, 1), got 1.0"]),
    ({"train.milestones": [5, -1]}, ["`train.milestones[1]` must be >= 0, got -1"]),
    ({"train.checkpoint_seconds": -1}, ["`train.checkpoint_seconds` must be >= 0"]),
    ({"train.crop_padding": -1}, ["`train.crop_padding` must be >= 0"]),
    ({"seeds": []}, ["`seeds` is empty"]),
    ({"seeds": [0, -1]}, ["`seeds[1]` must be >= 0, got -1"]),
    ({"train.schedule": "linear"}, ["`train.schedule` must be one of cosine, onecycle"]),
    # names are not paths
    ({"name": "../../x"}, ["`name` '../../x' is not a plain name", "letters, digits"]),
    ({"name": "/abs/path"}, ["`name` '/abs/path' is not a plain name"]),
    ({"name": "a/b"}, ["`name` 'a/b' is not a plain name"]),
    ({"name": "."}, ["`name` '.' is not a plain name"]),
    ({"name": ".."}, ["`name` '..' is not a plain name"]),
    ({"ood": {"far": [{"dataset": "gaussian", "name": "../../escape"}]}},
     ["`ood.far[0].name` '../../escape' is not a plain name"]),
    # an OOD set named like the in-distribution set (an IndexError later, before)
    ({"ood": {"far": [{"dataset": "digits", "split": "train"}]}},
     ["`ood.far[0]` is named 'digits', like the in-distribution dataset", "distinct `name:`"]),
    ({"ood": {"far": ["gaussian", {"dataset": "uniform", "name": "gaussian"}]}},
     ["OOD set names repeat: ['gaussian']", "distinct `name:`"]),
]


@pytest.mark.parametrize("changes,expected", HOSTILE)
def test_hostile_benchmark_exits_2_naming_the_key_and_writes_nothing(tmp_path, changes,
                                                                      expected):
    path = write_benchmark(tmp_path, **changes)
    out = assert_refused(tmp_path, ["train", "--benchmark", path], *expected)
    assert str(path) in out.replace(" ", "")  # the message names the file (however wrapped)


def test_bad_epochs_on_the_command_line_then_a_good_one(tiny_benchmark, tmp_path):
    assert_refused(tmp_path, ["train", "--benchmark", tiny_benchmark, "--epochs", -1],
                   "`train.epochs` must be >= 1, got -1", "--epochs")
    r = invoke("train", "--benchmark", tiny_benchmark, "--epochs", 1, "--loss", "softmax")
    assert r.exit_code == 0, r.output
    run = Run(tmp_path / "runs" / "tiny-digits" / "softmax-seed0")
    assert run.is_trained() and run.config().benchmark.train.epochs == 1


def test_bad_seed_on_the_command_line_writes_nothing(tiny_benchmark, tmp_path):
    assert_refused(tmp_path, ["train", "--benchmark", tiny_benchmark, "--seed", -1],
                   "`seed` must be >= 0, got -1")


@pytest.mark.parametrize("option,expected", [
    ("alpha=abc", ["loss 'dismax': option 'alpha' must be a number >= 0, got 'abc'",
                   "alpha=1.0"]),
    ("alpha=-1", ["option 'alpha' must be a number >= 0, got -1"]),
    ("fpr=1", ["option 'fpr' must be true or false, got 1"]),
    ("entropic_scale=0", ["option 'entropic_scale' must be a number > 0, got 0"]),
    ("nosuch=1", ["loss 'dismax' has no option 'nosuch'",
                  "alpha (a number >= 0, default 1.0)", "entropic_scale", "fpr"]),
])
def test_bad_loss_option_exits_2_before_the_run_folder(tiny_benchmark, tmp_path, option,
                                                       expected):
    assert_refused(tmp_path, ["train", "--benchmark", tiny_benchmark, "--loss", "dismax",
                              "-o", option], *expected)


def test_bad_loss_option_in_the_benchmark_exits_2(tmp_path):
    path = write_benchmark(tmp_path, loss_options={"dismax": {"alpha": "fast"}})
    assert_refused(tmp_path, ["train", "--benchmark", path, "--loss", "dismax"],
                   "option 'alpha' must be a number >= 0, got 'fast'")
    path = write_benchmark(tmp_path, loss_options={"dismax": "fast"})
    assert_refused(tmp_path, ["train", "--benchmark", path, "--loss", "dismax"],
                   "`loss_options.dismax` must be a mapping")


def test_hand_edited_run_config_exits_2_not_a_traceback(tiny_benchmark, tmp_path):
    run_dir = tmp_path / "runs" / "edited"
    run = Run.create(run_dir, RunConfig(load_benchmark(str(tiny_benchmark)), "softmax", 0))
    raw = yaml.safe_load(run.config_path.read_text())
    raw["benchmark"]["train"]["epochs"] = "ten"
    run.config_path.write_text(yaml.safe_dump(raw))
    out = assert_refused(tmp_path, ["train", "--run-dir", run_dir],
                         "`benchmark.train.epochs` must be an integer, got 'ten'")
    assert str(run.config_path) in out.replace(" ", "")
    raw["benchmark"]["train"]["epochs"] = 1
    raw["seed"] = "zero"
    run.config_path.write_text(yaml.safe_dump(raw))
    assert_refused(tmp_path, ["train", "--run-dir", run_dir], "`seed` must be an integer")
    raw["seed"], raw["extra"] = 0, 1
    run.config_path.write_text(yaml.safe_dump(raw))
    assert_refused(tmp_path, ["train", "--run-dir", run_dir], "`extra` is not a known key",
                   "benchmark, loss, loss_options, seed")


SHIPPED = sorted(p for d in ("oodbench/benchmarks", "benchmarks/study", "benchmarks/paper")
                 for p in (REPO / d).glob("*.yaml"))  # not results/: run configs


@pytest.mark.parametrize("path", SHIPPED,
                         ids=lambda p: p.stem)
def test_every_shipped_benchmark_loads_and_round_trips(path):
    bench = load_benchmark(str(path))
    assert bench.name == path.stem
    cfg = RunConfig(bench, bench.losses[0], bench.seeds[0])
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_accepted_spellings_are_converted():
    raw = copy.deepcopy(DIGITS)
    raw["train"].update(lr=1, weight_decay="5e-4", flip=False, warmup_epochs=2)
    bench = BenchmarkConfig.from_dict(raw)
    t = bench.train
    assert (t.lr, t.weight_decay, t.warmup_epochs, t.flip) == (1.0, 0.0005, 2.0, False)
    assert isinstance(t.lr, float)
    unquoted = yaml.safe_load("flip: no")  # YAML 1.1: a real boolean, accepted
    assert BenchmarkConfig.from_dict({**DIGITS, "train": unquoted}).train.flip is False


def test_folder_dataset_gets_a_plain_default_name():
    assert default_ood_name("folder:/data/my images/") == "folder-my-images"
    assert default_ood_name("folder:../x") == "folder-x"
    assert default_ood_name("folder:") == "folder"
    assert default_ood_name("svhn") == "svhn"
    bench = BenchmarkConfig.from_dict(
        {**DIGITS, "ood": {"far": ["folder:../../imgs", {"dataset": "folder:/a/b",
                                                          "name": "mine"}]}})
    assert [o.name for o in bench.ood] == ["folder-imgs", "mine"]


def test_in_process_errors_name_the_source_and_key_path():
    with pytest.raises(OodbenchError) as e:
        BenchmarkConfig.from_dict({**DIGITS, "train": {"epochs": "ten"}}, "b.yaml")
    assert e.value.message == "b.yaml: `train.epochs` must be an integer, got 'ten' (str)"
    assert e.value.hint == "write e.g. `epochs: 30`"
    with pytest.raises(OodbenchError, match="`in_distribution.clases` is not a known key"):
        BenchmarkConfig.from_dict({**DIGITS, "in_distribution": {"dataset": "digits",
                                                                 "clases": [1]}})
    with pytest.raises(OodbenchError, match="`in_distribution` is missing"):
        BenchmarkConfig.from_dict({k: v for k, v in DIGITS.items() if k != "in_distribution"})
    with pytest.raises(OodbenchError, match=r"`train.lr` must be a number, got nan"):
        BenchmarkConfig.from_dict({**DIGITS, "train": {"lr": float("nan")}})


@pytest.mark.parametrize("key,value,hint", [
    ("losses", "softmax", "write e.g. `losses: [softmax]`"),
    ("seeds", 3, "write e.g. `seeds: [3]`"),
    ("ood", {"far": "gaussian"}, "write a YAML list, e.g. `far: [gaussian]`"),
])
def test_a_scalar_where_a_list_is_expected_is_refused_with_the_list_form(key, value, hint):
    # (checked in process: the CLI prints messages as rich markup, which eats `[softmax]`)
    with pytest.raises(OodbenchError, match="must be a list") as e:
        BenchmarkConfig.from_dict({**DIGITS, key: value})
    assert e.value.hint == hint


def test_direct_construction_is_checked_by_validate():
    with pytest.raises(OodbenchError, match=r"`train.momentum` must be in \[0, 1\)"):
        TrainConfig(momentum=1.5).validate()
    bench = load_benchmark("digits")
    bench.ood.append(OODSet(dataset="gaussian", name="a/b"))
    with pytest.raises(OodbenchError, match=r"`ood.far\[3\].name` 'a/b' is not a plain name"):
        bench.validate()
