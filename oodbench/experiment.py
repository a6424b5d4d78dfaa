"""From a benchmark or run config to concrete objects: the in-distribution splits, the OOD sets
with their input transforms, and the model. Shared by train, calibrate and score so they agree
exactly. Also where a config's names are checked against the registries (`check_benchmark`),
which config.py, below the registries, cannot do."""

from __future__ import annotations

from dataclasses import replace

import torch

from oodbench.config import BenchmarkConfig, OODSet, RunConfig, load_benchmark
from oodbench.data import DataContext, DatasetInfo, ImageSet, InputTransform, get_dataset
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


def build_model(cfg: RunConfig) -> Classifier:
    info = in_distribution_info(cfg)
    spec = LOSSES.get(cfg.loss)
    check_block_activation(cfg.benchmark.model, spec.block_activation, cfg.loss)
    return build_classifier(cfg.benchmark.model, spec.head, info.num_classes, info.channels,
                            info.image_size, spec.block_activation)


def pick_device(name: str | None = None) -> torch.device:
    """'auto' (or None) = CUDA if available, else Apple MPS, else CPU."""
    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
