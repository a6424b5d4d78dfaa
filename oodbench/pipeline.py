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
from oodbench.data import DataContext, ImageSet, InputTransform
from oodbench.detectors import DETECTORS, DetectorInput
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
        return cls(run, model, model_digest(model), device, OutputCache(run.cache_dir), progress)

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
    write_json(run.calibration_path, result)
    return result


def score_run(run: Run, ctx: DataContext, device: torch.device,
              detectors: list[str] | None = None, calibrated: bool = False,
              progress: ProgressFactory = _no_progress) -> dict[str, Any]:
    """Score every detector on the in-distribution test set and every OOD set; write scores and
    metrics.json. `calibrated` makes probability-based detectors use the fitted temperature."""
    cfg = run.config()
    bench = cfg.benchmark
    names = detectors or list(bench.detectors)
    classes = [DETECTORS.get(n) for n in names]
    temperature = 1.0
    calibration = run.calibration()
    if calibrated:
        if calibration is None:
            raise OodbenchError(f"{run.path} is not calibrated",
                                f"run `oodbench calibrate {run.path}` first, or drop --calibrated")
        temperature = float(calibration["temperature"])

    lr = LoadedRun.load(run, device, progress)
    if calibration is not None and calibration.get("weights") != lr.weights:
        calibration = None  # fitted on other weights (the run was retrained): ignore it
        if calibrated:
            raise OodbenchError("the calibration is from an older checkpoint",
                                f"run `oodbench calibrate {run.path}` again")
    blocks = lr.model.block_names if any("blocks" in c.needs for c in classes) else ()
    info = in_distribution_info(cfg)
    model_transform = InputTransform.for_model(info)

    test = load_in_distribution(cfg, "test", ctx)
    sets: list[tuple[ImageSet, InputTransform, str]] = [(test, model_transform, "in")]
    for o in bench.ood:  # all loaded (and shape-checked) before any detector runs
        data, tf = load_ood(cfg, o, ctx)
        sets.append((data, tf, o.group))
    outputs = {d.name: lr.outputs(d, tf, blocks) for d, tf, _ in sets}
    fit_outputs = None
    if any(c.requires_fit for c in classes):
        train = load_in_distribution(cfg, "train", ctx)
        fit_outputs = (train, lr.outputs(train, model_transform, blocks))

    def detector_input(data: ImageSet, tf: InputTransform, out: Outputs) -> DetectorInput:
        return DetectorInput(data.name, out.logits, out.labels, out.features, out.blocks,
                             temperature, lr.model, data, tf, device)

    forward_per_sample = outputs[test.name].forward_seconds / len(test)
    results: dict[str, Any] = {}
    for name, cls in zip(names, classes, strict=True):
        det = cls()
        if cls.requires_fit:
            assert fit_outputs is not None
            det.fit(detector_input(fit_outputs[0], model_transform, fit_outputs[1]))
        per_set, seconds, n_scored = {}, 0.0, 0
        for data, tf, _group in sets:
            tic = time.perf_counter()
            s = det(detector_input(data, tf, outputs[data.name]))
            seconds += time.perf_counter() - tic
            n_scored += len(s)
            bad = int((~np.isfinite(s)).sum())
            if bad:
                raise OodbenchError(
                    f"detector {name!r} gave {bad} NaN/infinite score(s) of {len(s)} on "
                    f"{data.name!r}; no metric is computed from such scores",
                    "check the model's outputs on that set (e.g. a diverged training)")
            path = run.scores_dir / name / f"{data.name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, s.astype(np.float32))
            per_set[data.name] = s
        in_scores = per_set.pop(test.name)
        # Inference cost relative to one plain forward pass: a gradient-free detector adds its
        # own time to the shared forward pass; a gradient detector runs its own passes.
        ratio = (seconds / n_scored) / max(forward_per_sample, 1e-12)
        results[name] = {
            "ood": {ood: ood_metrics(in_scores, s) for ood, s in per_set.items()},
            "cost": ratio if "grad" in cls.needs else 1.0 + ratio,
            "temperature": temperature,
        }

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
        "forward_seconds_per_sample": forward_per_sample,
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
