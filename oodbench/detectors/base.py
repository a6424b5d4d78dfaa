"""The detector contract (scikit-learn style): `fit` on in-distribution data when the method
needs statistics, `score` returns one float per sample, higher = more in-distribution.

Hyperparameters are declared with `HParam` (type, range or choices, default) and validated when
the detector is created, so a bad `-p odin.T=abc` fails at once with a message naming the fix,
never later with a traceback or silently inverted scores. A detector keeps the user's values
(`given`) apart from those its `select` step chose (`selected`); `params` is the effective view.

A detector declares what it consumes (`needs`): cached forward outputs ("logits", "features",
"blocks") and/or "grad" (it must run the model itself, e.g. ODIN's input preprocessing). The
scoring pipeline computes the union of needs with ONE forward pass per dataset and hands each
detector a `DetectorInput`; gradient-free detectors never touch the model. `needs` may depend on
the hyperparameters (Mahalanobis needs "grad" only with input preprocessing), so the pipeline
reads it from the instance. `required_outputs(block_names)` names exactly the cached outputs
("logits", "features", "<block>.<summary>") that `fit` and cache-based scoring read.

Detectors whose scoring runs the model (`uses_shared_forward`: ODIN, Mahalanobis with ε > 0)
score batch by batch from ONE forward with gradients that the pipeline shares between them:
`score_batch(x, out, data)` gets the leaf input `x` and `out = model.forward_all(x, taps)` with
the graph alive (`grad_taps(block_names)` says which blocks it must tap). `score(data)` runs
the same loop itself for standalone use, so both paths give identical numbers.

Detectors with a hyperparameter search or learned weights (ODIN, Mahalanobis) implement
`select(val, ood_val)`. Its `selection` hyperparameter says what data it may use: "none" (the
defaults), "id" (in-distribution validation data only), "fgsm" (in-distribution validation data
plus FGSM-perturbed copies of it as stand-in OOD) or "ood" (a user-supplied OOD validation set,
only when asked explicitly). `fit` sees only in-distribution TRAIN data, `select` only the
in-distribution validation split and, in "ood" mode, the named OOD validation set.

Generic grid selection: a detector that declares `grid` (hyperparameter → candidate values) and
a `selection` hyperparameter inherits `Detector.select`: every point of the cartesian product of
the grid is set as `selected`, `val` and the negatives are scored from their CACHED outputs (no
forward pass per grid point; the FGSM stand-in is computed once) and the best point is chosen
with `gradients.choose` ("fgsm" / "ood": AUROC; no "id": see GRID_SELECTION_MODES). A grid
hyperparameter the user gave explicitly is held fixed (searched over its one given value).
`select` never sees train data again: grid hyperparameters must be derivable from what `fit`
stored (e.g. ReAct keeps a fixed-size sample of train activations, so every percentile of the
grid is read from it without another pass).

Oracle selection: the mode "oracle" (ORACLE_MODE) selects on an OOD TEST set, an upper bound
that no deployment can reach. It is in no detector's `selection_modes` and is refused unless the
detector is created with `oracle=True` (`create(name, oracle=True, selection="oracle")`); the
`ood_val` passed to `select` is then that test set, and `selection["oracle"]` is True.

Derived outputs: a fitted detector whose scoring is dominated by one costly per-sample
intermediate (KNN / NNGuide: each query's top-K neighbour similarities in the train bank)
declares it (`derived_output()` → `Derived`: name, parameters, source files) and computes it
in `derive(data)`; `score` reads it through `derived_of(data)`, which takes the copy the
pipeline passed in `DetectorInput.derived` or else calls `derive`. It must not depend on a
grid hyperparameter: a grid selection computes it once and scores every point from it. The
pipeline stores it next to the set's cached outputs, keyed by the content keys of the train
outputs the fit read and of the set's outputs plus the `Derived` parameters and code, so a
second score of the same model and data reuses it and any change of inputs misses; the scores
are the same numbers either way (the array round-trips exactly).

Heads: `DetectorInput.head` is the linear classifier (W, b), or None for prototype (distance)
heads. A detector that needs "head" declares `applies_to_prototype_heads` = False (it refuses
with `NotApplicable`, naming `prototype_head_reason`) or a string describing its adaptation.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from oodbench.errors import OodbenchError
from oodbench.registry import Registry
from oodbench.summaries import BLOCK_SUMMARIES, block_key

if TYPE_CHECKING:
    from oodbench.models.base import ModelOutput

NEEDS = frozenset({"logits", "features", "blocks", "grad", "head"})
# no "id": the mean in-distribution score moves with a grid hyperparameter by construction
# (knn's k-th distance grows with k, ReAct's energy with the clip), so it ranks scales, not
# detection; ODIN's ε (the one hyperparameter it can rank) keeps its own "id" mode
GRID_SELECTION_MODES = ("none", "fgsm", "ood")
ORACLE_MODE = "oracle"  # selection on an OOD TEST set: only with oracle=True, labelled as such
SEARCH_SAMPLES = 1000  # validation (and negative) samples a grid selection scores at most


class NotApplicable(OodbenchError):
    """The detector cannot be applied to this model (e.g. it needs the linear head's W, b and the
    model has a prototype head). The report shows it as "n/a (reason)", not as a failure."""

    def __init__(self, detector: str, reason: str) -> None:
        super().__init__(f"{detector} is not applicable: {reason}",
                         "drop it for this model, or use a model with a linear head")
        self.detector, self.reason = detector, reason


NO_BLOCKS_HINT = "use a model with named blocks (smallcnn8, smallcnn28, resnet18...)"
_KINDS = {float: "a float", int: "an int", str: "a non-empty string", bool: "a bool (true/false)",
          list: "a non-empty list of floats"}


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: default, type (float, int, str, bool, or `list` = a non-empty list of
    floats, given as a list or as a comma-separated string), optional bounds (`gt`: >, `ge`: >=,
    `le`: <=; on every element of a list) or `choices`."""

    default: Any
    type: type = float
    gt: float | None = None
    ge: float | None = None
    choices: tuple[str, ...] = ()
    le: float | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.type not in _KINDS:
            raise TypeError(f"HParam type must be one of {list(_KINDS)}, got {self.type!r}")
        self.coerce(self.default)  # a default outside its own range is a bug of the detector

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        bounds = [f"> {self.gt:g}" if self.gt is not None else "",
                  f">= {self.ge:g}" if self.ge is not None else "",
                  f"<= {self.le:g}" if self.le is not None else ""]
        bound = " and ".join(b for b in bounds if b)
        if self.type is list:
            return _KINDS[list] + (f", each {bound}" if bound else "")
        return _KINDS[self.type] + (f" {bound}" if bound else "")

    def coerce(self, value: Any) -> Any:
        """The value as this type (strings such as "1e-3" are parsed); ValueError if it is not
        of the type or out of range."""
        if self.type is list:
            if isinstance(value, str):  # "-p odin.eps_grid=0,0.001": YAML reads a string
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, list | tuple) or not value:
                raise ValueError(value)
            return [self._check(_to_float(v)) for v in value]
        out = {float: _to_float, int: _to_int, str: _to_str, bool: _to_bool}[self.type](value)
        if self.choices and out not in self.choices:
            raise ValueError(value)
        return self._check(out)

    def _check(self, x: Any) -> Any:
        if (self.gt is not None and not x > self.gt) or (self.ge is not None and not x >= self.ge):
            raise ValueError(x)
        if self.le is not None and not x <= self.le:
            raise ValueError(x)
        return x


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, numbers.Real | str):
        f = float(v)  # ValueError for "abc"
        if math.isfinite(f):
            return f
    raise ValueError(v)


def _to_int(v: Any) -> int:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    f = _to_float(v)
    if not f.is_integer():
        raise ValueError(v)
    return int(f)


def _to_str(v: Any) -> str:
    if isinstance(v, str) and v.strip():
        return v
    raise ValueError(v)


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise ValueError(v)


@dataclass
class DetectorInput:
    """Everything a detector may read about one dataset.

    `logits`, `features` and `blocks` come from the output cache (CPU tensors, possibly
    memory-mapped). `model`, `images` and `transform` are set only for detectors that need "grad".
    `temperature` is the run's calibrated temperature when the user asked for it, else 1.
    `block_names` are the model's blocks in order (resolves layer="last"). `head` is the
    classifier's last layer as (W: C×D, b: C) when it is linear (logits = f Wᵀ + b); None for
    the prototype (distance) heads of IsoMax, IsoMax+ and DisMax: detectors that need "head"
    adapt or refuse there.
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
    block_names: tuple[str, ...] = ()
    head: tuple[torch.Tensor, torch.Tensor] | None = None
    derived: dict[str, torch.Tensor] = field(default_factory=dict)  # see `Derived`

    def __len__(self) -> int:
        return int(len(self.labels))


@dataclass(frozen=True)
class Derived:
    """A per-sample array (N × …) that a fitted detector derives from one set's outputs and
    that is worth keeping (seconds to compute, milliseconds to score from). `name` is its key in
    `DetectorInput.derived`; `params` holds everything it depends on besides the fit's train
    outputs and the set's outputs (e.g. K, the normalisation, bank subsampling or scaling);
    `code` the source files that compute it. A stored copy is keyed by all of these."""

    name: str
    params: dict[str, Any]
    code: tuple[str, ...] = ()


class Detector:
    """Base class. Subclasses set `needs`, `requires_fit`, `hparams` (name → `HParam`) and
    implement `score` (and `fit` if `requires_fit`)."""

    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    requires_fit: ClassVar[bool] = False
    hparams: ClassVar[dict[str, HParam]] = {}
    summary: ClassVar[str] = ""
    # Selection modes `select` understands (empty: the detector has nothing to select).
    selection_modes: ClassVar[tuple[str, ...]] = ()
    # True when `select` reads the validation split even in selection mode "none"
    validates_in_none_mode: ClassVar[bool] = False
    # Candidate values per hyperparameter for the generic `select` (empty: nothing to search).
    grid: ClassVar[dict[str, list[Any]]] = {}
    # On a prototype head (DetectorInput.head is None): True (the detector does not read the
    # head), False (it refuses with NotApplicable, giving `prototype_head_reason`), or a string
    # describing how it adapts.
    paper: ClassVar[str] = ""  # the method's source, set at registration (`paper=`)
    applies_to_prototype_heads: ClassVar[bool | str] = True
    prototype_head_reason: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.grid and "selection" not in cls.hparams:  # every grid can be searched
            cls.hparams = {**cls.hparams, **grid_selection_hparams()}
        if cls.grid and not cls.selection_modes:
            cls.selection_modes = GRID_SELECTION_MODES
        bad = [n for n, h in cls.hparams.items() if not isinstance(h, HParam)]
        if bad:
            raise TypeError(f"{cls.__name__}.hparams {bad} must be HParam(default, type, ...)")

    def __init__(self, *, oracle: bool = False, **hparams: Any) -> None:
        # `oracle=True` admits the selection mode "oracle" (select on an OOD test set).
        self.oracle_allowed = bool(oracle)
        unknown = set(hparams) - set(self.hparams)
        if unknown:
            raise OodbenchError(
                f"{self.registered_name()} has no hyperparameter(s) {sorted(unknown)}",
                f"valid: {sorted(self.hparams) or 'none'}",
            )
        self.given: dict[str, Any] = {n: self._validate(n, v) for n, v in hparams.items()}
        self.selected: dict[str, Any] = {}  # what `select` chose; never overwrites `given`
        self.fitted = not self.requires_fit
        self.needs = type(self).needs
        # What `select` chose and from which data; recorded in metrics.json.
        self.selection: dict[str, Any] = {"mode": "none"}
        if self.grid and self.selection_mode == "fgsm":
            self.needs = self.needs | {"grad"}  # the FGSM stand-in runs the model once

    @classmethod
    def registered_name(cls) -> str:
        return next((n for n, c in DETECTORS.items() if c is cls), cls.__name__)

    def _validate(self, name: str, value: Any) -> Any:
        spec = self.hparams[name]
        if name == "selection" and value == ORACLE_MODE:
            if self.oracle_allowed and self.grid:
                return ORACLE_MODE
            raise OodbenchError(
                f"{self.registered_name()}.selection 'oracle' selects on the OOD TEST set and "
                "is available only when asked for explicitly",
                "pass --oracle (the report labels oracle results)" if self.grid else
                f"{self.registered_name()} has no grid selection; use "
                + ", ".join(self.selection_modes or ("none",)))
        try:
            return spec.coerce(value)
        except (ValueError, TypeError):
            det = self.registered_name()
            default = spec.default if spec.type is not list else ",".join(map(str, spec.default))
            raise OodbenchError(
                f"{det}.{name} must be {spec.expected()}, got {value!r}",
                f"pass e.g. -p {det}.{name}={default} (the default)"
                + (f"; {spec.doc}" if spec.doc else "")) from None

    @property
    def params(self) -> dict[str, Any]:
        """Effective values: defaults, overridden by `given`, overridden by `selected`."""
        merged = {**{n: h.default for n, h in self.hparams.items()}, **self.given,
                  **self.selected}
        return {n: list(v) if isinstance(v, list | tuple) else v for n, v in merged.items()}

    def describe(self) -> dict[str, Any]:
        """What metrics.json records about this detector's hyperparameters."""
        return {"hparams": self.params, "given": copy.deepcopy(self.given),
                "selected": copy.deepcopy(self.selected), "selection": self.selection}

    def required_outputs(self, block_names: tuple[str, ...]) -> frozenset[str]:
        """Cached-output keys that `fit` and cache-based scoring read (derived from `needs`)."""
        keys = {k for k in ("logits", "features") if k in self.needs}
        if "blocks" in self.needs:
            keys |= {block_key(b, s) for b in block_names for s in BLOCK_SUMMARIES}
        return frozenset(keys)

    @property
    def uses_shared_forward(self) -> bool:
        """True when scoring runs the model: the pipeline then calls `score_batch` with its
        shared forward (with gradients) instead of `score` on cached outputs."""
        return False

    @property
    def scores_with_model(self) -> bool:
        """Alias of `uses_shared_forward` (its cost then replaces the plain forward pass)."""
        return self.uses_shared_forward

    def grad_taps(self, block_names: tuple[str, ...]) -> tuple[str, ...]:
        """Blocks the shared forward must tap for this detector's input gradient."""
        return ()

    def score_batch(self, x: torch.Tensor, out: ModelOutput, data: DetectorInput) -> np.ndarray:
        """Scores of one batch from the shared forward `out` = model.forward_all(x) (x a leaf
        that requires grad, graph alive); only for `uses_shared_forward` detectors."""
        raise NotImplementedError(f"{self.registered_name()} scores from cached outputs")

    def derived_output(self) -> Derived | None:
        """The costly intermediate `derive` computes (see `Derived`), or None: nothing to keep."""
        return None

    def derive(self, data: DetectorInput) -> torch.Tensor:
        """The `derived_output()` array of `data` (fitted detectors only)."""
        raise NotImplementedError(f"{self.registered_name()} derives nothing")

    def derived_of(self, data: DetectorInput) -> torch.Tensor:
        """The stored copy the pipeline passed in `data.derived`, else `derive(data)`."""
        spec = self.derived_output()
        assert spec is not None, "derived_of needs a derived_output()"
        got = data.derived.get(spec.name)
        return self.derive(data) if got is None else got

    def with_derived(self, data: DetectorInput) -> DetectorInput:
        """`data` with its derived output computed once, so that every grid point of a
        selection scores from it (a derived output never depends on a grid hyperparameter:
        KNN's top-K serves every k of its grid)."""
        spec = self.derived_output() if self.fitted else None
        if spec is None or spec.name in data.derived:
            return data
        return replace(data, derived={**data.derived, spec.name: self.derive(data)})

    @property
    def selection_mode(self) -> str:
        return str(self.params.get("selection", "none"))

    def fit(self, train: DetectorInput) -> Detector:
        self.fitted = True
        return self

    @property
    def wants_ood_data(self) -> bool:
        """True when `select` needs an OOD set: "ood" (OOD validation) or "oracle" (OOD test)."""
        return self.selection_mode in ("ood", ORACLE_MODE)

    # ------------------------------------------------------------------------------- heads
    @classmethod
    def check_head(cls, head: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Raise NotApplicable when this detector needs the linear head and `head` is None."""
        if head is None and "head" in cls.needs and cls.applies_to_prototype_heads is False:
            raise NotApplicable(cls.registered_name(), cls.prototype_head_reason or
                                "it needs the linear head (W, b); this model's head is a "
                                "distance to prototypes")

    def linear_head(self, data: DetectorInput) -> tuple[torch.Tensor, torch.Tensor]:
        """(W: C×D, b: C) in float64, or NotApplicable on a prototype head."""
        self.check_head(data.head)
        assert data.head is not None
        w, b = data.head
        return w.double().cpu(), b.double().cpu()

    # ----------------------------------------------------------------------------- select
    def grid_points(self) -> list[dict[str, Any]]:
        """The cartesian product of `grid`; a hyperparameter the user gave is held fixed."""
        axes = [(k, [self.given[k]] if k in self.given else list(v))
                for k, v in self.grid.items()]
        points: list[dict[str, Any]] = [{}]
        for k, values in axes:
            points = [{**p, k: self._validate(k, v)} for p in points for v in values]
        return points

    def select(self, val: DetectorInput, ood_val: DetectorInput | None = None) -> None:
        """Choose hyperparameters / weights on validation data (see the module docstring).

        The base implementation is the generic grid search on cached outputs (used by every
        detector with a `grid` and a `selection` hyperparameter); ODIN and Mahalanobis, whose
        candidates need the model, override it."""
        mode = self.selection_mode
        if not self.grid or mode == "none":
            return
        from oodbench.detectors.gradients import choose, fgsm_standin, subsample

        n = int(self.params.get("search_samples", SEARCH_SAMPLES))
        val = subsample(val, n)
        neg: DetectorInput | None = None
        if mode == "fgsm":
            neg = fgsm_standin(val)  # once per detector, reused by every grid point
        elif mode in ("ood", ORACLE_MODE):
            if ood_val is None:
                what = "an OOD test set (--oracle)" if mode == ORACLE_MODE else \
                    "an OOD validation set"
                raise OodbenchError(f"selection {mode!r} needs {what}",
                                    "pass --ood-validation DATASET, or use --selection fgsm / id")
            neg = subsample(ood_val, n)
        elif mode != "id":
            raise OodbenchError(f"{self.registered_name()} cannot select in mode {mode!r}",
                                "use one of " + ", ".join(GRID_SELECTION_MODES))
        val, neg = self.with_derived(val), None if neg is None else self.with_derived(neg)
        points = {", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in p.items()): p for p in self.grid_points()}
        candidates = {}
        for key, point in points.items():
            self.selected = dict(point)
            try:
                candidates[key] = (np.asarray(self.score(val), dtype=np.float64),
                                   None if neg is None else np.asarray(self.score(neg),
                                                                       dtype=np.float64))
            except NotApplicable:  # e.g. a subspace larger than the features: not a candidate
                candidates[key] = (np.full(len(val), np.nan), None)
        self.selected = {}
        best, table = choose(candidates, "id" if mode == "id" else "auroc")
        self.selected = dict(points[best])
        self.selection = {"mode": mode, "criterion": "mean in-dist score" if mode == "id"
                          else "AUROC", "validation": val.name, "n": len(val),
                          "negatives": None if neg is None else neg.name, "table": table,
                          "chosen": dict(points[best]), "oracle": mode == ORACLE_MODE}

    def score(self, data: DetectorInput) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, data: DetectorInput) -> np.ndarray:
        if not self.fitted:
            raise OodbenchError(f"{self.registered_name()} must be fitted before scoring",
                                "call fit() on in-distribution training data first")
        scores = np.asarray(self.score(data), dtype=np.float64)
        if scores.shape != (len(data.labels),):
            raise RuntimeError(f"{self.registered_name()} returned shape {scores.shape}, "
                               f"expected ({len(data.labels)},)")
        return scores


DETECTORS: Registry[type[Detector]] = Registry("detector")


def create(name: str, *, oracle: bool = False, **hparams: Any) -> Detector:
    """The detector `name` with these hyperparameters; `oracle=True` admits selection "oracle"."""
    return DETECTORS.get(name)(oracle=oracle, **hparams)


def selection_hparam(default: str, modes: tuple[str, ...]) -> HParam:
    """The `selection` hyperparameter of a detector with these selection modes."""
    return HParam(default, str, choices=modes,
                  doc="what data selection may use: " + ", ".join(modes))


def grid_selection_hparams(default: str = "none") -> dict[str, HParam]:
    """The `selection` and `search_samples` hyperparameters of a detector with a `grid`."""
    return {"selection": selection_hparam(default, GRID_SELECTION_MODES),
            "search_samples": HParam(SEARCH_SAMPLES, int, ge=1,
                                     doc="validation (and negative) samples selection scores")}
