"""From a benchmark or run config to concrete objects: the in-distribution splits, the OOD sets
with their input transforms, and the model. Shared by train, calibrate and score so they agree
exactly. Also where a config's names are checked against the registries (`check_benchmark`),
which config.py, below the registries, cannot do."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from oodbench.config import BenchmarkConfig, OODSet, RunConfig, load_benchmark
from oodbench.data import (
    DataContext,
    DatasetInfo,
    ImageSet,
    InputTransform,
    absolute_dataset_name,
    get_dataset,
)
from oodbench.data.corruptions import SHIFT_SEED, check_corruption_names, corrupt, shifted_name
from oodbench.detectors import DETECTORS
from oodbench.errors import OodbenchError
from oodbench.losses import LOSSES
from oodbench.models import MODELS, Classifier, build_classifier, check_block_activation


def check_benchmark(bench: BenchmarkConfig, source: str = "<benchmark>") -> BenchmarkConfig:
    """Every name the benchmark uses exists (model, datasets, losses the model can run,
    detectors), so a typo fails before any work, listing the valid names. Returns `bench`."""
    MODELS.get(bench.model)
    source_set = get_dataset(bench.dataset)
    for loss in bench.losses:
        check_block_activation(bench.model, LOSSES.get(loss).block_activation, loss)
    if bench.normalization is not None:
        channels = source_set.info_for().channels
        if any(len(values) != channels for values in bench.normalization.values()):
            raise OodbenchError(f"{source}: normalization must be {{mean: [...], std: [...]}} "
                                f"with {channels} value(s) each and std > 0",
                                "fix or remove the `normalization` key")
    for det in bench.detectors:
        DETECTORS.get(det)
    for o in bench.ood:
        get_dataset(o.dataset)
        if o.name.startswith("shift-"):
            raise OodbenchError(f"{source}: OOD name {o.name!r} starts with 'shift-', the prefix "
                                "of the corrupted test sets", "give the entry another `name`")
    if bench.shift is not None:
        check_corruption_names(bench.shift.corruptions, "shift.corruptions")
    if bench.outliers is not None:
        get_dataset(bench.outliers.dataset)
    return bench


def load_checked_benchmark(name_or_path: str) -> BenchmarkConfig:
    """`config.load_benchmark` plus `check_benchmark`: what commands load a benchmark with."""
    return check_benchmark(load_benchmark(name_or_path), name_or_path)


def check_run_config(cfg: RunConfig, source: str = "<run>") -> RunConfig:
    """`check_benchmark` for a run folder's config, plus the run's own loss. Returns `cfg`."""
    check_benchmark(cfg.benchmark, source)
    check_block_activation(cfg.benchmark.model, LOSSES.get(cfg.loss).block_activation, cfg.loss)
    return cfg


def in_distribution_info(cfg: RunConfig) -> DatasetInfo:
    bench = cfg.benchmark
    info = get_dataset(bench.dataset).info_for()
    if bench.classes:
        names = info.class_names
        info = replace(info, num_classes=len(bench.classes),
                       class_names=tuple(names[c] for c in bench.classes) if names else ())
    if bench.normalization:  # pretrained weights bring their own input normalisation
        info = replace(info, mean=tuple(float(v) for v in bench.normalization["mean"]),
                       std=tuple(float(v) for v in bench.normalization["std"]))
    return info


def load_in_distribution(cfg: RunConfig, split: str, ctx: DataContext) -> ImageSet:
    """train / val / test of the in-distribution set, restricted to the benchmark's classes.

    When the dataset has no "val" split, val is a seeded, fixed fraction held out of train
    (never the test split), and train is the rest.
    """
    bench = cfg.benchmark
    source = get_dataset(bench.dataset)
    if split in ("train", "val") and "val" not in source.splits:
        full = source.load("train", ctx)
        g = torch.Generator().manual_seed(1234)
        perm = torch.randperm(len(full), generator=g)
        n_val = max(1, int(round(len(full) * bench.train.val_fraction)))
        data = full.subset(perm[:n_val] if split == "val" else perm[n_val:])
    else:
        data = source.load(split, ctx)
    if bench.classes:
        data = data.select_classes(list(bench.classes))
    return data


def load_ood(cfg: RunConfig, ood: OODSet, ctx: DataContext) -> tuple[ImageSet, InputTransform]:
    """An OOD set and the transform that feeds it to the model (the model's normalisation, plus
    resize / channel adaptation only when the benchmark asks for it)."""
    like = in_distribution_info(cfg)
    data = get_dataset(ood.dataset).load(ood.split, ctx, like=like)
    if ood.classes:
        data = data.select_classes(list(ood.classes))
        data = ImageSet(data.name, data.images, torch.full_like(data.labels, -1), data.info)
    data = ImageSet(ood.name, data.images, data.labels, data.info)
    transform = InputTransform.for_model(like)
    c, h, w = data.shape
    if (c, h) != (like.channels, like.image_size) or h != w:
        if not ood.adapt:
            raise OodbenchError(
                f"OOD set {ood.name!r} is {c}×{h}×{w} but the model takes "
                f"{like.channels}×{like.image_size}×{like.image_size}",
                f"set `adapt: true` on {ood.name!r} in the benchmark to resize / replicate "
                "channels explicitly",
            )
        transform = transform.adapted(like.image_size, like.channels)
    return data, transform


def load_shifted(cfg: RunConfig, corruption: str, severity: int, ctx: DataContext
                 ) -> tuple[ImageSet, InputTransform]:
    """The in-distribution test set with `corruption` at `severity` (1..5), named
    `shift-<corruption>-<severity>`, labels kept (covariate shift, not a new class), and the
    model's own input transform. Recomputed on each call, not cached on disk: it is
    deterministic (seeded by corruption, severity and `SHIFT_SEED`) and cheap (0.1 to 2.5 s
    per set of 10,000 CIFAR images on two busy CPU cores, 34 s for all 25 sets), where storing
    the 25 sets would take 770 MB per dataset."""
    check_corruption_names([corruption], "corruption")
    test = load_in_distribution(cfg, "test", ctx)
    images = corrupt(test.images, corruption, severity, SHIFT_SEED)
    data = ImageSet(shifted_name(corruption, severity), images, test.labels, test.info)
    return data, InputTransform.for_model(in_distribution_info(cfg))


def load_outliers(cfg: RunConfig, ctx: DataContext) -> ImageSet:
    """The benchmark's auxiliary outlier set (Outlier Exposure, energy-ft), as uint8 images of
    the model's input shape (adapted once here when `adapt: true`, so training treats them like
    the training set), after checking that it shares no image with any OOD test set or any
    in-distribution split: training on a test image would inflate every score, on a validation
    image bias calibration and selection, and on a training image teach it both its class and
    the uniform outlier target."""
    o = cfg.benchmark.outliers
    if o is None:
        raise OodbenchError(
            f"loss {cfg.loss!r} trains with auxiliary outliers, but benchmark "
            f"{cfg.benchmark.name!r} names none",
            "add e.g. `outliers: {dataset: blobs, split: train}` to the benchmark (a set "
            "disjoint from every OOD test set)")
    data, transform = load_ood(cfg, OODSet(o.dataset, name="outliers", split=o.split,
                                           adapt=o.adapt), ctx)
    tests = [(f"OOD test set {t.name!r}", load_ood(cfg, t, ctx)[0].image_hashes())
             for t in cfg.benchmark.ood]
    check_outliers_disjoint(f"{o.dataset} ({o.split})", data,
                            tests + in_distribution_holdout(cfg, ctx))
    images = data.images
    if transform.size is not None or transform.channels is not None:
        images = torch.cat([(transform.adapt(images[s:s + 4096].float() / 255.0) * 255.0)
                            .round().clamp(0, 255).to(torch.uint8)
                            for s in range(0, len(data), 4096)])
    return ImageSet(f"outliers-{o.dataset}", images, torch.full((len(data),), -1), data.info)


def first_shared(mine: set[bytes], against: Iterable[tuple[str, set[bytes]]]
                 ) -> tuple[str, int] | None:
    """The first named set of `against` sharing an image hash with `mine`, and how many: the
    one "disjoint by content" test of outliers, OOD test and OOD validation sets."""
    for name, hashes in against:
        shared = len(mine & hashes)
        if shared:
            return name, shared
    return None


def check_outliers_disjoint(label: str, outliers: ImageSet,
                            against: list[tuple[str, set[bytes]]]) -> None:
    """Refuse auxiliary outliers that share an image (by content) with a set scored or trained
    on (`against`: names and image hashes)."""
    if found := first_shared(outliers.image_hashes(), against):
        name, shared = found
        raise OodbenchError(
            f"auxiliary outlier set {label} shares {shared} image(s) with the {name} "
            "(compared by content); training on them as outliers would leak or contradict "
            "that set",
            "name an outlier set disjoint from the in-distribution data and every test "
            "set in the benchmark's `outliers:` (another dataset or split, e.g. "
            "`outliers: {dataset: blobs}`)")


ID_SPLITS = ("test", "val", "train")  # the order the overlap errors name them in


def in_distribution_holdout(cfg: RunConfig, ctx: DataContext,
                            loaded: Mapping[str, ImageSet] | None = None
                            ) -> list[tuple[str, set[bytes]]]:
    """Content hashes of the in-distribution splits no OOD set (test or validation) may share an
    image with: the test split, scored as in-distribution, the validation split that
    calibration and selection use, and the training split the model learnt as in-distribution,
    each exactly as `load_in_distribution` makes it (restricted to the benchmark's classes;
    val carved out of train by `val_fraction` when the dataset has no val split). An image on
    both sides would be scored, tuned on or trained on as in-distribution and scored as OOD.
    `loaded`: splits the caller already holds, hashed instead of loaded again."""
    loaded = loaded or {}
    return [(f"in-distribution {split} split ({cfg.benchmark.dataset})",
             (loaded[split] if split in loaded else load_in_distribution(cfg, split, ctx))
             .image_hashes()) for split in ID_SPLITS]


def check_ood_test_set(data: ImageSet, held: list[tuple[str, set[bytes]]]) -> ImageSet:
    """Refuse an OOD test set that shares an image (by content) with an in-distribution split of
    `held` (`in_distribution_holdout`): e.g. the in-distribution dataset's val split, all its
    classes, or classes overlapping the in-distribution ones. Returns `data`."""
    if found := first_shared(data.image_hashes(), held):
        name, shared = found
        raise OodbenchError(
            f"OOD test set {data.name!r} shares {shared} image(s) with the {name} "
            "(compared by content); they would count as both in-distribution and OOD",
            f"take {data.name!r} from another dataset or split, or give its entry `classes:` "
            "disjoint from the in-distribution classes (as benchmark digits-near does)")
    return data


def check_benchmark_sets(cfg: RunConfig, ctx: DataContext) -> None:
    """Load every set the run will train on or score (in-distribution train / val / test and
    each OOD entry, exactly as training and scoring load them) and check its shape, and that
    no OOD set shares an image with an in-distribution split, raising one error that lists
    every problem.

    Run before a run folder is created: an empty OOD folder, a file that is not an image or a
    wrong-shaped set otherwise surfaces only at `score`, after training, when the run's config
    (and so `adapt: true`) can no longer change. Loads go through the decode cache, so the
    training and scoring that follow read the decoded arrays instead of decoding again."""
    problems: dict[str, tuple[list[str], OodbenchError]] = {}

    def attempt(label: str, check: Callable[[], object]) -> bool:
        try:
            check()
        except OodbenchError as e:
            problems.setdefault(str(e), ([], e))[0].append(label)
            return False
        return True

    bench = cfg.benchmark
    if attempt(f"in-distribution {bench.dataset!r}", lambda: _in_distribution_ok(cfg)):
        splits: dict[str, ImageSet] = {}
        loaded = [attempt(f"in-distribution {split} split ({bench.dataset})",
                          lambda split=split: splits.update({split: _split_ok(cfg, split, ctx)}))
                  for split in ("train", "val", "test")]
        held = in_distribution_holdout(cfg, ctx, splits) if all(loaded) else []
        for o in bench.ood:
            attempt(f"OOD set {o.name!r}" + (f" ({o.dataset})" if o.name != o.dataset else ""),
                    lambda o=o: check_ood_test_set(load_ood(cfg, o, ctx)[0], held))
        if LOSSES.get(cfg.loss).criterion.needs_outliers:
            attempt("auxiliary outliers", lambda: load_outliers(cfg, ctx))  # disjoint too
    if problems:
        raise _data_problems(bench.name, list(problems.values()))


def _in_distribution_ok(cfg: RunConfig) -> DatasetInfo:
    info = in_distribution_info(cfg)
    if info.num_classes < 2:
        raise OodbenchError(
            f"in-distribution dataset {cfg.benchmark.dataset!r} has {info.num_classes} "
            "class(es); a classifier needs at least 2",
            "use a folder with one subfolder per class (or a labelled dataset)")
    return info


def _split_ok(cfg: RunConfig, split: str, ctx: DataContext) -> ImageSet:
    """One in-distribution split loads and matches the shape and classes the model is built
    for (a `folder:` set's train/ and test/ may disagree; the model follows the first).
    Returns it."""
    like = in_distribution_info(cfg)
    data = load_in_distribution(cfg, split, ctx)
    expected = (like.channels, like.image_size, like.image_size)
    if data.shape != expected:
        raise OodbenchError(
            f"{cfg.benchmark.dataset} {split}: images are {'×'.join(map(str, data.shape))}, "
            f"but the model is built for {'×'.join(map(str, expected))}",
            "give every split of the in-distribution dataset one image size")
    if data.info.num_classes != like.num_classes or (
            data.info.class_names and like.class_names
            and data.info.class_names != like.class_names):
        raise OodbenchError(
            f"{cfg.benchmark.dataset} {split}: classes {list(data.info.class_names)} differ "
            f"from the model's {list(like.class_names)}",
            "give every split of the in-distribution dataset the same class folders")
    return data


def _data_problems(benchmark: str, problems: list[tuple[list[str], OodbenchError]]
                   ) -> OodbenchError:
    lines = []
    for labels, err in problems:
        lines.append(f"  - {', '.join(labels)}: {err.message}")
        if err.hint:
            lines.append(f"    fix: {err.hint}")
    n = sum(len(labels) for labels, _ in problems)
    return OodbenchError(
        f"benchmark {benchmark!r}: {n} set(s) cannot be used (checked before training):\n"
        + "\n".join(lines),
        "fix each set listed (or remove its entry from the benchmark), then run again")


def with_absolute_folders(bench: BenchmarkConfig, base: Path | None = None) -> BenchmarkConfig:
    """A copy of `bench` whose `folder:` dataset names (in-distribution and every OOD entry)
    are absolute (`data.absolute_dataset_name`), so a run's stored config reads the same
    images whichever directory it is later scored from. OOD display names are kept."""
    out = copy.deepcopy(bench)  # nothing shared: callers go on to edit their copy's train
    out.dataset = absolute_dataset_name(out.dataset, base)
    for o in out.ood:
        o.dataset = absolute_dataset_name(o.dataset, base)
    if out.outliers is not None:
        out.outliers.dataset = absolute_dataset_name(out.outliers.dataset, base)
    return out


def build_model(cfg: RunConfig) -> Classifier:
    info = in_distribution_info(cfg)
    spec = LOSSES.get(cfg.loss)
    check_block_activation(cfg.benchmark.model, spec.block_activation, cfg.loss)
    return build_classifier(cfg.benchmark.model, spec.head, info.num_classes, info.channels,
                            info.image_size, spec.block_activation)


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


def pick_device(name: str | None = None) -> torch.device:
    """'auto' (or None) = CUDA if available, else Apple MPS, else CPU. An explicit device this
    machine lacks is an error naming the alternatives, before any work (torch itself would fail
    later with a traceback, or not at all until the first tensor moves)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise OodbenchError("no MPS (Apple GPU) device here", "use --device cpu or auto")
        return torch.device("mps")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise OodbenchError(f"unknown device {name!r}", f"use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise OodbenchError("no CUDA device here", "use --device cpu or auto")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise OodbenchError(f"no CUDA device {int(index)}: this machine has {count} "
                            f"(cuda:0 to cuda:{count - 1})",
                            f"use --device cuda:0 to cuda:{count - 1}, or auto")
    return torch.device(f"cuda:{int(index)}" if index else "cuda")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())
