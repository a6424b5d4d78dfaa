"""The post-training steps over a run folder, as plain functions a user can call from Python:
`calibrate_run` and `score_run` (its phases are in `oodbench.scoring`).

Both read the trained model once and get every dataset's forward outputs through the run's
output cache, so the validation, in-distribution test and OOD sets each pass through the network
at most once per set of weights, whatever the number of detectors, and a second `score` of the
same run runs no forward pass for gradient-free detectors.

Under torchrun (`torchrun --nproc-per-node N -m oodbench score|calibrate ...`) every rank loads
the model and the sets, the forward passes the command needs are split across the ranks
(`scoring.sharded_forward`), and rank 0 alone writes the cache entries, then fits, selects,
scores and writes metrics.json; the other ranks return None after their shards.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodbench import __version__
from oodbench.cache import OutputCache, code_digest, model_digest
from oodbench.calibrate import fit_temperature
from oodbench.config import RunConfig
from oodbench.data import DataContext, get_dataset
from oodbench.data.availability import require_benchmark_data
from oodbench.distributed import joined_world, main_first, on_main
from oodbench.errors import OodbenchError
from oodbench.experiment import build_model, check_run_config, load_in_distribution
from oodbench.io import atomic_write, read_json, update_json, write_json
from oodbench.provenance import run_provenance
from oodbench.runs import Run, load_weights
from oodbench.scoring import (
    EvalSet,
    LoadedRun,
    Plan,
    ProgressFactory,
    SetBundle,
    assemble,
    build_detectors,
    cached_outputs,
    fit_select,
    forward_eval,
    forward_sets,
    load_sets,
    measure_batch_size,
    no_progress,
    plan,
    score_sets,
    sharded_forward,
)

__all__ = ["RunState", "build_detectors", "calibrate_run", "load_run", "run_state", "score_run"]


def environment() -> dict[str, Any]:
    return {"oodbench": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def finished_model(run: Run, device: torch.device, state: dict[str, Any] | None = None
                   ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's trained model (eval mode, on `device`) and its checkpoint (`state`, when the
    caller already read it); an unfinished run is an input error naming the command that
    resumes it."""
    cfg = check_run_config(run.config(), str(run.config_path))
    state = run.require_checkpoint() if state is None else state
    if not state.get("finished"):
        raise OodbenchError(f"{run.path} has not finished training",
                            f"resume it: `oodbench train --run-dir {run.path}`")
    model = build_model(cfg)
    load_weights(model, state["model"], str(run.checkpoint_path))
    return model.to(device).eval(), state


def load_run(run: Run, device: torch.device, progress: ProgressFactory = no_progress,
             batch_size: int | None = None) -> LoadedRun:
    """The run's finished model on `device`, with its cache and inference batch size."""
    model, state = finished_model(run, device)
    if batch_size is not None and batch_size < 1:
        raise OodbenchError(f"--batch-size must be >= 1, got {batch_size}")
    return LoadedRun(model, model_digest(model), code_digest(model), device,
                     OutputCache(run.cache_dir), batch_size or 0, progress, state.get("imported"))


def choose_batch_size(lr: LoadedRun, run: Run, sample: EvalSet) -> None:
    """Measure the fastest inference batch size once per (device, threads, input shape, model
    code) and keep it in the run's cache folder; a user's --batch-size wins. Under torchrun
    rank 0 measures and writes, and every rank uses its choice (per rank, per batch)."""
    if lr.batch_size:
        return
    lr.batch_size = on_main(lambda: _measured_batch_size(lr, run, sample))


def _measured_batch_size(lr: LoadedRun, run: Run, sample: EvalSet) -> int:
    path = run.cache_dir / "batch_size.json"
    key = (f"{lr.device}|threads={torch.get_num_threads()}|{tuple(sample.data.shape)}|"
           f"{lr.code[:16]}")
    known = read_json(path) if path.exists() else {}
    if key not in known:
        best, rates = measure_batch_size(lr.model, sample.data.images, sample.transform,
                                         lr.device)
        entry = {"batch_size": best,
                 "images_per_second": {str(b): round(r, 1) for b, r in rates.items()}}
        known = update_json(path, lambda old: {**(old if isinstance(old, dict) else {}),
                                               key: entry})
        lr.log.append(f"batch size {best} measured ({entry['images_per_second']} img/s)")
    return int(known[key]["batch_size"])


def calibrate_run(run: Run, ctx: DataContext, device: torch.device, objective: str = "nll",
                  progress: ProgressFactory = no_progress,
                  batch_size: int | None = None) -> dict[str, Any] | None:
    """Fit the temperature on the validation split and store it in calibration.json. Under
    torchrun the validation forward pass is split across the ranks and rank 0 fits and writes;
    the other ranks return None."""
    from oodbench.data import InputTransform
    from oodbench.experiment import in_distribution_info

    cfg = run.config()
    lr = load_run(run, device, progress, batch_size)
    with main_first():
        val = EvalSet(load_in_distribution(cfg, "val", ctx).to(device),
                      InputTransform.for_model(in_distribution_info(cfg)), "val")
    choose_batch_size(lr, run, val)
    sharded_forward(lr, [(val, frozenset())])
    if not joined_world().main:
        return None
    out = cached_outputs(lr, val, frozenset())
    result = fit_temperature(out.logits, out.labels, objective)
    result.update(split="val", n=len(val.data), weights=lr.weights)
    if lr.imported is not None and "val" not in get_dataset(cfg.benchmark.dataset).splits:
        # Our own runs never train on the held-out part; a foreign network may have.
        result["warning"] = (
            "this network was imported: the validation split was carved out of the training "
            "split, which its authors may have trained on, so the temperature may be fitted "
            "on seen data (typically too low)")
    write_json(run.calibration_path, result)
    result["forward_log"], result["images_forwarded"] = lr.log, lr.images_forwarded
    return result


def _temperature(run: Run, lr: LoadedRun, calibrated: bool
                 ) -> tuple[float, dict[str, Any] | None]:
    """The scoring temperature (the fitted one with --calibrated, else 1) and the calibration
    record when it belongs to these weights."""
    calibration = run.calibration()
    if calibration is not None and calibration.get("weights") != lr.weights:
        calibration = None  # fitted on other weights (the run was retrained): ignore it
        if calibrated:
            raise OodbenchError("the calibration is from an older checkpoint",
                                f"run `oodbench calibrate {run.path}` again")
    if calibrated and calibration is None:
        raise OodbenchError(f"{run.path} is not calibrated",
                            f"run `oodbench calibrate {run.path}` first, or drop --calibrated")
    return (float(calibration["temperature"]) if calibrated else 1.0), calibration


def _check_blocks(p: Plan, model: str) -> None:
    users = [n for n, d in p.detectors.items() if "blocks" in d.needs]
    if users and not p.block_names:
        raise OodbenchError(f"{users} need block outputs; model {model!r} exposes none",
                            "use a model with named blocks (smallcnn8, smallcnn28, resnet18...)")


def score_run(run: Run, ctx: DataContext, device: torch.device,
              detectors: list[str] | None = None, calibrated: bool = False,
              progress: ProgressFactory = no_progress,
              params: dict[str, dict[str, Any]] | None = None, selection: str | None = None,
              ood_validation: str | None = None, batch_size: int | None = None,
              oracle: str | None = None) -> dict[str, Any] | None:
    """Score detectors on the in-distribution test set and every OOD set; write the scores and
    metrics.json (merged with the results of detectors scored earlier on the same weights).

    Honest validation: `fit` sees only in-distribution TRAIN data and `select` only the
    in-distribution validation split, plus the OOD validation set (a split disjoint, by
    content, from every test set) only for detectors in "ood" selection mode. All fitting and
    selection is done before any test set is handed to a detector. `oracle` (an OOD test
    set's name) lets detectors with a hyperparameter grid select on that test set: an oracle
    choice, recorded as such and labelled in the report, never the default. Under torchrun
    the ranks share the forward passes and rank 0 does the rest (the others return None)."""
    cfg = run.config()
    require_benchmark_data(cfg.benchmark, ctx)  # every missing set named at once, not the first
    lr = load_run(run, device, progress, batch_size)
    temperature, calibration = _temperature(run, lr, calibrated)
    dets = build_detectors(detectors or list(cfg.benchmark.detectors), params, selection,
                           oracle=oracle is not None)
    p = plan(dets, lr.model.block_names, temperature, calibrated, ood_validation, oracle)
    _check_blocks(p, cfg.benchmark.model)
    with main_first():  # rank 0 decodes (and caches) the data; the others then read it
        sets: SetBundle = load_sets(cfg, p, ctx, device)
    choose_batch_size(lr, run, sets.test)
    sharded_forward(lr, forward_sets(p, sets))
    if not joined_world().main:
        return None
    setup = fit_select(lr, p, sets)
    results = [forward_eval(lr, p, es) for es in [*sets.evaluated, *sets.shifted]]
    scores = score_sets(lr, p, results)
    metrics = assemble(cfg, lr, p, sets, results, scores, setup, calibration)
    metrics.update(run=str(run.path), environment={**environment(), "device": str(device)},
                   provenance=run_provenance(
                       cfg.to_dict(), {r.set.name: r.set.data.fingerprint() for r in results},
                       device, lr.weights))
    write_scores(run, {n: s.per_set for n, s in scores.items()})
    metrics = merge_metrics(run, metrics)  # writes metrics.json under its lock
    return {**metrics, "forward_log": lr.log, "images_forwarded": lr.images_forwarded,
            "scored": list(dets)}


@dataclass(frozen=True)
class RunState:
    """Which post-training steps of a run are done for its current weights (what `run` skips)."""

    calibrated: bool
    scored: bool
    calibration: dict[str, Any] | None = None  # calibration.json, when it is up to date


def run_state(run: Run, checkpoint: dict[str, Any] | None = None) -> RunState:
    """Calibrated = calibration.json was fitted on the checkpoint's weights. Scored = metrics.json
    was scored on those weights and the same forward code, with that calibration, for every
    detector and OOD set of the run's config. Decided by content (weight and code digests),
    not file times, so a copied or touched run folder is judged right. `checkpoint`: the
    checkpoint when the caller already read it (it is read once either way)."""
    if checkpoint is None:
        if not run.checkpoint_path.exists():
            return RunState(False, False)
        checkpoint = run.require_checkpoint()
    if not checkpoint.get("finished"):
        return RunState(False, False)
    # no cache opened: this writes nothing
    model, _ = finished_model(run, torch.device("cpu"), checkpoint)
    weights = model_digest(model)
    cal = run.calibration()
    if cal is None or cal.get("weights") != weights:
        return RunState(False, False)
    m = read_json(run.metrics_path) if run.metrics_path.exists() else {}
    scored = (isinstance(m, dict) and m.get("weights") == weights
              and m.get("code") == code_digest(model) and m.get("calibration") == cal
              and _covers(m, run.config()))
    return RunState(True, scored, cal)


def _covers(m: dict[str, Any], cfg: RunConfig) -> bool:
    """metrics.json holds every configured detector (an n/a one with its reason) on every
    configured OOD set, and the shift results when the config asks for them. A set whose
    scores were not finite counts as done: scoring again would give the same NaNs."""
    sets = {o.name for o in cfg.benchmark.ood}
    dets = m.get("detectors")
    if not isinstance(dets, dict) or (cfg.benchmark.shift and not m.get("shift")):
        return False

    def done(entry: Any) -> bool:
        if not isinstance(entry, dict):
            return False
        bad = set(entry.get("nonfinite", {}))
        return (entry.get("applicable") is False or m.get("test_set") in bad
                or sets <= set(entry.get("ood", {})) | bad)

    return all(done(dets.get(d)) for d in cfg.benchmark.detectors)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temp name
        np.save(f, array)


def write_scores(run: Run, scores: dict[str, dict[str, np.ndarray]]) -> None:
    """scores/<detector>/<set>.npy (float32), each written atomically."""
    for name, per_set in scores.items():
        for dataset, s in per_set.items():
            atomic_write(run.scores_dir / name / f"{dataset}.npy",
                         lambda p, s=s: _save_npy(p, s.astype(np.float32)))


def merge_metrics(run: Run, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge this score's results into metrics.json and write it; return what was written.

    Keeps the results of detectors scored earlier on the same weights (a `score` of some
    detectors never drops the others); results of older weights are dropped. The read, merge
    and write happen under the file's lock (`oodbench.io.update_json`), so two `score`s of
    different detectors finishing at once both keep their results."""

    def merge(old: Any) -> dict[str, Any]:
        merged = dict(metrics)
        if isinstance(old, dict) and old.get("weights") == metrics["weights"] and isinstance(
                old.get("detectors"), dict):
            earlier = {k: v for k, v in old["detectors"].items() if k not in metrics["detectors"]}
            merged["detectors"] = {**earlier, **metrics["detectors"]}
        return merged

    return update_json(run.metrics_path, merge)


def forget_detectors(run: Run, names: list[str]) -> list[str]:
    """Remove detectors' results from metrics.json and their saved scores: the one way results
    are dropped (a later `score` only ever adds). Returns the names that were there."""
    import shutil

    if not run.metrics_path.exists():
        raise OodbenchError(f"{run.path} has no metrics.json", "nothing to forget")
    gone: list[str] = []

    def drop(old: Any) -> Any:
        if not isinstance(old, dict) or not isinstance(old.get("detectors"), dict):
            raise OodbenchError(f"{run.metrics_path} is unreadable", "score the run again")
        gone.extend(n for n in names if n in old["detectors"])
        return {**old, "detectors": {k: v for k, v in old["detectors"].items()
                                     if k not in names}}

    update_json(run.metrics_path, drop)
    for n in names:
        shutil.rmtree(run.scores_dir / n, ignore_errors=True)
    return gone
