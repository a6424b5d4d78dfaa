"""The phases of `score`, each a small function with a typed record between them.

    plan        → Plan        which detectors, which cached outputs each set needs, which
                               detectors score through the shared gradient forward
    load_sets   → SetBundle   the in-distribution splits and OOD sets, each moved to the device
                               once; OOD validation data checked disjoint from every test set
    forward_fit → Outputs     train / val outputs from the cache (one no-grad pass if missing)
    fit_select  → Setup       detectors fitted on in-distribution train data and their
                               hyperparameters selected on validation data, before any test set
                               is handed to a detector
    sharded_forward           under torchrun only: every missing cache entry above and below,
                               computed up front with each set split across the ranks; rank 0
                               writes the entries and alone goes on from here
    forward_eval→ SetResult   per test / OOD set ONE forward pass: it fills the missing cache
                               keys and, when a gradient detector (ODIN, Mahalanobis with ε) is
                               scored, is that detector's clean forward too (no extra plain pass)
    score_sets  → Scores      every detector on every set, with its own time
    assemble    → dict        the metrics record that `metrics.json` and `report` share

`pipeline.score_run` strings them together; each can be called from Python on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from oodbench.cache import (
    CacheEntry,
    EntryWriter,
    Outputs,
    cache_key,
    forward_into,
    forward_sharded,
)
from oodbench.config import OODSet, RunConfig
from oodbench.data import (
    DataContext,
    ImageSet,
    InputTransform,
    absolute_dataset_name,
    get_dataset,
)
from oodbench.detectors import DETECTORS, Detector, DetectorInput, NotApplicable
from oodbench.detectors.base import ORACLE_MODE
from oodbench.detectors.gradients import frozen
from oodbench.distributed import all_sum, joined_world, on_main
from oodbench.errors import OodbenchError
from oodbench.experiment import (
    ID_SPLITS,
    check_ood_test_set,
    first_shared,
    in_distribution_holdout,
    in_distribution_info,
    load_in_distribution,
    load_ood,
    load_shifted,
)
from oodbench.summaries import BASE_OUTPUTS

# progress(description, total) -> advance(n); the CLI maps it to rich progress bars.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


# ---------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What `score` will compute, decided before any data is loaded."""

    detectors: dict[str, Detector]
    block_names: tuple[str, ...]
    eval_keys: frozenset[str]  # cached outputs read on the test / OOD sets
    fit_keys: frozenset[str]  # ... on the train split, by detectors that fit statistics
    select_keys: frozenset[str]  # ... on the validation split, by detectors that select
    shared: tuple[str, ...]  # detectors scored through the shared gradient forward
    grad_taps: tuple[str, ...]  # blocks that forward must return for them
    temperature: float = 1.0
    calibrated: bool = False
    ood_validation: str | None = None
    oracle: str | None = None  # an OOD TEST set that grid selections may read (--oracle)
    not_applicable: dict[str, str] = field(default_factory=dict)  # detector → reason
    fit_source: str | None = None  # cache key of the train outputs the fits read

    @property
    def fitting(self) -> list[str]:
        return [n for n, d in self.detectors.items() if d.requires_fit]

    @property
    def selecting(self) -> list[str]:
        """Detectors whose `select` reads validation data: a selection mode other than "none",
        or a detector that standardises on validation data even then (the ensemble)."""
        return [n for n, d in self.detectors.items() if d.selection_modes and (
            d.selection_mode != "none" or d.validates_in_none_mode)]

    @property
    def wants_ood_validation(self) -> list[str]:
        return [n for n, d in self.detectors.items() if d.selection_mode == "ood"]

    @property
    def wants_oracle(self) -> list[str]:
        return [n for n, d in self.detectors.items() if d.selection_mode == ORACLE_MODE]

    def refuse(self, name: str, e: NotApplicable) -> None:
        """Drop a detector that cannot apply to this model; the report shows n/a (reason)."""
        self.not_applicable[name] = e.reason
        self.detectors.pop(name, None)


def build_detectors(names: list[str], params: dict[str, dict[str, Any]] | None = None,
                    selection: str | None = None, oracle: bool = False
                    ) -> dict[str, Detector]:
    """Detectors by name with the user's hyperparameters (typed and checked at creation);
    `selection` applies to every detector that has a selection step. `oracle` makes every
    detector with a grid select on an OOD test set instead (explicit opt-in, labelled)."""
    if oracle:
        selection = ORACLE_MODE
    params = params or {}
    unknown = set(params) - set(names)
    if unknown:
        raise OodbenchError(f"hyperparameters given for detector(s) not scored: {sorted(unknown)}",
                            "add them with --detector, or fix the name before the dot")
    _refuse_unsupported_selection(names, params, selection)
    dets = {}
    for n in dict.fromkeys(names):
        hp = dict(params.get(n, {}))
        cls = DETECTORS.get(n)
        takes = cls.grid if selection == ORACLE_MODE else cls.selection_modes
        if selection is not None and takes and "selection" not in hp:
            hp["selection"] = selection
        dets[n] = cls(oracle=oracle, **hp)
    if selection is not None and not any(d.selection_modes for d in dets.values()):
        able = [n for n, c in DETECTORS.items() if c.selection_modes]
        raise OodbenchError(f"--selection / --oracle given, but none of {names} selects anything",
                            f"selection applies to {', '.join(able)}")
    return dets


def _refuse_unsupported_selection(names: list[str], params: dict[str, dict[str, Any]],
                                  selection: str | None) -> None:
    """`--selection MODE` given to detectors that select, but not in MODE (e.g. `id` for the
    grid detectors: see `GRID_SELECTION_MODES`): one error naming them all."""
    if selection is None or selection == ORACLE_MODE:
        return
    unable = [n for n in dict.fromkeys(names) if DETECTORS.get(n).selection_modes
              and selection not in DETECTORS.get(n).selection_modes
              and "selection" not in params.get(n, {})]
    if unable:
        modes = sorted({m for n in unable for m in DETECTORS.get(n).selection_modes})
        raise OodbenchError(
            f"--selection {selection}: {', '.join(unable)} cannot select that way (a grid "
            "hyperparameter moves the mean in-distribution score by construction, so `id` "
            "would rank scales, not detection)",
            f"give them one of {', '.join(modes)} with -p NAME.selection=MODE, or score them "
            "in a separate command")


def plan(detectors: dict[str, Detector], block_names: tuple[str, ...],
         temperature: float = 1.0, calibrated: bool = False,
         ood_validation: str | None = None, oracle: str | None = None) -> Plan:
    """The outputs every set needs. The test set always needs the base outputs (logits for the
    classification metrics); block summaries only where a detector reads them. Which detectors
    score through the shared gradient forward is settled after selection (`settle_shared`):
    a selection may choose an input step (ε > 0)."""
    def keys(names: list[str]) -> frozenset[str]:
        return frozenset().union(*(detectors[n].required_outputs(block_names) for n in names))

    # its own dict: refusing a detector (`Plan.refuse`) must not change the caller's
    p = Plan(dict(detectors), block_names, keys(list(detectors)) | set(BASE_OUTPUTS), frozenset(),
             frozenset(), (), (), temperature, calibrated, ood_validation, oracle)
    p.fit_keys = keys(p.fitting)
    p.select_keys = keys(p.selecting)
    _check_ood_validation(p)
    return p


def settle_shared(p: Plan) -> None:
    """The detectors that run the model to score (ODIN; Mahalanobis with an input step), and
    the blocks the shared forward must tap for their gradients."""
    p.shared = tuple(n for n, d in p.detectors.items() if d.uses_shared_forward)
    p.grad_taps = tuple(dict.fromkeys(t for n in p.shared
                                      for t in p.detectors[n].grad_taps(p.block_names)))


def _check_ood_validation(p: Plan) -> None:
    if p.wants_ood_validation and not p.ood_validation:
        raise OodbenchError(f"{p.wants_ood_validation} select on OOD validation data, but none "
                            "was named", "pass --ood-validation DATASET, or use --selection "
                            "fgsm / id")
    if p.ood_validation and not p.wants_ood_validation:
        raise OodbenchError("--ood-validation is used only with --selection ood",
                            "add --selection ood (OOD data is never used unless asked)")
    if p.oracle and not p.wants_oracle:
        raise OodbenchError(f"--oracle {p.oracle}: none of {list(p.detectors)} has a "
                            "hyperparameter grid to select", "drop --oracle, or score a "
                            "detector with a grid (see `oodbench list detectors`)")


# ------------------------------------------------------------------------------------ load sets
@dataclass
class EvalSet:
    """One dataset on the device with the transform that feeds it to the model."""

    data: ImageSet
    transform: InputTransform
    role: str  # "test", "ood", "train", "val" or "ood-validation"
    group: str | None = None  # "near" / "far" for OOD test sets

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def label(self) -> str:
        return f"{self.name} ({self.role})" if self.role in ("train", "val", "test") else self.name


@dataclass
class SetBundle:
    test: EvalSet
    ood: list[EvalSet]
    train: EvalSet | None = None
    val: EvalSet | None = None
    ood_val: EvalSet | None = None
    shifted: list[EvalSet] = field(default_factory=list)  # corrupted copies of the test set

    @property
    def evaluated(self) -> list[EvalSet]:
        return [self.test, *self.ood]

    def ood_set(self, name: str) -> EvalSet:
        for o in self.ood:
            if o.name == name:
                return o
        raise OodbenchError(f"--oracle {name}: no OOD test set of that name",
                            f"use one of: {', '.join(o.name for o in self.ood)}")


def load_sets(cfg: RunConfig, p: Plan, ctx: DataContext, device: torch.device) -> SetBundle:
    """Every set the plan needs, each moved to the device once; OOD test sets are all loaded
    (and shape-checked) before any detector runs."""
    tf = InputTransform.for_model(in_distribution_info(cfg))

    splits = {name: load_in_distribution(cfg, name, ctx) for name in ID_SPLITS}

    def split(name: str) -> EvalSet:
        return EvalSet(splits[name].to(device), tf, name)

    held = in_distribution_holdout(cfg, ctx, splits)  # no OOD image may be in an ID split
    ood = []
    for o in cfg.benchmark.ood:
        data, otf = load_ood(cfg, o, ctx)
        ood.append(EvalSet(check_ood_test_set(data, held).to(device), otf, "ood", o.group))
    bundle = SetBundle(split("test"), ood)
    bundle.train = split("train") if p.fitting else None
    bundle.val = split("val") if p.selecting else None
    if p.ood_validation:
        bundle.ood_val = load_ood_validation(cfg, p.ood_validation, ctx, device)
        check_disjoint(bundle.ood_val, bundle.evaluated, held)
    if p.oracle:
        bundle.ood_set(p.oracle)  # the name is checked before any work
    bundle.shifted = load_shift(cfg, ctx, device)
    return bundle


def load_shift(cfg: RunConfig, ctx: DataContext, device: torch.device) -> list[EvalSet]:
    """The benchmark's `shift:` sets: the test set under each corruption and severity
    (covariate-shifted in-distribution data, labels kept)."""
    shift = cfg.benchmark.shift
    if shift is None:
        return []
    out = []
    for c in shift.corruptions:
        for sev in shift.severities:
            data, tf = load_shifted(cfg, c, sev, ctx)
            out.append(EvalSet(data.to(device), tf, "shift", f"{c}:{sev}"))
    return out


def load_ood_validation(cfg: RunConfig, dataset: str, ctx: DataContext,
                        device: torch.device) -> EvalSet:
    """The OOD validation set: a split of `dataset` that no OOD test entry uses ("val", else
    "train", else the one split no test entry reads). It is adapted (resized, channels
    replicated) only when the benchmark's own entry for that dataset says `adapt: true`, and
    restricted to the classes of the benchmark's entries for it when every one names
    `classes:` (digits-near's near-OOD digits 5-9 validate on digits 5-9, not on all ten)."""
    source = get_dataset(dataset)
    dataset = absolute_dataset_name(dataset)  # as the run's config stores folder: paths
    entries = [o for o in cfg.benchmark.ood if o.dataset == dataset]
    used = {o.split for o in entries}
    free = [s for s in ("val", "train", "test", *source.splits)
            if s in source.splits and s not in used]
    if not free:
        raise OodbenchError(
            f"every split of {dataset!r} ({', '.join(source.splits)}) is an OOD test set of this "
            "benchmark, so it cannot also validate", "name another dataset with --ood-validation")
    classes = (list(dict.fromkeys(c for e in entries for c in e.classes or ()))
               if entries and all(e.classes for e in entries) else None)
    o = OODSet(dataset=dataset, name=f"{dataset}-validation", split=free[0],
               classes=classes, adapt=any(e.adapt for e in entries))
    data, tf = load_ood(cfg, o, ctx)
    return EvalSet(data.to(device), tf, "ood-validation")


def check_disjoint(val: EvalSet, tests: list[EvalSet],
                   held: Sequence[tuple[str, set[bytes]]] = ()) -> None:
    """Refuse OOD validation data that shares an image (by content) with any test set, or with
    an in-distribution split of `held` (`in_distribution_holdout`: the test, validation and
    training splits, where those images are the in-distribution side)."""
    against = [(f"test set {t.name!r}", t.data.image_hashes()) for t in tests]
    if found := first_shared(val.data.image_hashes(), [*against, *held]):
        name, shared = found
        raise OodbenchError(
            f"OOD validation set {val.name!r} shares {shared} image(s) with the {name} "
            "(compared by content)",
            "validate on data disjoint from every test set and from the in-distribution "
            "splits: pass another dataset to --ood-validation (or give the benchmark's OOD "
            "entries for it `classes:` disjoint from the in-distribution classes)")


# ------------------------------------------------------------------------------ the loaded model
@dataclass
class LoadedRun:
    """A run's trained model on its device, its cache, and a count of the images the model
    actually processed (a hook on the head, so every forward pass is seen, whoever runs it)."""

    model: Any  # oodbench.models.Classifier
    weights: str
    code: str
    device: torch.device
    cache: Any  # oodbench.cache.OutputCache
    batch_size: int
    progress: ProgressFactory = no_progress
    imported: dict[str, Any] | None = None  # set for runs made by `import-checkpoint`
    images_forwarded: int = 0
    log: list[str] = field(default_factory=list)
    # entry folder name → (seconds, keys) of the entries this command's sharded pass wrote
    sharded: dict[str, tuple[float, list[str]]] = field(default_factory=dict)
    head: tuple[torch.Tensor, torch.Tensor] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        def count(module: Any, args: tuple[Any, ...]) -> None:
            self.images_forwarded += int(args[0].shape[0])

        self.model.head.register_forward_pre_hook(count)
        self.head = linear_head(self.model)  # once, not per detector and set

    def entry(self, es: EvalSet) -> CacheEntry:
        return self.cache.entry(cache_key(self.weights, es.data, es.transform, self.code),
                                len(es.data))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def detector_input(lr: LoadedRun, es: EvalSet, out: Outputs | None, p: Plan) -> DetectorInput:
    """What a detector may read about one set: cached outputs (when computed), and the model,
    images and transform (for detectors that run the model themselves)."""
    return DetectorInput(
        es.name, None if out is None else out.logits, es.data.labels.cpu(),
        None if out is None else out.features, {} if out is None else dict(out.blocks),
        p.temperature, lr.model, es.data, es.transform, lr.device, block_names=p.block_names,
        head=lr.head)


def linear_head(model: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W, b) of the model's head when it is a linear layer (CPU, float64), else None."""
    head = getattr(model, "head", None)
    if not isinstance(head, torch.nn.Linear):
        return None
    bias = head.bias if head.bias is not None else torch.zeros(head.out_features)
    return head.weight.detach().double().cpu(), bias.detach().double().cpu()


# ------------------------------------------------------------------------------ forward passes
@dataclass
class SetResult:
    """One test / OOD set after its forward pass."""

    set: EvalSet
    outputs: Outputs
    forward_seconds: float  # wall time of this set's forward pass
    timed_here: bool  # False: the time stored with the cache entry (no pass ran now)
    computed: list[str]  # cache keys this pass wrote
    shared_scores: dict[str, np.ndarray] = field(default_factory=dict)
    shared_seconds: dict[str, float] = field(default_factory=dict)
    plain_seconds: float | None = None  # estimated plain (no-grad) forward time, when it differs

    @property
    def reference_seconds(self) -> float:
        """The plain forward time of this set: the reference of every detector's cost."""
        return self.forward_seconds if self.plain_seconds is None else self.plain_seconds


def fill_missing(lr: LoadedRun, es: EvalSet, entry: CacheEntry, missing: list[str]) -> float:
    """One no-grad pass writing the entry's missing keys; returns its wall time."""
    writer = EntryWriter(entry, missing, es.data.labels, es.name)
    seconds = forward_into(lr.model, es.data, es.transform, writer, lr.device, lr.batch_size,
                           lr.progress(f"forward {es.label}", len(es.data)))
    writer.commit(seconds, str(lr.device))
    return seconds


def cached_outputs(lr: LoadedRun, es: EvalSet, keys: frozenset[str]) -> Outputs:
    """Outputs of a set from the cache, running one no-grad pass for what is missing."""
    entry = lr.entry(es)
    missing = entry.missing(keys)
    if missing:
        fill_missing(lr, es, entry, missing)
    done = lr.sharded.pop(entry.path.name, None)
    lr.log.append(f"{es.label}: " + (f"forward pass ({_describe(missing)})" if missing
                                    else _sharded_note(done) if done else "from the cache"))
    return entry.load(keys)


def _describe(keys: list[str]) -> str:
    blocks = [k for k in keys if k not in BASE_OUTPUTS]
    base = "logits, features" if "logits" in keys else ""
    return ", ".join(x for x in (base, f"{len(blocks)} block summaries" if blocks else "") if x)


def _sharded_note(done: tuple[float, list[str]]) -> str:
    return (f"forward pass ({_describe(done[1])}) split over "
            f"{joined_world().size} processes")


def forward_eval(lr: LoadedRun, p: Plan, es: EvalSet) -> SetResult:
    """One pass over a test / OOD set: fills the cache keys it lacks and, when the plan has
    gradient detectors, scores them from the same (gradient-recording) forward. Under torchrun
    the cache was filled by the sharded pass (`sharded_forward`), whose time is the record's,
    and the gradient detectors run on rank 0 alone (their recorded forward, timed here)."""
    entry = lr.entry(es)
    missing = entry.missing(p.eval_keys)
    done = lr.sharded.pop(entry.path.name, None)
    result = SetResult(es, None, 0.0, True, missing or (done[1] if done else []))  # type: ignore[arg-type]
    if p.shared:
        writer = EntryWriter(entry, missing, es.data.labels, es.name) if missing else None
        try:
            shared_pass(lr, p, es, writer, result)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.commit(result.forward_seconds, str(lr.device))
    elif missing:
        result.forward_seconds = fill_missing(lr, es, entry, missing)
    elif done:
        result.forward_seconds = done[0]
    else:  # nothing ran: the time stored with the entry is the reference
        result.timed_here = False
        result.forward_seconds = float(entry.meta().get("forward_seconds", 0.0))
    what = [_describe(missing)] if missing else []
    what += [f"shared with {', '.join(p.shared)}"] if p.shared else []
    line = f"forward pass ({'; '.join(what)})" if what else "from the cache"
    if done:
        line = _sharded_note(done) + (f"; {', '.join(p.shared)} on rank 0" if p.shared else "")
    lr.log.append(f"{es.label}: {line}")
    result.outputs = entry.load(p.eval_keys)
    return result


def forward_sets(p: Plan, sets: SetBundle) -> list[tuple[EvalSet, frozenset[str]]]:
    """Every (set, cached outputs) the scoring phases will read, in the order they read them."""
    wanted = []
    if p.fitting and sets.train is not None:
        wanted.append((sets.train, p.fit_keys))
    if p.selecting and sets.val is not None:
        wanted.append((sets.val, p.select_keys))
    if p.wants_ood_validation and sets.ood_val is not None:
        wanted.append((sets.ood_val, p.select_keys))
    return wanted + [(es, p.eval_keys) for es in [*sets.evaluated, *sets.shifted]]


def sharded_forward(lr: LoadedRun, wanted: list[tuple[EvalSet, frozenset[str]]]) -> None:
    """Under torchrun, before anything else: each missing cache entry of `wanted` in one no-grad
    pass split across the ranks (`cache.forward_sharded`: contiguous shards, gathered on rank 0,
    which writes the entry once). Rank 0 decides what is missing before any entry is written,
    so every rank runs the same passes. Afterwards rank 0 finds every output in the cache and
    goes on alone; `images_forwarded` counts every rank's images. No-op for one process."""
    w = joined_world()
    if not w.distributed:
        return
    todo = on_main(lambda: _missing_entries(lr, wanted))
    for i, missing in todo:
        es = wanted[i][0]
        entry = lr.entry(es)
        seconds = forward_sharded(lr.model, es.data, es.transform, missing, entry, lr.device,
                                  lr.batch_size, w, lr.progress(f"forward {es.label}",
                                                                len(es.data)))
        lr.sharded[entry.path.name] = (seconds, missing)
    count = torch.tensor([lr.images_forwarded], device=lr.device)
    lr.images_forwarded = int(all_sum(count).item())


def _missing_entries(lr: LoadedRun, wanted: list[tuple[EvalSet, frozenset[str]]]
                     ) -> list[tuple[int, list[str]]]:
    """(index into `wanted`, missing keys) per cache entry that lacks some; a set wanted
    twice (with different keys) is one entry, asked for the union."""
    keys: dict[str, tuple[int, set[str]]] = {}
    for i, (es, k) in enumerate(wanted):
        name = lr.entry(es).path.name
        first, union = keys.get(name, (i, set()))
        keys[name] = (first, union | k)
    out = [(i, lr.entry(wanted[i][0]).missing(k)) for i, k in keys.values()]
    return [(i, m) for i, m in out if m]


PROBE_EVERY = 8  # one batch in this many is also run plainly (no gradient), to time the plain pass


def shared_pass(lr: LoadedRun, p: Plan, es: EvalSet, writer: EntryWriter | None,
                result: SetResult) -> None:
    """Batch by batch: one forward with the input gradient recorded (parameters frozen), its
    outputs into the cache, then each gradient detector's own steps from that forward. Forward
    and detector times are taken batch by batch, interleaved, so a busy machine slows both; on
    one batch in `PROBE_EVERY` the same inputs also go through a plain no-grad forward, which
    turns the recorded forward's time into the plain forward's (the reference of every cost)."""
    dets = {n: p.detectors[n] for n in p.shared}
    taps = tuple(dict.fromkeys([*(writer.taps if writer else ()), *p.grad_taps]))
    inp = detector_input(lr, es, None, p)
    n, bs = len(es.data), lr.batch_size
    result.shared_scores = {name: np.empty(n) for name in dets}
    result.shared_seconds = dict.fromkeys(dets, 0.0)
    probe = {"recorded": 0.0, "plain": 0.0}
    advance = lr.progress(f"forward + {', '.join(dets)} {es.name}", n)
    with frozen(lr.model):
        for i, start in enumerate(range(0, n, bs)):
            x, out, seconds = _recorded_forward(lr, es, start, taps, writer)
            result.forward_seconds += seconds
            if i % PROBE_EVERY == min(1, (n - 1) // bs):  # batch 1, 9, 17... (0 if alone)
                probe["recorded"] += seconds
                probe["plain"] += _plain_forward_seconds(lr, x)
            for name, det in dets.items():
                tic = time.perf_counter()
                s = np.asarray(det.score_batch(x, out, inp), dtype=np.float64)
                lr.sync()
                result.shared_seconds[name] += time.perf_counter() - tic
                result.shared_scores[name][start:start + len(x)] = s
            advance(len(x))
    result.plain_seconds = result.forward_seconds * probe["plain"] / max(probe["recorded"], 1e-12)


def _recorded_forward(lr: LoadedRun, es: EvalSet, start: int, taps: tuple[str, ...],
                      writer: EntryWriter | None) -> tuple[torch.Tensor, Any, float]:
    tic = time.perf_counter()
    x = es.transform(es.data.images[start:start + lr.batch_size]).requires_grad_(True)
    with torch.enable_grad():
        out = lr.model.forward_all(x, taps=taps)
    if writer is not None:
        writer.write(start, out)
    lr.sync()
    return x, out, time.perf_counter() - tic


@torch.no_grad()
def _plain_forward_seconds(lr: LoadedRun, x: torch.Tensor) -> float:
    tic = time.perf_counter()
    lr.model(x.detach())
    lr.sync()
    return time.perf_counter() - tic


# ------------------------------------------------------------------------------- fit and select
@dataclass
class Setup:
    """Seconds each detector spent fitting / selecting (reported apart from inference cost)."""

    seconds: dict[str, dict[str, float]]


def fit_select(lr: LoadedRun, p: Plan, sets: SetBundle) -> Setup:
    """Fit on in-distribution TRAIN data, then select on the validation split (and the OOD
    validation set only for detectors in "ood" mode; an OOD TEST set only for "oracle" mode,
    asked for with --oracle). No test set has been scored yet. A detector that cannot apply to
    this model (`NotApplicable`) is dropped and recorded with its reason."""
    seconds: dict[str, dict[str, float]] = {n: {} for n in p.detectors}
    if p.fitting:
        assert sets.train is not None
        train = detector_input(lr, sets.train, cached_outputs(lr, sets.train, p.fit_keys), p)
        p.fit_source = lr.entry(sets.train).path.name
        for n in p.fitting:
            _timed(p, n, seconds[n], "fit", lambda d: d.fit(train))
    if p.selecting:
        assert sets.val is not None
        val = detector_input(lr, sets.val, cached_outputs(lr, sets.val, p.select_keys), p)
        extra = {n: _selection_negatives(lr, p, sets, n) for n in p.selecting}
        for n in p.selecting:
            _timed(p, n, seconds[n], "select", lambda d, n=n: d.select(val, extra[n]))
    settle_shared(p)
    return Setup(seconds)


def _timed(p: Plan, name: str, into: dict[str, float], step: str,
           call: Callable[[Detector], Any]) -> None:
    tic = time.perf_counter()
    try:
        call(p.detectors[name])
    except NotApplicable as e:
        p.refuse(name, e)
    into[step] = time.perf_counter() - tic


def _selection_negatives(lr: LoadedRun, p: Plan, sets: SetBundle,
                         name: str) -> DetectorInput | None:
    """The OOD data a detector's selection may read: the OOD validation set in "ood" mode, the
    named OOD test set in "oracle" mode, nothing otherwise (FGSM copies are made inside)."""
    if name in p.wants_ood_validation and sets.ood_val is not None:
        es = sets.ood_val
    elif name in p.wants_oracle and p.oracle:
        es = sets.ood_set(p.oracle)
    else:
        return None
    return detector_input(lr, es, cached_outputs(lr, es, p.select_keys), p)


# -------------------------------------------------------------------------------------- score
@dataclass
class DetectorScores:
    per_set: dict[str, np.ndarray]
    seconds: float  # the detector's own time over the test + OOD sets
    cost: float  # inference time per sample / the plain forward time per sample (same run)
    cost_basis: str

    def nonfinite(self) -> dict[str, int]:
        bad = {s: int((~np.isfinite(v)).sum()) for s, v in self.per_set.items()}
        return {s: n for s, n in bad.items() if n}


def score_sets(lr: LoadedRun, p: Plan, results: list[SetResult]) -> dict[str, DetectorScores]:
    """Every detector on every evaluated set. Cost, in plain forward passes over the same
    samples: a gradient-free detector adds its own time to the plain pass ((plain + own) /
    plain); a gradient detector pays the gradient-recording forward, which is its clean
    forward, plus its own steps ((recorded + own) / plain)."""
    plain = sum(r.reference_seconds for r in results)
    recorded = sum(r.forward_seconds for r in results)
    basis = ("plain forward pass timed in this run, batch by batch beside the detector"
             if all(r.timed_here for r in results) else
             "forward time stored with the cache entries (no forward pass ran now)")
    out = {}
    for name, det in list(p.detectors.items()):
        per_set, own = {}, 0.0
        for r in results:
            if name in p.shared:
                per_set[r.set.name] = r.shared_scores[name]
                own += r.shared_seconds[name]
                continue
            try:
                per_set[r.set.name], seconds = _scored(lr, p, det, r)
            except NotApplicable as e:
                p.refuse(name, e)
                break
            own += seconds
        if name in p.not_applicable:
            continue
        total = (recorded + own) if name in p.shared else (plain + own)
        out[name] = DetectorScores(per_set, own, total / max(plain, 1e-12), basis)
    return out


def _scored(lr: LoadedRun, p: Plan, det: Detector, r: SetResult) -> tuple[np.ndarray, float]:
    """The detector's scores of one set, and its own seconds: assembling its input and scoring,
    plus the seconds its derived output took to compute, now or when it was stored (reading the
    stored copy is not what the method costs)."""
    tic = time.perf_counter()
    inp = detector_input(lr, r.set, r.outputs, p)
    mid = time.perf_counter()
    inp, derive_seconds = with_derived(lr, p, det, r.set, inp)
    start = time.perf_counter()
    scores = det(inp)
    return scores, (mid - tic) + derive_seconds + (time.perf_counter() - start)


def with_derived(lr: LoadedRun, p: Plan, det: Detector, es: EvalSet, inp: DetectorInput
                 ) -> tuple[DetectorInput, float]:
    """`inp` with the detector's derived output (e.g. KNN's top-K neighbours) of this set: the
    copy stored in the set's cache entry when the same train outputs, set outputs, parameters
    and code made it before, else computed now and stored. The scores are the same either way.
    Also the seconds the derived output took to compute (0 without one)."""
    spec = det.derived_output() if det.fitted else None
    if spec is None or (det.requires_fit and p.fit_source is None):
        return inp, 0.0
    value, _, seconds = lr.entry(es).derived(spec.name, {**spec.params, "fit": p.fit_source},
                                             spec.code, lambda: det.derive(inp))
    inp.derived[spec.name] = value
    return inp, seconds


# ----------------------------------------------------------------------------------- assemble
def detector_record(det: Detector, s: DetectorScores, test: str, p: Plan,
                    setup: dict[str, float], correct: np.ndarray,
                    shifted: tuple[str, ...] = ()) -> dict[str, Any]:
    """One detector's entry in metrics.json. No metric is computed from non-finite scores: a
    set with any is left out (and the in-dist test set's block every set). `correct` flags the
    classifier's right predictions on the test set: the score is also judged as a confidence
    (misclassification detection, risk–coverage; with each OOD set mixed in as errors)."""
    from oodbench.metrics import ood_metrics, selective_metrics, selective_with_ood

    bad = s.nonfinite()
    in_scores = s.per_set[test]
    others = {} if test in bad else {o: v for o, v in s.per_set.items()
                                     if o != test and o not in bad and o not in shifted}
    ood = {o: ood_metrics(in_scores, v) for o, v in others.items()}
    selective = {} if test in bad else {
        "in_distribution": selective_metrics(in_scores, correct),
        "with_ood": {o: selective_with_ood(in_scores, correct, v) for o, v in others.items()}}
    record = {"ood": ood, "selective": selective, "cost": s.cost, "cost_basis": s.cost_basis,
              "temperature": p.temperature, "calibrated": p.calibrated,
              **det.describe(), "setup_seconds": setup}
    if shifted and test not in bad:
        record["shift"] = shift_record(in_scores, {k: s.per_set[k] for k in shifted
                                                   if k not in bad}, others)
    if bad:
        record["nonfinite"] = bad
    return record


def shift_record(in_scores: np.ndarray, shifted: dict[str, np.ndarray],
                 ood: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per shifted set: the shifted set taken as OOD (is the shift detected?), and full-spectrum
    (shifted samples count as in-distribution, next to the clean test set, against each OOD
    set: does the detector still accept what the classifier should handle?)."""
    from oodbench.metrics import ood_metrics

    out = {}
    for name, v in shifted.items():
        spectrum = np.concatenate([in_scores, v])
        out[name] = {"as_ood": ood_metrics(in_scores, v),
                     "full_spectrum": {o: ood_metrics(spectrum, w) for o, w in ood.items()}}
    return out


def assemble(cfg: RunConfig, lr: LoadedRun, p: Plan, sets: SetBundle,
             results: list[SetResult], scores: dict[str, DetectorScores], setup: Setup,
             calibration: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics record of one run (what metrics.json holds and `report` reads)."""
    from oodbench.metrics import classification_metrics, selective_metrics

    bench, test = cfg.benchmark, sets.test
    logits, labels = results[0].outputs.logits, results[0].outputs.labels
    correct = (logits.argmax(1) == labels).numpy()
    shift = {r.set.name: {"corruption": r.set.group.split(":")[0],
                          "severity": int(r.set.group.split(":")[1]),
                          "classification": classification_metrics(r.outputs.logits,
                                                                   r.outputs.labels)}
             for r in results if r.set.role == "shift"}
    classification = {"uncalibrated": classification_metrics(logits, labels)}
    temps = {"uncalibrated": 1.0}
    if calibration is not None:
        classification["calibrated"] = classification_metrics(
            logits, labels, float(calibration["temperature"]))
        temps["calibrated"] = float(calibration["temperature"])
    # the baseline confidence: MSP, at T = 1 and at the fitted temperature
    classification["selective_msp"] = {
        state: selective_metrics(torch.softmax(logits.double() / t, 1).max(1).values.numpy(),
                                 correct) for state, t in temps.items()}
    return {
        "schema": "oodbench.metrics/1", "benchmark": bench.name,
        "in_distribution": bench.dataset, "model": bench.model, "loss": cfg.loss,
        "seed": cfg.seed, "ood_sets": {o.name: o.group for o in bench.ood},
        "n": {r.set.name: len(r.set.data) for r in results},
        "shift": shift,
        "classification": classification, "calibration": calibration,
        "detectors": {**{n: detector_record(d, scores[n], test.name, p, setup.seconds[n],
                                            correct, tuple(shift))
                         for n, d in p.detectors.items()},
                      **{n: {"applicable": False, "reason": reason, "ood": {}}
                         for n, reason in p.not_applicable.items()}},
        "forward": {r.set.name: {"seconds": r.forward_seconds, "timed_here": r.timed_here,
                                 "computed": r.computed} for r in results},
        "batch_size": lr.batch_size, "weights": lr.weights, "code": lr.code,
        "test_set": test.name,
        "cache_keys": {r.set.name: cache_key(lr.weights, r.set.data, r.set.transform, lr.code)
                       for r in results},
    }


# --------------------------------------------------------------------------------- batch size
BATCH_CANDIDATES = {"cpu": (32, 64, 128, 256, 512), "cuda": (256, 512, 1024, 2048)}


@torch.no_grad()
def measure_batch_size(model: Any, images: torch.Tensor, transform: InputTransform,
                       device: torch.device) -> tuple[int, dict[int, float]]:
    """The inference batch size with the highest measured throughput on this device (images/s
    of a no-grad forward at each candidate, after one warm-up batch). Small batches often win
    on a CPU (they stay in cache), large ones on a GPU."""
    candidates = BATCH_CANDIDATES.get(device.type, (64, 128, 256))
    rates: dict[int, float] = {}
    model.eval()
    model(transform(images[:candidates[0]].to(device)))
    for b in candidates:
        if b > len(images) and rates:
            break
        x = transform(images[:b].to(device))
        tic = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates[b] = len(x) / max(time.perf_counter() - tic, 1e-9)
    return max(rates, key=lambda b: rates[b]), rates
