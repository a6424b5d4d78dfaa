"""Benchmark and run configuration: dataclasses read from YAML (safe_load) and validated.

Only parsing, types and structural checks live here; whether the names a benchmark uses (model,
losses, detectors, datasets) exist is checked by `oodbench.experiment.check_benchmark`, so this
module stays below every registry.

A benchmark YAML names the in-distribution set, the model, the losses, the detectors, the OOD
sets grouped near / far, the training schedule and the seeds. A run's config is the benchmark
resolved for one loss and one seed; it is written into the run folder so every later step reads
only the run folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oodbench.errors import OodbenchError

BENCHMARK_DIRS_ENV = "OODBENCH_BENCHMARKS"
REPO_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


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

    def validate(self) -> None:
        if self.schedule not in ("cosine", "multistep", "onecycle"):
            raise OodbenchError(f"unknown schedule {self.schedule!r}",
                                "use cosine, onecycle or multistep")
        if self.epochs < 1 or self.batch_size < 2:
            raise OodbenchError("epochs must be >= 1 and batch_size >= 2")
        if not 0.0 < self.val_fraction < 1.0:
            raise OodbenchError("val_fraction must be in (0, 1)")


@dataclass
class OODSet:
    """One OOD set. `adapt` asks explicitly for resize / channel replication to the model's
    input shape; without it a shape mismatch is an error, never a silent conversion."""

    dataset: str
    group: str = "far"
    name: str = ""
    split: str = "test"
    classes: list[int] | None = None
    adapt: bool = False

    def __post_init__(self) -> None:
        if self.group not in ("near", "far"):
            raise OodbenchError(f"OOD group {self.group!r} is neither 'near' nor 'far'")
        self.name = self.name or self.dataset


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

    @property
    def near(self) -> list[OODSet]:
        return [o for o in self.ood if o.group == "near"]

    @property
    def far(self) -> list[OODSet]:
        return [o for o in self.ood if o.group == "far"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> BenchmarkConfig:
        """Accepts both the YAML layout (in_distribution / ood: {near, far}) and `to_dict`'s."""
        if not isinstance(raw, dict):
            raise OodbenchError(f"{source}: a benchmark must be a mapping")
        raw = dict(raw)
        if "in_distribution" in raw:
            ind = raw.pop("in_distribution")
            ind = {"dataset": ind} if isinstance(ind, str) else ind
            raw["dataset"] = ind["dataset"]
            raw["classes"] = ind.get("classes")
        ood = raw.get("ood", [])
        items: list[OODSet] = []
        if isinstance(ood, dict):
            for group, entries in ood.items():
                for e in entries or []:
                    e = {"dataset": e} if isinstance(e, str) else dict(e)
                    items.append(OODSet(**{**e, "group": group}))
        else:
            items = [o if isinstance(o, OODSet) else OODSet(**o) for o in ood]
        raw["ood"] = items
        train = raw.get("train", {})
        known_train = {f.name for f in dataclasses.fields(TrainConfig)}
        if isinstance(train, dict):
            unknown = set(train) - known_train
            if unknown:
                raise OodbenchError(f"{source}: unknown train option(s) {sorted(unknown)}",
                                    f"valid: {sorted(known_train)}")
            raw["train"] = TrainConfig(**train)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise OodbenchError(f"{source}: unknown key(s) {sorted(unknown)}",
                                f"valid: {sorted(known | {'in_distribution'})}")
        missing = {"name", "dataset", "model", "losses", "detectors"} - set(raw)
        if missing:
            raise OodbenchError(f"{source}: missing key(s) {sorted(missing)}")
        cfg = cls(**raw)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "<benchmark>") -> None:
        """Structural checks only: this module never looks names up in the registries (that is
        `oodbench.experiment.check_benchmark`, run wherever a benchmark is loaded for use)."""
        self.train.validate()
        norm = self.normalization
        if norm is not None and (
                not isinstance(norm, dict) or set(norm) != {"mean", "std"}
                or not all(isinstance(norm[k], (list, tuple)) and norm[k] for k in norm)
                or len(norm["mean"]) != len(norm["std"])
                or any(float(v) <= 0 for v in norm["std"])):
            raise OodbenchError(f"{source}: normalization must be {{mean: [...], std: [...]}} "
                                "with one value per input channel each and std > 0",
                                "fix or remove the `normalization` key")
        names = [o.name for o in self.ood]
        if len(set(names)) != len(names):
            raise OodbenchError(f"{source}: OOD set names repeat: {names}",
                                "give each OOD entry a distinct `name`")
        if not self.seeds:
            raise OodbenchError(f"{source}: no seeds", "list at least one seed")


def benchmark_dirs() -> list[Path]:
    import os

    extra = [Path(p) for p in os.environ.get(BENCHMARK_DIRS_ENV, "").split(os.pathsep) if p]
    return [*extra, Path("benchmarks"), REPO_BENCHMARKS]


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
    the repository's benchmarks/ folder)."""
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

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark.to_dict(), "loss": self.loss, "seed": self.seed,
                "loss_options": self.loss_options}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<run>") -> RunConfig:
        try:
            return cls(BenchmarkConfig.from_dict(raw["benchmark"], source), raw["loss"],
                       int(raw["seed"]), dict(raw.get("loss_options") or {}))
        except (KeyError, TypeError) as e:
            raise OodbenchError(f"{source}: not a valid run config ({e})",
                                "recreate the run with `oodbench train`") from None
