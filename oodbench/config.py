"""Benchmark and run configuration: dataclasses read from YAML (safe_load) and validated.

Only parsing, types and structural checks live here; whether the names a benchmark uses (model,
losses, detectors, datasets) exist is checked by `oodbench.experiment.check_benchmark`, so this
module stays below every registry.

A benchmark YAML names the in-distribution set, the model, the losses, the detectors, the OOD
sets grouped near / far, the training schedule and the seeds. A run's config is the benchmark
resolved for one loss and one seed; it is written into the run folder so every later step reads
only the run folder.

Every field is checked against its declared type (the dataclass annotations are the schema), so a
hand-written YAML fails with one message naming the file, the key path (`train.epochs`,
`ood.far[2].adapt`), the expected type and the value received, never a `TypeError` later:

* int: a YAML integer (not a boolean); float: a number (integers accepted; strings such as
  "5e-4", which YAML 1.1 reads as text, accepted when they are a plain decimal number); bool: a
  real YAML boolean only (`"no"` is an error, not "on"); str: a string.
* Lists must be YAML lists: a bare scalar where a list is expected (`losses: softmax`,
  `far: gaussian`) is an error whose hint shows the list form. One rule everywhere, no guessing.
* Unknown keys are errors listing the valid ones; ranges (epochs >= 1, 0 <= momentum < 1, ...)
  are declared next to the fields (`RANGES`).
* Names that become folder or file names (the benchmark's `name`, each OOD set's `name`) must be
  plain names (`NAME_RULE`), never paths. An OOD entry without `name` takes its dataset's name;
  for `folder:PATH` datasets it takes `folder-<last path component, sanitised>`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, NoReturn, Union, get_args, get_origin, get_type_hints

import yaml

from oodbench.errors import OodbenchError

BENCHMARK_DIRS_ENV = "OODBENCH_BENCHMARKS"
# The built-in benchmarks ship inside the package (package data), so `oodbench run` finds
# `digits` in an empty folder however oodbench was installed (a wheel, a git URL, -e).
BUILTIN_BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_RULE = ("letters, digits, '-', '_' and '.' only, starting with a letter or digit "
             "(no '/': it becomes a folder or file name)")
FOLDER_PREFIX = "folder:"  # mirrors oodbench.data.folders (config may not import data)
_DECIMAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_CLI_FLAGS = {"epochs": "--epochs"}


@dataclass(frozen=True)
class Range:
    """An allowed interval for a number (or for each number of a list)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, v: float) -> bool:
        return not ((self.low is not None and (v <= self.low if self.low_open else v < self.low))
                    or (self.high is not None
                        and (v >= self.high if self.high_open else v > self.high)))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


NON_NEGATIVE, POSITIVE = Range(0), Range(0, low_open=True)


def is_plain_name(name: object) -> bool:
    """Whether `name` is safe as one folder / file name component (see NAME_RULE)."""
    return isinstance(name, str) and bool(NAME_PATTERN.match(name))


def default_ood_name(dataset: str) -> str:
    """An OOD entry's name when it gives none: the dataset's name, or for a `folder:PATH`
    dataset `folder-<last component of PATH>` made plain, since a path is not a name."""
    if not dataset.startswith(FOLDER_PREFIX):
        return dataset
    last = Path(dataset[len(FOLDER_PREFIX):].rstrip("/\\")).name
    plain = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.")
    return f"folder-{plain}" if plain else "folder"


# ---------------------------------------------------------------------------------------------
# The schema check: dataclass annotations are the types, class-level RANGES / CHOICES /
# NON_EMPTY / NAMES the constraints.


def _fail(source: str, where: str, problem: str, hint: str) -> NoReturn:
    prefix = f"{source}: " if source else ""
    raise OodbenchError(f"{prefix}`{where}` {problem}", hint)


def _join(prefix: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else key


def _shown(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _yaml(value: Any) -> str:
    """A value as the user would write it in YAML (for hints)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, UnionType) and type(None) in get_args(tp):
        rest = [a for a in get_args(tp) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return tp, False


_SCALARS = {int: ("an integer", "integers", 1), float: ("a number", "numbers", 0.1),
            bool: ("true or false", "booleans", True), str: ("a string", "strings", "name")}


def describe(tp: Any) -> str:
    """'an integer', 'a list of strings', ... for messages."""
    tp, optional = _unwrap_optional(tp)
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp)
        text = f"a list of {_SCALARS[item][1]}" if item in _SCALARS else "a list"
    elif tp is dict or origin is dict:
        text = "a mapping"
    else:
        text = _SCALARS[tp][0] if tp in _SCALARS else getattr(tp, "__name__", str(tp))
    return f"{text} (or null)" if optional else text


def _example(tp: Any, value: Any, default: Any) -> str:
    """What to write instead, for the hint: the default when there is one, else a sample; a
    scalar given where a list is expected is shown wrapped in a list."""
    tp, _ = _unwrap_optional(tp)
    if get_origin(tp) is list:
        if not isinstance(value, (list, tuple, dict)) and value is not None:
            return _yaml([value])
        (item,) = get_args(tp)
        return _yaml(default) if default else _yaml([_SCALARS.get(item, ("", "", 0))[2]])
    if tp in _SCALARS:
        return _yaml(default if isinstance(default, tp) else _SCALARS[tp][2])
    return "{key: value}"


def _scalar(value: Any, tp: type) -> Any:
    """`value` as type `tp`, or raise ValueError."""
    if tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _DECIMAL.match(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
                value):
            return float(value)
    elif tp is Any:
        return value
    raise ValueError(tp)


def coerce(value: Any, tp: Any, where: str, source: str = "", default: Any = None) -> Any:
    """`value` checked against the annotation `tp` (and converted: int → float, "5e-4" → 5e-4,
    tuple → list); an OodbenchError naming `where`, the expected type and the value if not."""
    inner, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    origin = get_origin(inner)
    key = where.rsplit(".", 1)[-1]
    try:
        if origin is list and isinstance(value, (list, tuple)):
            (item,) = get_args(inner)
            return [coerce(v, item, _join(where, i), source) for i, v in enumerate(value)]
        if (origin is dict or inner is dict) and isinstance(value, dict):
            kt, vt = get_args(inner) or (Any, Any)
            return {coerce(k, kt, where, source): coerce(v, vt, _join(where, str(k)), source)
                    for k, v in value.items()}
        if origin is None and inner is not dict:
            return _scalar(value, inner)
    except ValueError:
        pass
    hint = (f"write `{key}: true` or `{key}: false` (unquoted)" if inner is bool
            else f"write e.g. `{key}: {_example(tp, value, default)}`")
    _fail(source, where, f"must be {describe(tp)}, got {_shown(value)}", hint)


def _check_constraints(cls: type, name: str, value: Any, where: str, source: str) -> None:
    """The declared range (of a number, or of each number of a list), choices, non-emptiness
    and plain-name rule of one field."""
    if value is None:
        return
    rng = getattr(cls, "RANGES", {}).get(name)
    for i, v in enumerate(value if isinstance(value, list) else [value]):
        if rng is not None and not rng.holds(v):
            at = _join(where, i) if isinstance(value, list) else where
            flag = f" (or the {_CLI_FLAGS[name]} option)" if name in _CLI_FLAGS else ""
            what = f"every entry of `{name}`" if isinstance(value, list) else f"`{name}`{flag}"
            _fail(source, at, f"must be {rng}, got {v!r}",
                  f"make {what} {describe(type(v))} {rng}")
    choices = getattr(cls, "CHOICES", {}).get(name)
    if choices and value not in choices:
        _fail(source, where, f"must be one of {', '.join(choices)}, got {value!r}",
              f"write e.g. `{name}: {choices[0]}`")
    if name in getattr(cls, "NON_EMPTY", ()) and not value:
        _fail(source, where, "is empty", f"list at least one value, e.g. `{name}: "
              f"{_example(get_type_hints(cls)[name], None, None)}`, or leave the key out "
              "where it is optional")
    if name in getattr(cls, "NAMES", ()) and not is_plain_name(value):
        _fail(source, where, f"{value!r} is not a plain name", f"use {NAME_RULE}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def check_fields(obj: Any, prefix: str, source: str, skip: tuple[str, ...] = ()) -> None:
    """Check (and normalise in place) every field of the dataclass instance `obj`."""
    cls = type(obj)
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        where = _join(prefix, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        value = coerce(getattr(obj, f.name), _hints(cls)[f.name], where, source, default)
        _check_constraints(cls, f.name, value, where, source)
        setattr(obj, f.name, value)


def check_keys(cls: type, raw: dict[str, Any], prefix: str, source: str,
               also: Collection[str] = (), hidden: Collection[str] = (),
               required: bool = True) -> None:
    """Unknown keys (listing the valid ones) and, if `required`, missing required keys of a
    mapping for `cls`. `also`: extra valid keys; `hidden`: fields spelled another way here."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = (set(fields) | set(also)) - set(hidden)
    for key in raw:
        if key not in valid:
            where = _join(prefix, str(key))
            _fail(source, where, "is not a known key",
                  f"valid keys{' in ' + prefix if prefix else ''}: {', '.join(sorted(valid))}")
    for name, f in fields.items() if required else ():
        if (name not in raw and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            _fail(source, _join(prefix, name), "is missing",
                  f"add `{name}:` ({describe(_hints(cls)[name])})")


def _mapping(raw: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        _fail(source, where or "(top level)", f"must be a mapping (key: value lines), got "
              f"{_shown(raw)}", "see oodbench/benchmarks/digits.yaml for the layout")
    return dict(raw)


def build(cls: type, raw: Any, prefix: str, source: str, also: Collection[str] = ()) -> Any:
    """A dataclass from a mapping, keys and field types checked."""
    raw = _mapping(raw, prefix, source)
    check_keys(cls, raw, prefix, source, also)
    obj = cls(**raw)
    check_fields(obj, prefix, source)
    return obj


# ---------------------------------------------------------------------------------------------
# The configuration classes.


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" / "onecycle" (short CPU runs), "multistep" (the papers')
    milestones: list[int] = field(default_factory=list)  # epochs, for "multistep"
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    crop_padding: int = 0
    flip: bool = False
    val_fraction: float = 0.1  # held out of train when the dataset has no "val" split
    checkpoint_seconds: float = 120.0  # mid-epoch checkpoint interval, besides every epoch

    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": Range(1), "batch_size": Range(2), "lr": POSITIVE,
        "momentum": Range(0, 1, high_open=True), "weight_decay": NON_NEGATIVE, "gamma": POSITIVE,
        "milestones": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE, "crop_padding": NON_NEGATIVE,
        "val_fraction": Range(0, 1, low_open=True, high_open=True),
        "checkpoint_seconds": NON_NEGATIVE}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "schedule": ("cosine", "onecycle", "multistep")}

    def validate(self, source: str = "", prefix: str = "train") -> None:
        """Types and ranges of every field; also after a command-line override (--epochs)."""
        check_fields(self, prefix, source)


@dataclass
class OODSet:
    """One OOD set. `adapt` asks explicitly for resize / channel replication to the model's
    input shape; without it a shape mismatch is an error, never a silent conversion."""

    dataset: str
    group: str = "far"
    name: str = ""  # default: `default_ood_name(dataset)`
    split: str = "test"
    classes: list[int] | None = None
    adapt: bool = False

    RANGES: ClassVar[dict[str, Range]] = {"classes": NON_NEGATIVE}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"group": ("near", "far")}
    NON_EMPTY: ClassVar[tuple[str, ...]] = ("classes", "dataset")
    NAMES: ClassVar[tuple[str, ...]] = ("name",)

    def __post_init__(self) -> None:
        if not self.name and isinstance(self.dataset, str):
            self.name = default_ood_name(self.dataset)


@dataclass
class OutlierSet:
    """The auxiliary outliers of losses trained with them (Outlier Exposure, energy-ft): a
    dataset split, shaped like the model's input (or `adapt: true`), and the outlier batch
    size as a `ratio` of the in-distribution batch size. Must share no image with any OOD test
    set (checked by content before training)."""

    dataset: str
    split: str = "train"
    adapt: bool = False
    ratio: float = 1.0

    RANGES: ClassVar[dict[str, Range]] = {"ratio": POSITIVE}
    NON_EMPTY: ClassVar[tuple[str, ...]] = ("dataset",)


@dataclass
class CheckpointEntry:
    """A `checkpoints:` entry: published weights that `oodbench run` imports (once) and then
    calibrates and scores instead of training a model. `path` is relative to the data root
    unless absolute, and may be a glob that matches exactly one file."""

    model: str
    path: str
    seed: int = 0  # checkpoints of one model with distinct seeds are averaged as seeds
    name: str = ""  # the run folder's name; default: the model's (`MODEL-seedN` for seed N > 0)

    RANGES: ClassVar[dict[str, Range]] = {"seed": NON_NEGATIVE}
    NON_EMPTY: ClassVar[tuple[str, ...]] = ("model", "path")
    NAMES: ClassVar[tuple[str, ...]] = ("name", "model")

    def __post_init__(self) -> None:
        if not self.name and isinstance(self.model, str):
            self.name = self.model if not self.seed else f"{self.model}-seed{self.seed}"


def _in_distribution(raw: Any, source: str, prefix: str) -> dict[str, Any]:
    """`in_distribution: NAME` or `{dataset: NAME, classes: [...]}` → dataset / classes."""
    where = _join(prefix, "in_distribution")
    if isinstance(raw, str):
        return {"dataset": raw, "classes": None}
    ind = _mapping(raw, where, source)
    valid = {"dataset", "classes"}
    for key in ind:
        if key not in valid:
            _fail(source, _join(where, str(key)), "is not a known key",
                  f"valid keys in {where}: classes, dataset")
    if "dataset" not in ind:
        _fail(source, _join(where, "dataset"), "is missing", "add `dataset: NAME`")
    return {"dataset": ind["dataset"], "classes": ind.get("classes")}


def _ood_entry(entry: Any, group: str | None, where: str, source: str) -> OODSet:
    if isinstance(entry, OODSet):
        return entry
    if isinstance(entry, str):
        entry = {"dataset": entry}
    entry = _mapping(entry, where, source)
    if group is None:
        return build(OODSet, entry, where, source)
    check_keys(OODSet, entry, where, source, hidden={"group"})
    return build(OODSet, {**entry, "group": group}, where, source)


def _ood_sets(raw: Any, source: str, prefix: str) -> list[OODSet]:
    """`ood: {near: [...], far: [...]}` (the YAML layout) or a list of entries with their
    `group` (`to_dict`'s); an entry is a dataset name or a mapping of OODSet fields."""
    where = _join(prefix, "ood")
    if isinstance(raw, dict):
        items = []
        for group, entries in raw.items():
            at = _join(where, str(group))
            if group not in ("near", "far"):
                _fail(source, at, "is not an OOD group", "group OOD sets under `near:` / `far:`")
            entries = [] if entries is None else entries
            if not isinstance(entries, list):
                _fail(source, at, f"must be a list of OOD sets, got {_shown(entries)}",
                      f"write a YAML list, e.g. `{group}: [{_yaml(entries)}]`")
            items += [_ood_entry(e, group, _join(at, i), source) for i, e in enumerate(entries)]
        return items
    if not isinstance(raw, list):
        _fail(source, where, f"must be a mapping {{near: [...], far: [...]}}, got {_shown(raw)}",
              "write e.g. `ood: {far: [gaussian]}`")
    return [_ood_entry(e, None, _join(where, i), source) for i, e in enumerate(raw)]


@dataclass
class ShiftConfig:
    """`shift:`: corrupted copies of the in-distribution test set (covariate shift, labels
    kept), one per corruption and severity. Corruption names are checked against the registry
    by `oodbench.data.corruptions.check_corruption_names` (config cannot import it)."""

    corruptions: list[str]
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])

    RANGES: ClassVar[dict[str, Range]] = {"severities": Range(1, 5)}
    NON_EMPTY: ClassVar[tuple[str, ...]] = ("corruptions", "severities")

    def validate(self, source: str = "", prefix: str = "shift") -> None:
        check_fields(self, prefix, source)
        for key in ("corruptions", "severities"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                _fail(source, _join(prefix, key), f"repeats {_yaml(values)}",
                      f"list each of the {key} once")
        for i, name in enumerate(self.corruptions):
            if not is_plain_name(name):
                _fail(source, _join(_join(prefix, "corruptions"), i),
                      f"{name!r} is not a corruption name", "e.g. `gaussian_noise`")


@dataclass
class BenchmarkConfig:
    name: str
    dataset: str
    model: str
    losses: list[str]
    detectors: list[str]
    ood: list[OODSet]
    classes: list[int] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    train: TrainConfig = field(default_factory=TrainConfig)
    loss_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: str = ""
    # {mean: [...], std: [...]} replacing the dataset's input normalisation (pretrained weights)
    normalization: dict[str, list[float]] | None = None
    shift: ShiftConfig | None = None  # corrupted in-distribution test sets (covariate shift)
    # auxiliary outliers, `outliers: NAME` or {dataset, split, adapt, ratio}; only losses that
    # train with outliers (oe, energy-ft) load them
    outliers: OutlierSet | None = None
    # published weights to import and score instead of training (`oodbench run`); then
    # `losses` must be [softmax] and `train` is not used
    checkpoints: list[CheckpointEntry] = field(default_factory=list)

    RANGES: ClassVar[dict[str, Range]] = {"classes": NON_NEGATIVE, "seeds": NON_NEGATIVE}
    NON_EMPTY: ClassVar[tuple[str, ...]] = ("classes", "seeds", "losses", "detectors",
                                            "dataset", "model")
    NAMES: ClassVar[tuple[str, ...]] = ("name",)

    @property
    def near(self) -> list[OODSet]:
        return [o for o in self.ood if o.group == "near"]

    @property
    def far(self) -> list[OODSet]:
        return [o for o in self.ood if o.group == "far"]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.checkpoints:  # a trained run's config.yaml stays as it was before the key
            del out["checkpoints"]
        return out

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>", prefix: str = "") -> BenchmarkConfig:
        """Accepts both the YAML layout (in_distribution / ood: {near, far}) and `to_dict`'s.
        `prefix` is the key path of the benchmark inside a larger file (a run's config.yaml)."""
        raw = _mapping(raw, prefix, source)
        if "in_distribution" in raw:  # the YAML layout
            check_keys(cls, raw, prefix, source, also={"in_distribution"},
                       hidden={"dataset", "classes"}, required=False)
            raw.update(_in_distribution(raw.pop("in_distribution"), source, prefix))
        elif "dataset" not in raw:
            _fail(source, _join(prefix, "in_distribution"), "is missing",
                  "add `in_distribution: DATASET` (the dataset the model is trained on)")
        raw["ood"] = _ood_sets(raw.get("ood", []), source, prefix)
        if isinstance(raw.get("train"), TrainConfig | None):
            raw["train"] = raw.get("train") or TrainConfig()
        else:
            raw["train"] = build(TrainConfig, raw["train"], _join(prefix, "train"), source)
        if not isinstance(raw.get("shift"), ShiftConfig | None):
            raw["shift"] = build(ShiftConfig, raw["shift"], _join(prefix, "shift"), source)
        check_keys(cls, raw, prefix, source)
        cfg = cls(**raw)
        cfg.validate(source, prefix)
        return cfg

    def validate(self, source: str = "<benchmark>", prefix: str = "") -> None:
        """Types, ranges and structure only: this module never looks names up in the
        registries (that is `oodbench.experiment.check_benchmark`, run wherever a benchmark is
        loaded for use)."""
        where_ind = _join(prefix, "in_distribution")
        check_fields(self, prefix, source,
                     skip=("train", "ood", "shift", "outliers", "checkpoints"))
        self._check_outliers(source, prefix)
        self._check_checkpoints(source, prefix)
        if not isinstance(self.train, TrainConfig):
            _fail(source, _join(prefix, "train"), "must be a mapping of training options",
                  "write e.g. `train: {epochs: 30}`")
        self.train.validate(source, _join(prefix, "train"))
        if self.shift is not None:
            self.shift.validate(source, _join(prefix, "shift"))
        self._check_normalization(source, prefix)
        groups: dict[str, int] = {}
        for o in self.ood:
            index = groups[o.group] = groups.get(o.group, -1) + 1
            check_fields(o, _join(_join(_join(prefix, "ood"), o.group), index), source)
            if o.name == self.dataset:
                _fail(source, _join(_join(_join(prefix, "ood"), o.group), index),
                      f"is named {o.name!r}, like the in-distribution dataset ({where_ind})",
                      f"give this OOD entry a distinct `name:`, e.g. `name: {o.name}-ood` (an "
                      "entry without `name` is named after its dataset)")
        if not self.ood and self.shift is None:
            _fail(source, _join(prefix, "ood"), "lists no OOD set, so no detector can be "
                  "evaluated", "add at least one, e.g. `ood: {far: [gaussian]}`")
        for key in ("losses", "detectors", "seeds"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                _fail(source, _join(prefix, key), f"repeats {_yaml(values)}",
                      f"list each of the {key} once (a repeat would run or report it twice)")
        names = [o.name for o in self.ood]
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            _fail(source, _join(prefix, "ood"), f"OOD set names repeat: {repeated}",
                  "give each OOD entry a distinct `name:` (an entry without `name` is named "
                  "after its dataset)")

    def _check_outliers(self, source: str, prefix: str) -> None:
        """`outliers: NAME` or a mapping of OutlierSet fields, built and checked in place."""
        where, raw = _join(prefix, "outliers"), self.outliers
        if raw is None or isinstance(raw, OutlierSet):
            pass
        elif isinstance(raw, str):
            self.outliers = OutlierSet(raw)
        elif isinstance(raw, dict):
            self.outliers = build(OutlierSet, raw, where, source)
        else:
            _fail(source, where, f"must be a dataset name or a mapping, got {_shown(raw)}",
                  "write e.g. `outliers: {dataset: blobs, split: train}`")
        if self.outliers is not None:
            check_fields(self.outliers, where, source)

    def _check_checkpoints(self, source: str, prefix: str) -> None:
        """Each entry built and checked in place; names distinct; only SoftMax heads."""
        where, raw = _join(prefix, "checkpoints"), self.checkpoints
        if not isinstance(raw, list):
            _fail(source, where, f"must be a list of {{model, path}} entries, got {_shown(raw)}",
                  "write e.g. `checkpoints: [{model: resnet20, path: models/resnet20.th}]`")
        self.checkpoints = [e if isinstance(e, CheckpointEntry) else
                            build(CheckpointEntry, e, _join(where, i), source)
                            for i, e in enumerate(raw)]
        for i, entry in enumerate(self.checkpoints):
            check_fields(entry, _join(where, i), source)
        runs = [(e.model, e.seed) for e in self.checkpoints]
        for model, seed in sorted({r for r in runs if runs.count(r) > 1}):
            _fail(source, where, f"lists seed {seed} of {model} more than once",
                  "give each checkpoint of one model its own `seed:` (they are averaged as "
                  "seeds), or put them in separate benchmark files")
        names = [e.name for e in self.checkpoints]
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            _fail(source, where, f"run names repeat: {repeated}",
                  "give each entry its own `name:` (the run folders' names)")
        if self.checkpoints and self.losses != ["softmax"]:
            _fail(source, _join(prefix, "losses"), f"is {_yaml(self.losses)}, but imported "
                  "checkpoints are scored with their own linear head",
                  "write `losses: [softmax]` (or drop `checkpoints:` to train these losses)")

    def _check_normalization(self, source: str, prefix: str) -> None:
        norm = self.normalization
        if norm is not None and (
                set(norm) != {"mean", "std"} or not all(norm.values())
                or len(norm["mean"]) != len(norm["std"]) or any(v <= 0 for v in norm["std"])):
            _fail(source, _join(prefix, "normalization"),
                  "must be {mean: [...], std: [...]} with one value per input channel each and "
                  "std > 0", "fix or remove the `normalization` key")


def benchmark_dirs() -> list[Path]:
    import os

    extra = [Path(p) for p in os.environ.get(BENCHMARK_DIRS_ENV, "").split(os.pathsep) if p]
    return [*extra, Path("benchmarks"), BUILTIN_BENCHMARKS]


def available_benchmarks() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in benchmark_dirs():
        for p in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            found.setdefault(p.stem, p)
    return found


def load_yaml(path: Path) -> Any:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise OodbenchError(f"{path} is not valid YAML: {e}") from None


def load_benchmark(name_or_path: str) -> BenchmarkConfig:
    """A benchmark by file path or by name (searched in $OODBENCH_BENCHMARKS, ./benchmarks and
    the built-in ones, oodbench/benchmarks/)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise OodbenchError(f"benchmark file {p} does not exist",
                                "give an existing YAML file or a benchmark name")
        return BenchmarkConfig.from_dict(load_yaml(p), str(p))
    found = available_benchmarks()
    if name_or_path not in found:
        from oodbench.errors import UnknownNameError

        raise UnknownNameError("benchmark", name_or_path, sorted(found))
    return BenchmarkConfig.from_dict(load_yaml(found[name_or_path]), str(found[name_or_path]))


@dataclass
class RunConfig:
    """One training run: a benchmark, one loss (with options) and one seed."""

    benchmark: BenchmarkConfig
    loss: str
    seed: int
    loss_options: dict[str, Any] = field(default_factory=dict)

    RANGES: ClassVar[dict[str, Range]] = {"seed": NON_NEGATIVE}
    NAMES: ClassVar[tuple[str, ...]] = ("loss",)  # a path component of the run folder

    def __post_init__(self) -> None:
        """A seed, loss or option of the wrong type fails when the run is made (`--seed -1`),
        before any folder is written."""
        check_fields(self, "", "", skip=("benchmark",))

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark.to_dict(), "loss": self.loss, "seed": self.seed,
                "loss_options": self.loss_options}

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<run>") -> RunConfig:
        """A run folder's config.yaml, with the benchmark's checks (a hand-edited file fails
        with the key path, e.g. `benchmark.train.epochs`)."""
        raw = _mapping(raw, "", source)
        check_keys(cls, raw, "", source)
        bench = BenchmarkConfig.from_dict(raw["benchmark"], source, "benchmark")
        try:
            return cls(bench, raw["loss"], raw["seed"], raw.get("loss_options") or {})
        except OodbenchError as e:
            raise OodbenchError(f"{source}: {e.message}", e.hint) from None
