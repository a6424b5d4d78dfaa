"""Turning a published pretrained checkpoint into a finished oodbench run folder, so calibrate,
score and report treat it exactly like a model trained here.

The run's config is the chosen benchmark with the model replaced by the checkpoint's, the loss
`softmax` (these checkpoints are plain cross-entropy networks) and the input normalisation the
weights were trained with (e.g. ImageNet mean/std for the akamaster CIFAR ResNets; the
benchmark dataset's own for a registered model's plain `state_dict`, as oodbench trains it),
recorded in the benchmark's `normalization` key so every later step feeds the network the same
way.
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from oodbench.config import CheckpointEntry, RunConfig
from oodbench.errors import OodbenchError
from oodbench.experiment import (
    build_model,
    check_benchmark,
    in_distribution_info,
    load_checked_benchmark,
)
from oodbench.io import read_json
from oodbench.models import MODELS
from oodbench.models.pretrained import CHECKPOINT_FORMATS, read_foreign_checkpoint
from oodbench.runs import (
    Run,
    WeightsMismatch,
    checkpoint_problem,
    load_checkpoint,
    load_weights,
)
from oodbench.train import save_checkpoint, write_manifest


def default_import_dir(benchmark: str, model: str, fmt: str, root: Path = Path("runs")) -> Path:
    return root / benchmark / f"{model}-{fmt}"


def import_checkpoint(path: Path, model: str, benchmark: str, run_dir: Path | None = None,
                      seed: int = 0) -> tuple[Run, dict[str, Any]]:
    """Create (or refresh) a finished run folder holding the checkpoint's weights.

    Returns the run and a summary {format, run, metadata}. The weights are loaded strictly into
    the model the benchmark would build, so a wrong model or number of classes is an error.
    """
    fmt_name, state, meta = read_foreign_checkpoint(Path(path))
    fmt = CHECKPOINT_FORMATS.get(fmt_name)
    if fmt.models and model not in fmt.models:
        raise OodbenchError(f"a {fmt_name} checkpoint holds one of {list(fmt.models)}, "
                            f"not {model!r}", f"pass --model with one of {list(fmt.models)}")
    MODELS.get(model)  # an unknown name lists the registered models
    bench = replace(load_checked_benchmark(benchmark), model=model, losses=["softmax"],
                    checkpoints=[])  # the run holds one of them; its config says which model
    if fmt.mean is None or fmt.std is None:  # trained as oodbench does: the dataset's own
        info = in_distribution_info(RunConfig(bench, "softmax", seed, {}))
        mean, std = info.mean, info.std
    else:
        mean, std = fmt.mean, fmt.std
    bench = replace(bench, normalization={"mean": list(mean), "std": list(std)})
    source = f"{benchmark} (imported {fmt_name} checkpoint)"
    bench.validate(source)
    check_benchmark(bench, source)
    cfg = RunConfig(bench, "softmax", seed, {})
    classifier = build_model(cfg)
    mismatch = WeightsMismatch.between(classifier, state)
    if mismatch:  # checked before the run folder exists: a failed import leaves nothing
        raise _mismatch_error(mismatch, state, cfg, fmt.models or tuple(MODELS.names()),
                              Path(path))
    load_weights(classifier, state, str(path))
    run = Run.create(run_dir or default_import_dir(bench.name, model, fmt_name), cfg)
    refuse_other_weights(run, classifier.state_dict(), Path(path))
    imported = {"path": str(Path(path).resolve()), "format": fmt_name, **meta}
    save_checkpoint(run, {
        "model": classifier.state_dict(), "optimizer": {}, "epoch": bench.train.epochs,
        "step": 0, "history": [], "finished": True, "imported": imported,
    })
    write_import_manifest(run, Path(path), imported)
    return run, {"format": fmt_name, "run": str(run.path), "metadata": meta}


def resolve_checkpoint(entry: CheckpointEntry, root: Path) -> Path:
    """The one file a benchmark's `checkpoints:` entry names: its `path` under the data root
    `root` (unless absolute), a glob allowed; none or several matching is an error."""
    pattern = Path(entry.path).expanduser()
    pattern = pattern if pattern.is_absolute() else root / pattern
    found = sorted(Path(p) for p in glob.glob(str(pattern)) if Path(p).is_file())
    if len(found) == 1:
        return found[0]
    what = "no file" if not found else f"{len(found)} files ({', '.join(map(str, found[:3]))})"
    raise OodbenchError(
        f"checkpoint {entry.name!r}: {pattern} matches {what}",
        "put the checkpoint there, point --data-root / $OODBENCH_DATA at the folder holding "
        f"{entry.path}, or give the entry's `path:` as one file"
        + (" (a narrower glob)" if found else ""))


def refuse_other_weights(run: Run, weights: dict[str, torch.Tensor], path: Path) -> None:
    """An import into a folder that already holds a checkpoint is a no-op re-import when it
    holds these very weights, imported; else an error: its calibration and scores describe
    the weights it holds (and a run trained here is not overwritten)."""
    if not run.checkpoint_path.exists():
        return
    try:
        held = load_checkpoint(run.checkpoint_path)
    except OodbenchError:
        held = {"model": {}, "imported": {"path": "an unreadable checkpoint"}}
    source = held.get("imported")
    if isinstance(source, dict) and _same_weights(held["model"], weights):
        return
    what = (f"other weights (imported from {source.get('path')})" if isinstance(source, dict)
            else "a run trained here")
    raise OodbenchError(
        f"{run.path} already holds {what}; importing {path} there would leave its calibration "
        "and scores describing those",
        f"delete {run.path} to import {path} there, or pass another --run-dir")


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def imported_from(run: Run) -> str | None:
    """The checkpoint file a run folder's weights were imported from (None: trained here)."""
    imported = load_checkpoint(run.checkpoint_path).get("imported")
    return imported.get("path") if isinstance(imported, dict) else None


def imported_sha256(run: Run) -> str | None:
    """The sha256 of the file a run folder's weights were imported from, as its manifest
    records it (None: trained here, or no record)."""
    try:
        imported = read_json(run.path / "manifest.json").get("imported")
    except (OSError, ValueError, AttributeError):
        return None
    return imported.get("sha256") if isinstance(imported, dict) else None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_import_manifest(run: Run, path: Path, imported: dict[str, Any]) -> None:
    """The run's manifest.json, written as `train` writes one, with where the weights came from
    (file, format, the file's sha256), so a published record says which checkpoint its numbers
    belong to. The weights are loaded on the CPU."""
    sha = file_sha256(path)
    write_manifest(run, torch.device("cpu"), {}, [], imported={**imported, "sha256": sha})


def _mismatch_error(mismatch: WeightsMismatch, state: dict[str, Any], cfg: RunConfig,
                    models: tuple[str, ...], path: Path) -> OodbenchError:
    """The mismatch summarised, naming the format's model whose keys and shapes the checkpoint
    has (the usual cause: a wrong --model), found by building each candidate."""
    given = cfg.benchmark.model
    if _head_only(mismatch):
        return _head_error(mismatch, path)
    for name in models:
        if name == given:
            continue
        try:  # on the meta device: shapes only, no memory, no initialisation
            with torch.device("meta"):
                other = build_model(replace(cfg, benchmark=replace(cfg.benchmark, model=name)))
        except OodbenchError:  # built for another input size, say
            continue
        if not WeightsMismatch.between(other, state):
            cause = (f"the checkpoint looks like {name} but --model {given} was given "
                     f"({mismatch.likely_cause()})")
            return mismatch.error(str(path), cause, f"pass --model {name}")
    return mismatch.error(str(path), hint=f"pass the checkpoint's model (one of {list(models)}) "
                          "and a benchmark with its number of classes")


def _head_only(mismatch: WeightsMismatch) -> bool:
    """The backbone matches and the head has other parameters (not just other shapes)."""
    keys = mismatch.missing + mismatch.unexpected + [k for k, _, _ in mismatch.shapes]
    return bool(mismatch.missing or mismatch.unexpected) and all(
        k.startswith("head.") for k in keys)


def _head_error(mismatch: WeightsMismatch, path: Path) -> OodbenchError:
    """A checkpoint whose backbone fits and whose head is not a linear classifier: a DisMax or
    IsoMax+ prototype head, say. The loss is not an option of the import (imports are linear
    heads), so the fix is another checkpoint, or no import at all for a run trained here."""
    prototypes = any(k.endswith("prototypes") for k in mismatch.unexpected)
    cause = ("its head is not a linear classifier: it has "
             f"{', '.join(mismatch.unexpected) or 'other parameters'} where a linear head has "
             f"{', '.join(mismatch.missing) or 'others'}"
             + (" (a prototype head, as DisMax or IsoMax+ train)" if prototypes else ""))
    hint = "only checkpoints with a linear head (trained with the SoftMax loss) can be imported"
    if _oodbench_checkpoint(path):
        folder = path.parent if (path.parent / "config.yaml").exists() else None
        hint += ("; this is an oodbench run's checkpoint, which needs no import: score its run "
                 "folder directly, `oodbench score " + (f"{folder}`" if folder else "RUN_DIR`"))
    return mismatch.error(str(path), cause, hint)


def _oodbench_checkpoint(path: Path) -> bool:
    """`path` is a checkpoint oodbench wrote (a run's `checkpoint.pt`, or a copy of one)."""
    try:
        return checkpoint_problem(torch.load(path, map_location="cpu", weights_only=True)) is None
    except Exception:
        return False
