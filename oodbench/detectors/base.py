"""The detector contract (scikit-learn style): `fit` on in-distribution data when the method
needs statistics, `score` returns one float per sample, higher = more in-distribution.

A detector declares what it consumes (`needs`): cached forward outputs ("logits", "features",
"blocks") and/or "grad" (it must run the model itself, e.g. ODIN's input preprocessing). The
scoring pipeline computes the union of needs with ONE forward pass per dataset and hands each
detector a `DetectorInput`; gradient-free detectors never touch the model. `needs` may depend on
the hyperparameters (Mahalanobis needs "grad" only with input preprocessing), so the pipeline
reads it from the instance.

Detectors with a hyperparameter search or learned weights (ODIN, Mahalanobis) implement
`select(val, ood_val)`. Its `selection` hyperparameter says what data it may use: "none" (the
defaults), "id" (in-distribution validation data only), "fgsm" (in-distribution validation data
plus FGSM-perturbed copies of it as stand-in OOD) or "ood" (a user-supplied OOD validation set,
only when asked explicitly). `fit` sees only in-distribution TRAIN data, `select` only the
in-distribution validation split and, in "ood" mode, the named OOD validation set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from oodbench.errors import OodbenchError
from oodbench.registry import Registry

NEEDS = frozenset({"logits", "features", "blocks", "grad"})


@dataclass
class DetectorInput:
    """Everything a detector may read about one dataset.

    `logits`, `features` and `blocks` come from the output cache (CPU tensors, possibly
    memory-mapped). `model`, `images` and `transform` are set only for detectors that need "grad".
    `temperature` is the run's calibrated temperature when the user asked for it, else 1.
    """

    name: str
    logits: torch.Tensor | None  # None when no gradient-free detector needs this set's outputs
    labels: torch.Tensor
    features: torch.Tensor | None = None
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)
    temperature: float = 1.0
    model: Any = None
    images: Any = None
    transform: Any = None
    device: torch.device | None = None
    inputs: torch.Tensor | None = None  # normalised float inputs of synthetic sets (FGSM)

    def __len__(self) -> int:
        return int(len(self.labels))


class Detector:
    """Base class. Subclasses set `needs`, `requires_fit`, `hparams` (name → default) and
    implement `score` (and `fit` if `requires_fit`)."""

    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    requires_fit: ClassVar[bool] = False
    hparams: ClassVar[dict[str, Any]] = {}
    summary: ClassVar[str] = ""
    # Selection modes `select` understands (empty: the detector has nothing to select).
    selection_modes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **hparams: Any) -> None:
        unknown = set(hparams) - set(self.hparams)
        if unknown:
            raise OodbenchError(
                f"{type(self).__name__} has no hyperparameter(s) {sorted(unknown)}",
                f"valid: {sorted(self.hparams) or 'none'}",
            )
        self.params: dict[str, Any] = {**self.hparams, **hparams}
        self.fitted = not self.requires_fit
        self.needs = type(self).needs
        # What `select` chose and from which data; recorded in metrics.json.
        self.selection: dict[str, Any] = {"mode": "none"}
        mode = self.params.get("selection")
        if self.selection_modes and mode not in self.selection_modes:
            raise OodbenchError(f"{type(self).__name__} has no selection mode {mode!r}",
                                f"use one of: {', '.join(self.selection_modes)}")

    @property
    def scores_with_model(self) -> bool:
        """True when `score` runs the model itself: its cost then replaces the shared forward
        pass instead of adding to it."""
        return "grad" in self.needs

    @property
    def selection_mode(self) -> str:
        return str(self.params.get("selection", "none"))

    def fit(self, train: DetectorInput) -> Detector:
        self.fitted = True
        return self

    def select(self, val: DetectorInput, ood_val: DetectorInput | None = None) -> None:
        """Choose hyperparameters / weights on validation data (see the module docstring)."""

    def score(self, data: DetectorInput) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, data: DetectorInput) -> np.ndarray:
        if not self.fitted:
            raise OodbenchError(f"{type(self).__name__} must be fitted before scoring",
                                "call fit() on in-distribution training data first")
        scores = np.asarray(self.score(data), dtype=np.float64)
        if scores.shape != (len(data.labels),):
            raise RuntimeError(f"{type(self).__name__} returned shape {scores.shape}, "
                               f"expected ({len(data.labels)},)")
        return scores


DETECTORS: Registry[type[Detector]] = Registry("detector")


def create(name: str, **hparams: Any) -> Detector:
    return DETECTORS.get(name)(**hparams)
