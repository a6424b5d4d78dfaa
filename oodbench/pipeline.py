"""The post-training steps over a run folder: calibrate and score.

Both read the trained model once and get every dataset's forward outputs through the run's
output cache, so the validation, in-distribution test and OOD sets each pass through the network
at most once per set of weights, whatever the number of detectors, and a second `score` of the
same run runs no forward pass for gradient-free detectors.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from oodbench import __version__
from oodbench.cache import OutputCache, Outputs, cache_key, model_digest
from oodbench.calibrate import fit_temperature
from oodbench.data import DataContext, ImageSet, InputTransform, get_dataset
from oodbench.detectors import DETECTORS, Detector, DetectorInput
from oodbench.detectors.gradients import GRAD_BATCH
from oodbench.errors import OodbenchError
from oodbench.experiment import build_model, in_distribution_info, load_in_distribution, load_ood
from oodbench.io import write_json
from oodbench.metrics import classification_metrics, ood_metrics
from oodbench.models import Classifier
from oodbench.provenance import run_provenance
from oodbench.runs import Run, load_weights

# progress(description, total) -> advance(n); the CLI maps it to rich progress bars.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class LoadedRun:
    run: Run
    model: Classifier
    weights: str
    device: torch.device
    cache: OutputCache
    progress: ProgressFactory = _no_progress
    forward_log: list[str] = field(default_factory=list)
    imported: dict[str, Any] | None = None  # set for runs made by `import-checkpoint`

    @classmethod
    def load(cls, run: Run, device: torch.device, progress: ProgressFactory = _no_progress
             ) -> LoadedRun:
        cfg = run.config()
        state = run.require_checkpoint()
        if not state.get("finished"):
            raise OodbenchError(f"{run.path} has not finished training",
                                f"resume it: `oodbench train --run-dir {run.path}`")
        model = build_model(cfg)
        load_weights(model, state["model"], str(run.checkpoint_path))
        model.to(device).eval()
        return cls(run, model, model_digest(model), device, OutputCache(run.cache_dir), progress,
                   imported=state.get("imported"))

    def outputs(self, data: ImageSet, transform: InputTransform,
                blocks: tuple[str, ...] = ()) -> Outputs:
        advance = None

        def step(n: int) -> None:
            nonlocal advance
            if advance is None:
                advance = self.progress(f"forward {data.name}", len(data))
            advance(n)

        out = self.cache.get(self.model, self.weights, data.to(self.device), transform, blocks,
                             self.device, progress=step)
        self.forward_log.append(f"{data.name}: {'forward pass' if out.computed else 'cache hit'}")
        return out


def environment() -> dict[str, Any]:
    return {"oodbench": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def calibrate_run(run: Run, ctx: DataContext, device: torch.device, objective: str = "nll",
                  progress: ProgressFactory = _no_progress) -> dict[str, Any]:
    """Fit the temperature on the validation split and store it in calibration.json."""
    cfg = run.config()
    lr = LoadedRun.load(run, device, progress)
    val = load_in_distribution(cfg, "val", ctx)
    out = lr.outputs(val, InputTransform.for_model(in_distribution_info(cfg)))
    result = fit_temperature(out.logits, out.labels, objective)
    result.update(split="val", n=len(val), weights=lr.weights)
    if lr.imported is not None and "val" not in get_dataset(cfg.benchmark.dataset).splits:
        # Our own runs never train on the held-out part; a foreign network may have.
        result["warning"] = (
            "this network was imported: the validation split was carved out of the training "
            "split, which its authors may have trained on, so the temperature may be fitted "
            "on seen data (typically too low)")
    write_json(run.calibration_path, result)
    return result


def build_detectors(names: list[str], params: dict[str, dict[str, Any]] | None = None,
                    selection: str | None = None) -> dict[str, Detector]:
    """Detectors by name with user hyperparameters; `selection` applies to every detector that
    has a selection step (ODIN, Mahalanobis)."""
    params = params or {}
    unknown = set(params) - set(names)
    if unknown:
        raise OodbenchError(f"hyperparameters given for detector(s) not scored: {sorted(unknown)}",
                            "add them with --detector, or fix the name before the dot")
    dets = {}
    for n in names:
        hp = dict(params.get(n, {}))
        cls = DETECTORS.get(n)
        if selection is not None and cls.selection_modes and "selection" not in hp:
            hp["selection"] = selection
        dets[n] = cls(**hp)
    if selection is not None and not any(d.selection_modes for d in dets.values()):
        raise OodbenchError(f"--selection {selection} given, but none of {names} selects anything",
                            "selection applies to odin, mahalanobis and mahalanobis-ensemble")
    return dets


def time_forward(model: Classifier, data: ImageSet, transform: InputTransform,
                 device: torch.device, n: int = 1024, batch_size: int = GRAD_BATCH) -> float:
    """Seconds per sample of a plain no-grad forward pass over (up to) n samples, after one
    warm-up batch: the reference for every detector's cost, measured in the same run. Timing
    only; its outputs are discarded (the cache holds the real ones)."""
    images = data.images[:n].to(device)
    model.eval()
    with torch.no_grad():
        model(transform(images[:batch_size]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        for start in range(0, len(images), batch_size):
            model(transform(images[start:start + batch_size]))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - tic) / len(images)


def score_run(run: Run, ctx: DataContext, device: torch.device,
              detectors: list[str] | None = None, calibrated: bool = False,
              progress: ProgressFactory = _no_progress,
              params: dict[str, dict[str, Any]] | None = None, selection: str | None = None,
              ood_validation: str | None = None) -> dict[str, Any]:
    """Score every detector on the in-distribution test set and every OOD set; write scores and
    metrics.json. `calibrated` makes probability-based detectors use the fitted temperature.

    Honest validation: `fit` sees only in-distribution TRAIN data and `select` only the
    in-distribution validation split, plus the OOD validation set `ood_validation` only for
    detectors whose selection mode is "ood" (never by default). All fitting and selection is done
    before any OOD test set is handed to a detector. Non-finite scores are counted and reported
    per detector and set, and no metric is computed from them."""
    cfg = run.config()
    bench = cfg.benchmark
    names = detectors or list(bench.detectors)
    dets = build_detectors(names, params, selection)
    needs = set().union(*(d.needs for d in dets.values()))
    temperature = 1.0
    calibration = run.calibration()
    if calibrated:
        if calibration is None:
            raise OodbenchError(f"{run.path} is not calibrated",
                                f"run `oodbench calibrate {run.path}` first, or drop --calibrated")
        temperature = float(calibration["temperature"])
    wants_ood_val = [n for n, d in dets.items() if d.selection_mode == "ood"]
    if wants_ood_val and not ood_validation:
        raise OodbenchError(f"{wants_ood_val} select on OOD validation data, but none was named",
                            "pass --ood-validation DATASET, or use --selection fgsm / id")
    if ood_validation and not wants_ood_val:
        raise OodbenchError("--ood-validation is used only with --selection ood",
                            "add --selection ood (OOD data is never used unless asked)")

    lr = LoadedRun.load(run, device, progress)
    if calibration is not None and calibration.get("weights") != lr.weights:
        calibration = None  # fitted on other weights (the run was retrained): ignore it
        if calibrated:
            raise OodbenchError("the calibration is from an older checkpoint",
                                f"run `oodbench calibrate {run.path}` again")
    blocks = lr.model.block_names if "blocks" in needs else ()
    if "blocks" in needs and not blocks:
        users = [n for n, d in dets.items() if "blocks" in d.needs]
        raise OodbenchError(f"{users} need block outputs; model {bench.model!r} exposes none",
                            "use a model with named blocks (smallcnn8, smallcnn28, resnet18...)")
    info = in_distribution_info(cfg)
    model_transform = InputTransform.for_model(info)

    # Every set moves to the device once; detectors and the cache then reuse it there.
    test = load_in_distribution(cfg, "test", ctx).to(device)
    sets: list[tuple[ImageSet, InputTransform, str]] = [(test, model_transform, "in")]
    for o in bench.ood:  # all loaded (and shape-checked) before any detector runs
        data, tf = load_ood(cfg, o, ctx)
        sets.append((data.to(device), tf, o.group))
    # One forward pass per set, shared by every gradient-free detector; the test set always
    # (classification metrics), OOD sets only when some detector reads cached outputs.
    cached = bool(needs & {"logits", "features", "blocks"})
    outputs = {d.name: lr.outputs(d, tf, blocks) for d, tf, _ in sets
               if cached or d.name == test.name}

    def detector_input(data: ImageSet, tf: InputTransform, out: Outputs | None) -> DetectorInput:
        if out is None:
            return DetectorInput(data.name, None, data.labels.cpu(), None, {}, temperature,
                                 lr.model, data, tf, device)
        return DetectorInput(data.name, out.logits, out.labels, out.features, out.blocks,
                             temperature, lr.model, data, tf, device)

    # Phase 1: fit and select, on in-distribution train / validation data only.
    setup_seconds: dict[str, dict[str, float]] = {n: {} for n in dets}
    if any(d.requires_fit for d in dets.values()):
        train = load_in_distribution(cfg, "train", ctx).to(device)
        train_in = detector_input(train, model_transform,
                                  lr.outputs(train, model_transform, blocks))
        for n, det in dets.items():
            if det.requires_fit:
                tic = time.perf_counter()
                det.fit(train_in)
                setup_seconds[n]["fit"] = time.perf_counter() - tic
    selecting = [n for n, d in dets.items() if d.selection_modes]
    if selecting:
        val = load_in_distribution(cfg, "val", ctx).to(device)
        val_in = detector_input(val, model_transform, lr.outputs(val, model_transform, blocks))
        ood_val_in = None
        if ood_validation:
            from oodbench.config import OODSet

            vdata, vtf = load_ood(cfg, OODSet(dataset=ood_validation,
                                              name=f"{ood_validation}-validation", adapt=True),
                                  ctx)
            vdata = vdata.to(device)
            ood_val_in = detector_input(vdata, vtf, lr.outputs(vdata, vtf, blocks))
        for n in selecting:
            tic = time.perf_counter()
            dets[n].select(val_in, ood_val_in if n in wants_ood_val else None)
            setup_seconds[n]["select"] = time.perf_counter() - tic

    # Phase 2: score every set.
    # The plain forward pass over exactly the samples the detectors score, timed per set (its
    # own transform included: adapted sets resize too), extrapolated from up to 512 per set.
    reference_total = sum(time_forward(lr.model, d, tf, device, n=512) * len(d)
                          for d, tf, _ in sets)
    reference = reference_total / sum(len(d) for d, _, _ in sets)
    results: dict[str, Any] = {}
    for name, det in dets.items():
        per_set, seconds, n_scored, nonfinite = {}, 0.0, 0, {}
        for data, tf, _group in sets:
            tic = time.perf_counter()
            s = det(detector_input(data, tf, outputs.get(data.name)))
            seconds += time.perf_counter() - tic
            n_scored += len(s)
            bad = int((~np.isfinite(s)).sum())
            if bad:
                nonfinite[data.name] = bad
            path = run.scores_dir / name / f"{data.name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, s.astype(np.float32))
            per_set[data.name] = s
        in_scores = per_set.pop(test.name)
        # Inference cost relative to one plain forward pass measured in this run: a detector
        # that reads the cache adds its own time to the shared forward pass; one that runs the
        # model itself (ODIN, preprocessing) replaces it.
        ratio = (seconds / n_scored) / max(reference, 1e-12)  # same samples on both sides
        ood = {}
        if test.name not in nonfinite:
            ood = {o: ood_metrics(in_scores, s) for o, s in per_set.items() if o not in nonfinite}
        results[name] = {
            "ood": ood,
            "cost": ratio if det.scores_with_model else 1.0 + ratio,
            "temperature": temperature,
            "hparams": det.params,
            "selection": det.selection,
            "setup_seconds": setup_seconds[name],
        }
        if nonfinite:
            results[name]["nonfinite"] = nonfinite

    test_out = outputs[test.name]
    classification = {"uncalibrated": classification_metrics(test_out.logits, test_out.labels)}
    if calibration is not None:
        classification["calibrated"] = classification_metrics(
            test_out.logits, test_out.labels, float(calibration["temperature"]))
    metrics = {
        "schema": "oodbench.metrics/1",
        "run": str(run.path),
        "benchmark": bench.name,
        "in_distribution": bench.dataset,
        "model": bench.model,
        "loss": cfg.loss,
        "seed": cfg.seed,
        "ood_sets": {o.name: o.group for o in bench.ood},
        "n": {name: len(d) for d, _, _ in sets for name in [d.name]},
        "classification": classification,
        "calibration": calibration,
        "detectors": results,
        "forward_seconds_per_sample": outputs[test.name].forward_seconds / len(test),
        "reference_forward_seconds_per_sample": reference,
        "weights": lr.weights,
        "environment": {**environment(), "device": str(device)},
        # For `report`: the in-dist test set's name, each set's output-cache entry (the
        # reliability diagram reads the test logits there) and the provenance record.
        "test_set": test.name,
        "cache_keys": {d.name: cache_key(lr.weights, d, tf) for d, tf, _ in sets},
        "provenance": run_provenance(cfg.to_dict(), {d.name: d.fingerprint() for d, _, _ in sets},
                                     device, lr.weights),
    }
    existing = run.metrics_path
    if detectors and existing.exists():  # scoring a subset keeps the other detectors' results
        from oodbench.io import read_json

        old = read_json(existing)
        if old.get("weights") == lr.weights:
            metrics["detectors"] = {**old.get("detectors", {}), **results}
    write_json(existing, metrics)
    metrics["forward_log"] = lr.forward_log
    return metrics
