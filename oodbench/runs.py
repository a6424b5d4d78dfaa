"""A run folder: everything about one trained model, so each step can run separately, later.

    runs/<benchmark>/<loss>-seed<seed>/
        config.yaml        resolved run config (benchmark + loss + seed)
        checkpoint.pt      weights + optimizer + progress (resume point; weights_only-loadable)
        manifest.json      versions, device, timings, data fingerprints
        calibration.json   fitted temperature and before/after calibration metrics
        cache/<key>/       cached forward outputs, keyed by weights + data + transform
        scores/<detector>/<ood set>.npy
        metrics.json       everything `report` reads
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oodbench.config import RunConfig, load_yaml
from oodbench.errors import OodbenchError
from oodbench.io import read_json, write_yaml


def default_run_dir(cfg: RunConfig, root: Path = Path("runs")) -> Path:
    return root / cfg.benchmark.name / f"{cfg.loss}-seed{cfg.seed}"


@dataclass
class Run:
    path: Path

    config_path = property(lambda self: self.path / "config.yaml")
    checkpoint_path = property(lambda self: self.path / "checkpoint.pt")
    manifest_path = property(lambda self: self.path / "manifest.json")
    calibration_path = property(lambda self: self.path / "calibration.json")
    metrics_path = property(lambda self: self.path / "metrics.json")
    cache_dir = property(lambda self: self.path / "cache")
    scores_dir = property(lambda self: self.path / "scores")

    @classmethod
    def create(cls, path: Path, cfg: RunConfig) -> Run:
        """New run folder, or the existing one if its config is the same (so training resumes).
        A different config in the same folder is refused rather than mixed."""
        run = cls(Path(path))
        if run.config_path.exists():
            old = run.config()
            if old.to_dict() != cfg.to_dict():
                raise OodbenchError(
                    f"{path} already holds a run with another configuration",
                    "pass another --run-dir, or delete that folder to start over",
                )
            return run
        write_yaml(run.config_path, cfg.to_dict())
        return run

    @classmethod
    def open(cls, path: Path) -> Run:
        run = cls(Path(path))
        if not run.config_path.exists():
            raise OodbenchError(f"no run at {path}",
                                "create it with `oodbench train --benchmark NAME --loss LOSS`")
        return run

    def config(self) -> RunConfig:
        return RunConfig.from_dict(load_yaml(self.config_path), str(self.config_path))

    def require_checkpoint(self) -> dict[str, Any]:
        if not self.checkpoint_path.exists():
            raise OodbenchError(f"{self.path} has no checkpoint yet",
                                f"train it first: `oodbench train --run-dir {self.path}`")
        return load_checkpoint(self.checkpoint_path)

    def is_trained(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        ckpt = load_checkpoint(self.checkpoint_path)
        return bool(ckpt.get("finished", False))

    def calibration(self) -> dict[str, Any] | None:
        return read_json(self.calibration_path) if self.calibration_path.exists() else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt / foreign file
        raise OodbenchError(f"cannot read checkpoint {path}: {e}",
                            "delete it and train again (the run folder's config is kept)") from None


def load_weights(model: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """Strict load with an error that says what does not match."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:4]
        raise OodbenchError(
            f"checkpoint {source} does not match the model ({' '.join(first)})",
            "use the model/loss/number of classes it was trained with, or retrain",
        ) from None
