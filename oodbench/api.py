"""`oodbench.evaluate`: OOD detection benchmarks for any PyTorch classifier, from Python.

    import oodbench
    result = oodbench.evaluate(model, (x_test, y_test), {"noise": x_noise, "svhn": svhn_set},
                               train=(x_train, y_train), detectors=("msp", "energy", "knn"),
                               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    print(result.tables())                        # the same tables as `oodbench report`
    assert result.gate("auroc>=0.9"), result.gate("auroc>=0.9")   # the same gates

`model` is any `nn.Module` whose forward returns logits N×C. Its penultimate features are read
with forward hooks (`oodbench.models.HookedClassifier`): the input of its last `nn.Linear`
(also the head whose W, b detectors such as ViM read), or the output of `feature_layer`; block
outputs (N×C×H×W) of the modules named in `block_layers`. An oodbench `Classifier` is used as
it is. Then the phases of `oodbench score` run unchanged (`oodbench.scoring`): detectors fit on
`train` and select on `val` before any test set is scored; each set passes through the network
once, into the content-keyed output cache, so a second call with the same weights and data runs
no forward pass for gradient-free detectors.

Data (`in_test`, `train`, `val`: labelled; OOD sets: labels ignored), each one of:
- `(images, labels)`: tensors or NumPy arrays, images N×C×H×W (N×H×W: one channel);
- a `torch.utils.data.Dataset` yielding `(image, label)` (tensor or PIL image) or images;
- a `torch.utils.data.DataLoader` yielding such batches;
- for an OOD set also images alone, or the name of a registered dataset ("gaussian",
  "uniform", "patches", "cifar100"...; read from $OODBENCH_DATA), shaped like `in_test`.
Everything is converted ONCE to uint8 `ImageSet`s: uint8 images are kept exactly; float images
must be raw pixels in [0, 1] (e.g. `ToTensor()` without `Normalize`) and are quantised to
8 bits (round(x·255); at most 1/510 off, lossless for images decoded from 8-bit files). A
float set outside [0, 1] (already normalised) is an error, never silently rescaled.

Normalisation: `mean`/`std` are the model's input normalisation, applied on the fly like the
CLI's. If both are omitted the model gets the [0, 1] pixels unchanged (mean 0, std 1) and a
warning says so: the one default that feeds a model exactly what `model(x)` on those tensors
would, and never guesses a dataset's statistics.

Cache: forward outputs go to `cache_dir/outputs/<key>` (default `$OODBENCH_EVALUATE_CACHE`, else
`$XDG_CACHE_HOME/oodbench/evaluate`, else `~/.cache/oodbench/evaluate`); keys hash the weights,
pixels, transform and code, so entries are never stale, and the folder may be deleted at any
time. Each result is a run-like folder (`metrics.json`, `scores/<detector>/<set>.npy`) under
`output_dir` (default `cache_dir/results/<key>`), which `oodbench report` also reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oodbench.cache import OutputCache, code_digest, model_digest
from oodbench.config import BenchmarkConfig, OODSet, RunConfig
from oodbench.data import DataContext, DatasetInfo, ImageSet, InputTransform, get_dataset
from oodbench.errors import OodbenchError
from oodbench.gate import Cell, Gate, parse_gate
from oodbench.gate import evaluate as evaluate_gates
from oodbench.io import write_json
from oodbench.models import Classifier, HookedClassifier
from oodbench.pipeline import environment, write_scores
from oodbench.provenance import run_provenance
from oodbench.render import DEFAULT_TABLE_METRICS, report_csv, report_tables, to_markdown, to_rich
from oodbench.report import Filters, LoadedMetrics, Report, build_report
from oodbench.runs import Run
from oodbench.scoring import (
    EvalSet,
    LoadedRun,
    SetBundle,
    assemble,
    build_detectors,
    fit_select,
    forward_eval,
    plan,
    score_sets,
)

__all__ = ["DEFAULT_DETECTORS", "EvaluationReport", "GateResult", "default_cache_dir",
           "evaluate", "to_image_set"]

DEFAULT_DETECTORS = ("msp", "maxlogit", "energy", "entropy")  # need no training data
DEFAULT_BATCH_SIZE = 128
BENCHMARK = "evaluate"  # the benchmark name in metrics.json and the report's group title
LOSS = "external"  # the loss column: the model was trained outside oodbench
CACHE_ENV = "OODBENCH_EVALUATE_CACHE"
PROBE = 8  # images of the in-dist test set run once to check the hooks


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "oodbench" / "evaluate"


# ------------------------------------------------------------------------------------------ data
def _quantised(x: Any, what: str) -> torch.Tensor:
    """A batch of images as uint8 N×C×H×W (see the module doc for the float rule)."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu()
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise OodbenchError(f"{what}: images must be N×C×H×W, got shape {tuple(x.shape)}",
                            "stack the images into one tensor (channels first)")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise OodbenchError(f"{what}: images are {x.dtype}", "give uint8 pixels, or floats "
                            "in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6 or lo != lo:
        raise OodbenchError(
            f"{what}: float images must be raw pixels in [0, 1]; these span [{lo:.3g}, {hi:.3g}] "
            "(already normalised?)", "drop Normalize from the data's transform and give the "
            "model's normalisation as evaluate(..., mean=..., std=...)")
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _image(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor | np.ndarray):
        return torch.as_tensor(item)
    try:  # a PIL image (torchvision datasets without a transform)
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(item)
    except TypeError:
        raise OodbenchError(f"cannot read an image of type {type(item).__name__}",
                            "yield tensors or PIL images from the dataset") from None


def _collate(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for it in items:
        img, label = (it[0], it[1]) if isinstance(it, tuple | list) else (it, -1)
        xs.append(_image(img))
        ys.append(int(label))
    try:
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long)
    except RuntimeError:
        raise OodbenchError("the dataset's images have different shapes",
                            "resize them to one size in the dataset's transform") from None


def _batches(data: Any) -> Iterator[tuple[Any, Any]]:
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=256, shuffle=False, collate_fn=_collate)
    for batch in data:
        if isinstance(batch, tuple | list):
            yield batch[0], batch[1] if len(batch) > 1 else None
        elif isinstance(batch, Mapping):
            yield batch.get("image", batch.get("images")), batch.get("label", batch.get("labels"))
        else:
            yield batch, None


def to_image_set(data: Any, name: str, labelled: bool, info: DatasetInfo | None = None
                 ) -> ImageSet:
    """`data` (see the module doc) as a uint8 `ImageSet` named `name`; unlabelled images get -1.
    `info` (channels, size, classes, normalisation) defaults to a description of the images."""
    from torch.utils.data import DataLoader, Dataset

    what = f"data {name!r}"
    if isinstance(data, Dataset | DataLoader):
        xs, ys = [], []
        for x, y in _batches(data):
            x = _quantised(x, what)
            xs.append(x)
            ys.append(torch.full((len(x),), -1, dtype=torch.long) if y is None
                      else torch.as_tensor(y).long().reshape(-1))
        if not xs:
            raise OodbenchError(f"{what} is empty", "give at least one image")
        try:
            images, labels = torch.cat(xs), torch.cat(ys)
        except RuntimeError:
            raise OodbenchError(f"{what}: batches of different image shapes",
                                "resize the images to one size") from None
    elif isinstance(data, tuple | list) and len(data) == 2:
        images = _quantised(data[0], what)
        labels = torch.as_tensor(np.asarray(data[1])).long().reshape(-1)
    else:
        images = _quantised(data, what)
        labels = torch.full((len(images),), -1, dtype=torch.long)
    if len(labels) != len(images):
        raise OodbenchError(f"{what}: {len(images)} images but {len(labels)} labels",
                            "give one label per image")
    if not labelled:
        labels = torch.full_like(labels, -1)
    elif len(labels) and int(labels.min()) < 0:
        raise OodbenchError(f"{what} needs a class label for every image",
                            "give (images, labels), or a dataset yielding (image, label)")
    if info is None:
        c, h = int(images.shape[1]), int(images.shape[2])
        info = DatasetInfo(c, h, 0, (), (0.0,) * c, (1.0,) * c)
    return ImageSet(name, images.contiguous(), labels, info)


def _ood_set(data: Any, name: str, like: DatasetInfo, data_root: str | Path | None) -> ImageSet:
    if isinstance(data, str):
        loaded = get_dataset(data).load("test", DataContext.resolve(data_root), like=like)
        return ImageSet(name, loaded.images, torch.full_like(loaded.labels, -1), like)
    return to_image_set(data, name, labelled=False, info=like)


def _normalisation(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if mean is None and std is None:
        warnings.warn("oodbench.evaluate: no mean/std given, so the model gets pixels in [0, 1] "
                      "unnormalised; pass the normalisation it was trained with (e.g. ImageNet's "
                      "mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))", stacklevel=3)
        return (0.0,) * channels, (1.0,) * channels
    if mean is None or std is None:
        raise OodbenchError("give both mean and std, or neither", "e.g. mean=(0.5,) * 3, "
                            "std=(0.5,) * 3")
    m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(m) == 1 and channels > 1:
        m, s = m * channels, s * channels
    if len(m) != channels or len(s) != channels or min(s) <= 0:
        raise OodbenchError(f"mean/std need {channels} values (one per channel; std > 0), got "
                            f"{list(m)} and {list(s)}", "give the model's input normalisation")
    return m, s


# --------------------------------------------------------------------------------- the result
@dataclass
class GateResult:
    """The outcome of CI gates: true when every gate passed; `str()` is what the CLI prints."""

    gates: list[Gate]
    failed: list[tuple[Gate, Cell]]

    @property
    def passed(self) -> bool:
        return not self.failed

    def __bool__(self) -> bool:
        return self.passed

    def lines(self) -> list[str]:
        if not self.failed:
            return [f"all {len(self.gates)} gate(s) passed"]
        return [*(f"FAIL {g.text}: {c.where} = {c.value:.4g}" for g, c in self.failed),
                f"{len(self.failed)} cell(s) failed the gates"]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def parse_gate_expression(expr: str) -> Gate:
    """"auroc>=0.9" (fail under), "fpr_at_tpr95:gaussian<=0.3" (fail over)."""
    for op, under in ((">=", True), ("<=", False)):
        if op in expr:
            name, _, value = expr.partition(op)
            return parse_gate(f"{name.strip()}={value.strip()}", under)
    raise OodbenchError(f"gate {expr!r} is not METRIC[:QUALIFIER]>=VALUE or <=VALUE",
                        "e.g. \"auroc>=0.9\" or \"fpr_at_tpr95:gaussian<=0.3\"")


@dataclass
class EvaluationReport:
    """What `evaluate` returns: `metrics` (the metrics.json record), `report` (the report over
    it), `tables()`, `to_json()` and gates (`gate`, `check`), as `oodbench report` makes them."""

    metrics: dict[str, Any]
    path: Path  # the metrics.json written (its folder is a run folder `oodbench report` reads)
    forward_log: list[str] = field(default_factory=list)
    _report: Report | None = field(default=None, repr=False)

    @property
    def report(self) -> Report:
        if self._report is None:
            self._report = build_report([LoadedMetrics(self.path, self.metrics)])
        return self._report

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict()

    def to_json(self, indent: int | None = 2) -> str:
        """The report as `oodbench report --format json` prints it (schema oodbench.report/2)."""
        return json.dumps(self.to_dict(), indent=indent)

    def auroc(self, detector: str, ood_set: str) -> float:
        return float(self.metrics["detectors"][detector]["ood"][ood_set]["auroc"])

    def tables(self, fmt: str = "markdown", metrics: Sequence[str] | None = None) -> Any:
        """"markdown" or "csv": a string; "rich": a list of rich Tables (print each)."""
        chosen = Filters(metrics=tuple(metrics)).metrics if metrics else DEFAULT_TABLE_METRICS
        doc = self.to_dict()
        if fmt == "csv":
            return report_csv(doc)
        tables = report_tables(doc, tuple(chosen or DEFAULT_TABLE_METRICS))
        if fmt == "markdown":
            return to_markdown(tables, "oodbench evaluate")
        if fmt == "rich":
            return to_rich(tables)
        raise OodbenchError(f"unknown table format {fmt!r}", "use markdown, rich or csv")

    def print(self, fmt: str = "rich", metrics: Sequence[str] | None = None) -> None:
        from rich.console import Console

        console = Console()
        if fmt == "rich":
            for t in self.tables("rich", metrics):
                console.print(t)
        else:
            console.print(self.tables(fmt, metrics), markup=False, highlight=False,
                          soft_wrap=True)

    def check(self, fail_under: Iterable[str] = (), fail_over: Iterable[str] = ()
              ) -> GateResult:
        """`--fail-under` / `--fail-over` specs (METRIC[:QUALIFIER...]=VALUE), as the CLI."""
        gates = ([parse_gate(g, under=True) for g in fail_under]
                 + [parse_gate(g, under=False) for g in fail_over])
        return self._run(gates)

    def gate(self, *expressions: str) -> GateResult:
        """Gates written "auroc>=0.9" (fail under) or "fpr_at_tpr95:gaussian<=0.3"."""
        return self._run([parse_gate_expression(e) for e in expressions])

    def _run(self, gates: list[Gate]) -> GateResult:
        if not gates:
            raise OodbenchError("no gate given", "e.g. result.gate(\"auroc>=0.9\")")
        return GateResult(gates, evaluate_gates(self.to_dict(), gates))


# ------------------------------------------------------------------------------------- evaluate
def _adapter(model: nn.Module, feature_layer: str | None, block_layers: Sequence[str]
             ) -> nn.Module:
    if isinstance(model, Classifier) and feature_layer is None and not block_layers:
        return model  # already gives features and its own named blocks
    if isinstance(model, HookedClassifier):
        return model
    return HookedClassifier(model, feature_layer, block_layers)


def _needs(p: Any, sets: dict[str, ImageSet | None]) -> None:
    for names, split, why in ((p.fitting, "train", "fit statistics on in-distribution "
                               "training data"), (p.selecting, "val", "select hyperparameters "
                                                  "on in-distribution validation data")):
        if names and sets[split] is None:
            raise OodbenchError(f"detector(s) {names} {why}",
                                f"pass {split}=(images, labels), or drop them")



def _check_blocks(dets: Mapping[str, Any], block_names: Sequence[str]) -> None:
    users = [n for n, d in dets.items() if "blocks" in d.needs]
    if users and not block_names:
        raise OodbenchError(f"detector(s) {users} need block outputs",
                            "pass block_layers=[module names with N×C×H×W outputs], e.g. "
                            "(\"layer3\", \"layer4\") for a torchvision ResNet")


def _key(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def evaluate(model: nn.Module, in_test: Any, ood_sets: Mapping[str, Any], train: Any = None,
             val: Any = None, detectors: Sequence[str] = DEFAULT_DETECTORS, *,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             feature_layer: str | None = None, block_layers: Sequence[str] = (),
             near: Sequence[str] = (), name: str | None = None,
             in_name: str = "in-distribution", params: dict[str, dict[str, Any]] | None = None,
             selection: str | None = None, oracle: str | None = None,
             temperature: float = 1.0, cache_dir: str | Path | None = None,
             output_dir: str | Path | None = None, device: str | torch.device = "cpu",
             batch_size: int | None = None, data_root: str | Path | None = None
             ) -> EvaluationReport:
    """Score OOD `detectors` on `model` with `in_test` as in-distribution and each of
    `ood_sets` (name → data) as OOD; see the module doc for data, normalisation and cache.

    `near`: OOD set names reported as near-OOD (the rest are far). `name`: the model's label
    (default its class name). `params` ({"knn": {"k": 10}}), `selection` ("none" / "id" /
    "fgsm") and `oracle` (an OOD set's name) are `oodbench score`'s --param / --selection /
    --oracle; `temperature` divides the logits of probability-based scores. `train` is needed
    by detectors that fit (knn, mahalanobis, vim...), `val` by detectors that select. The
    model is moved to `device` and put in eval mode while scoring (its mode is restored)."""
    _check_arguments(ood_sets, selection, batch_size)
    dev = torch.device(device)
    test = to_image_set(in_test, in_name, labelled=True)
    mean_, std_ = _normalisation(mean, std, test.shape[0])
    tf = InputTransform(mean_, std_)
    adapter = _adapter(model, feature_layer, block_layers)
    was_training = model.training
    adapter.to(dev).eval()
    try:
        test, info = _probe(adapter, test, tf, in_name, dev)
        ood = _ood_sets(ood_sets, in_name, info, test, data_root, near)
        dets = build_detectors(list(detectors), params, selection, oracle=oracle is not None)
        _check_blocks(dets, adapter.block_names)
        p = plan(dets, tuple(adapter.block_names), temperature, False, None, oracle)
        sets = _bundle(p, test, ood, {"train": train, "val": val}, tf, dev, info, near)
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        lr = LoadedRun(adapter, model_digest(adapter), code_digest(adapter), dev,
                       OutputCache(root / "outputs"), batch_size or DEFAULT_BATCH_SIZE)
        setup = fit_select(lr, p, sets)
        results = [forward_eval(lr, p, es) for es in sets.evaluated]
        scores = score_sets(lr, p, results)
    finally:
        model.train(was_training)
    label = name or type(model.model if isinstance(model, HookedClassifier) else model).__name__
    bench = BenchmarkConfig(BENCHMARK, in_name, label, [LOSS], list(detectors),
                            [OODSet(dataset=o, group="near" if o in near else "far", name=o)
                             for o in ood])
    metrics = assemble(RunConfig(bench, LOSS, 0), lr, p, sets, results, scores, setup, None)
    described = {"model": label, "features": _features_label(adapter),
                 "head": getattr(adapter, "head_name", "head"),
                 "block_layers": list(adapter.block_names), "mean": list(mean_),
                 "std": list(std_), "detectors": list(detectors), "params": params or {},
                 "selection": selection, "temperature": temperature, "near": list(near)}
    return _write(metrics, described, lr, results, scores, dev, output_dir, root)


def _check_arguments(ood_sets: Mapping[str, Any], selection: str | None,
                     batch_size: int | None) -> None:
    if not ood_sets:
        raise OodbenchError("no OOD set given", "pass ood_sets={\"name\": data, ...}")
    if selection == "ood":
        raise OodbenchError("selection=\"ood\" needs an OOD validation set, which evaluate "
                            "does not take", "use selection=\"id\" or \"fgsm\"")
    if batch_size is not None and batch_size < 1:
        raise OodbenchError(f"batch_size must be >= 1, got {batch_size}")


def _probe(adapter: Any, test: ImageSet, tf: InputTransform, in_name: str,
           dev: torch.device) -> tuple[ImageSet, DatasetInfo]:
    """One small batch through the model: its number of classes (and, for a hooked model, a
    check that the head really produces the logits)."""
    channels, size = test.shape[0], test.shape[1]
    with torch.no_grad():
        probe = tf(test.images[:PROBE].to(dev))
        logits = (adapter.check(probe) if isinstance(adapter, HookedClassifier)
                  else adapter.forward_all(probe)).logits
    info = DatasetInfo(channels, size, int(logits.shape[1]), (), tf.mean, tf.std)
    if int(test.labels.max()) >= info.num_classes:
        raise OodbenchError(f"in_test has label {int(test.labels.max())} but the model "
                            f"gives {info.num_classes} logits", "check the labels")
    return ImageSet(in_name, test.images, test.labels, info), info


def _ood_sets(ood_sets: Mapping[str, Any], in_name: str, info: DatasetInfo, test: ImageSet,
              data_root: str | Path | None, near: Sequence[str]) -> dict[str, ImageSet]:
    ood: dict[str, ImageSet] = {}
    for o, data in ood_sets.items():
        if o == in_name:
            raise OodbenchError(f"OOD set {o!r} has the in-distribution set's name",
                                "rename it, or pass in_name=")
        ood[o] = _ood_set(data, o, replace_classes(info, 0), data_root)
        if ood[o].shape != test.shape:
            raise OodbenchError(f"OOD set {o!r} is {'×'.join(map(str, ood[o].shape))} but "
                                f"in_test is {'×'.join(map(str, test.shape))}",
                                "resize / convert it to the model's input shape first")
    unknown = [n for n in near if n not in ood]
    if unknown:
        raise OodbenchError(f"near={unknown} names no OOD set", f"use of: {list(ood)}")
    return ood


def _bundle(p: Any, test: ImageSet, ood: dict[str, ImageSet], splits: dict[str, Any],
            tf: InputTransform, dev: torch.device, info: DatasetInfo,
            near: Sequence[str]) -> SetBundle:
    """The sets on the device; train / val converted only when a detector fits / selects."""
    loaded = {s: None if d is None or not (p.fitting if s == "train" else p.selecting)
              else to_image_set(d, test.name, labelled=True, info=info)
              for s, d in splits.items()}
    for s, d in loaded.items():
        if d is not None and d.shape != test.shape:
            raise OodbenchError(f"{s} images are {d.shape}, in_test's {test.shape}",
                                "give the splits one image shape")
    _needs(p, loaded)
    sets = SetBundle(EvalSet(test.to(dev), tf, "test"),
                     [EvalSet(s.to(dev), tf, "ood", "near" if o in near else "far")
                      for o, s in ood.items()])
    for s, es in loaded.items():
        setattr(sets, s, None if es is None else EvalSet(es.to(dev), tf, s))
    if p.oracle:
        sets.ood_set(p.oracle)
    return sets


def _features_label(adapter: Any) -> str:
    if getattr(adapter, "features_are_input", 0):
        return f"input of {adapter.feature_layer}"
    return getattr(adapter, "feature_layer", "backbone")


def _write(metrics: dict[str, Any], described: dict[str, Any], lr: LoadedRun,
           results: list[Any], scores: dict[str, Any], dev: torch.device,
           output_dir: str | Path | None, root: Path) -> EvaluationReport:
    """metrics.json and scores/ in a folder `oodbench report` reads."""
    fingerprints = {r.set.name: r.set.data.fingerprint() for r in results}
    metrics.update(evaluate=described, environment={**environment(), "device": str(dev)},
                   provenance=run_provenance({"evaluate": described, "seed": 0}, fingerprints,
                                             dev, lr.weights))
    out = Path(output_dir) if output_dir else root / "results" / _key(
        lr.weights, lr.code, json.dumps(described, sort_keys=True), *fingerprints.values())
    out.mkdir(parents=True, exist_ok=True)
    write_scores(Run(out), {n: s.per_set for n, s in scores.items()})
    write_json(out / "metrics.json", metrics)
    return EvaluationReport(metrics, out / "metrics.json", lr.log)


def replace_classes(info: DatasetInfo, num_classes: int) -> DatasetInfo:
    from dataclasses import replace

    return replace(info, num_classes=num_classes)
