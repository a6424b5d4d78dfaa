"""Collect the metrics.json of many runs and turn them into the comparison a researcher reads.

Runs are grouped by (benchmark, in-distribution set, model); within a group a row is one
loss + detector, a column one OOD set (near sets first, then far) plus the near / far / all
means. A cell is the mean ± std over seeds (std with ddof=1; 0 for one seed) with the per-seed
values. A mean column averages the OOD sets within each seed first, then over seeds. All values
are fractions in [0, 1]; cost is in plain forward passes. Rendering (tables, Markdown, CSV) is in
`oodbench.render`, gates in `oodbench.gate`, plots in `oodbench.plots`.

Only seeds of one experiment are averaged. Within a row (and a classification line), runs are
split into variants by their setup: the resolved run config apart from the seed (`provenance.
config`), the detector's user-given hyperparameters, its selection mode and whether it used a
calibrated temperature. What a seed fitted or selected (chosen hyperparameters, the temperature's
value) is a result, not a setup, and never splits. A row with more than one variant carries a
label naming the settings that differ (`odin [T=100]`, `msp [train.epochs=2]`); two runs of the
same seed and setup are an error, never two seeds.

Selective classification ("beyond AUROC"): where metrics.json has them, each row also carries
`selective` — the detector's score judged as a confidence on the in-distribution test set
(`in_distribution`), with each OOD set mixed in, accepted OOD samples counting as errors
(`with_ood`, per set), and the near / far / all means of the latter (`with_ood_means`, averaged
over the sets within each seed first); each loss's classification line carries the MSP baseline
(`selective_msp`, at T = 1 and at the fitted temperature). A non-finite per-seed value (the
misclassification AUROC of a seed with no errors) leaves that seed out of its cell. Runs scored
before these metrics existed simply have none.

Is a difference real? `significance` = N > 0 runs a paired bootstrap (`paired_difference`):
two rows scored on the same test samples (two detectors of one run, or runs of the same seed
whose `provenance.datasets` fingerprints agree for the test and OOD sets) are resampled jointly,
per seed; the per-seed AUROC differences are averaged replicate by replicate; a difference is
significant when its 95 % percentile interval excludes 0. Per group and AUROC column, `ties`
holds the best row and the rows not significantly worse (the tie set); `compare` marks each
AUROC Δ. Seeds that cannot be paired are left out and named (never paired blindly). Every report
warns when a group has fewer than MIN_SEEDS seeds.

The reader is tolerant: keys it does not know are ignored, so other steps may add to
metrics.json freely; only the keys it needs are required.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oodbench.errors import OodbenchError
from oodbench.io import read_json
from oodbench.metrics import (
    CLASSIFICATION_METRICS,
    HIGHER_IS_BETTER,
    OOD_METRICS,
    SELECTIVE_METRICS,
    bootstrap_auroc,
    paired_bootstrap_auroc,
    percentile_interval,
)
from oodbench.provenance import digest, report_manifest

SCHEMA = "oodbench.report/2"
COMPARISON_SCHEMA = "oodbench.comparison/1"
UNITS = {"metrics": "fractions in [0, 1] (multiply by 100 for %)", "nll": "nats per sample",
         "cost": "inference time relative to one plain forward pass"}
CONVENTIONS = {"positive_class": "in-distribution", "higher_score": "more in-distribution",
               "tpr_target": 0.95, "ties": "threshold (tied scores accepted together)",
               "aggregate": "mean and std (ddof=1) over seeds; means over OOD sets per seed "
                            "first", "ece_bins": 15}
REQUIRED = ("benchmark", "in_distribution", "model", "loss", "seed", "ood_sets",
            "classification", "detectors")
MEAN_COLUMNS = ("near", "far", "all")
# Config keys (dotted, below `provenance.config`) that choose what to run, not how one run is
# made: the seed itself, the benchmark's seed / loss / detector lists and its summary text.
NOT_SETUP = ("seed", "benchmark.seeds", "benchmark.losses", "benchmark.detectors",
             "benchmark.summary")
LABEL_ITEMS = 4  # a variant label names at most this many differing settings, then "+N more"
REPORT_METRICS = (*OOD_METRICS, *SELECTIVE_METRICS)
MIN_SEEDS = 3  # fewer seeds than this: the report warns that it cannot conclude much
LEVEL = 0.95
GROUP_BY = ("benchmark", "data")  # what a report group shares: see `grouped_runs`


@dataclass
class Filters:
    """Restrict a report; None = everything. Means are over the OOD sets left after filtering."""

    metrics: tuple[str, ...] | None = None
    ood: tuple[str, ...] | None = None
    detectors: tuple[str, ...] | None = None
    losses: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for m in self.metrics or ():
            if m not in REPORT_METRICS:
                raise OodbenchError(f"unknown metric {m!r}",
                                    f"use one of: {', '.join(REPORT_METRICS)}")

    @property
    def ood_metrics(self) -> tuple[str, ...]:
        """The OOD-detection metrics kept (all without --metric; none when only selective
        metrics are asked for)."""
        if self.metrics is None:
            return OOD_METRICS
        return tuple(m for m in self.metrics if m in OOD_METRICS)

    @property
    def selective_metrics(self) -> tuple[str, ...]:
        if self.metrics is None:
            return SELECTIVE_METRICS
        return tuple(m for m in self.metrics if m in SELECTIVE_METRICS)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if v else None for k, v in self.__dict__.items()}


@dataclass
class LoadedMetrics:
    path: Path
    data: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def score_file(self, detector: str, dataset: str) -> Path:
        return self.run_dir / "scores" / detector / f"{dataset}.npy"

    @property
    def test_set(self) -> str:
        """The in-distribution test set's name (older files lack `test_set`)."""
        m = self.data
        if "test_set" in m:
            return m["test_set"]
        rest = [k for k in m.get("n", {}) if k not in m["ood_sets"]]
        return rest[0] if rest else m["in_distribution"]


def find_metrics(paths: list[Path]) -> list[Path]:
    """Every metrics file under `paths`, each once: overlapping paths (`runs runs/x`), symlinks
    and `runs/./x` name the same file, and counting it twice would fake a seed."""
    found: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name.endswith(".json"):
            candidates = [p]
        elif p.is_dir():
            candidates = sorted(p.rglob("metrics.json"))
        elif p.exists():
            raise OodbenchError(f"{p} is not a metrics file (a run's metrics.json)",
                                "pass a run folder, a folder of runs or a run's metrics.json")
        else:
            raise OodbenchError(f"{p} does not exist", "give a run folder or a folder of runs")
        for f in candidates:
            real = f.resolve()
            if real not in seen:
                seen.add(real)
                found.append(f)
    if not found:
        raise OodbenchError(f"no metrics.json under {', '.join(map(str, paths))}",
                            "score the runs first: `oodbench score RUN`")
    return found


def load_metrics(files: list[Path]) -> list[LoadedMetrics]:
    out = []
    for f in files:
        try:
            m = read_json(f)
        except (OSError, ValueError) as e:
            raise OodbenchError(f"cannot read {f}: {e}",
                                f"score the run again (`oodbench score {Path(f).parent}`) to "
                                "rewrite it, or delete it") from None
        if not isinstance(m, dict) or not str(m.get("schema", "")).startswith("oodbench.metrics/"):
            raise OodbenchError(f"{f} is not an oodbench metrics file",
                                "point `report` at run folders made by `oodbench score`, or "
                                f"score the run again (`oodbench score {Path(f).parent}`)")
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise OodbenchError(f"{f} lacks {missing}", "score the run again with this version")
        check_metrics(m, Path(f))
        out.append(LoadedMetrics(Path(f), m))
    return out


# --------------------------------------------------------------- the structure `report` reads
# A hand-edited metrics.json with a wrong type would otherwise fail deep in the report with a
# traceback; these checks name the file and the key instead. Only what the report reads is
# checked (other keys stay free); an optional key may also be null where the reader allows it.
_KINDS: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "an object": lambda v: isinstance(v, dict),
    "true or false": lambda v: isinstance(v, bool),
    "\"near\" or \"far\"": lambda v: v in ("near", "far"),
}


def _json_type(v: Any) -> str:
    names = {bool: "a boolean", str: "a string", int: "a number", float: "a number",
             dict: "an object", list: "a list", type(None): "null"}
    return f"{names.get(type(v), type(v).__name__)} ({json.dumps(v, default=str)[:30]})"


def _need(f: Path, key: str, value: Any, kind: str, nullable: bool = False) -> None:
    if (value is None and nullable) or _KINDS[kind](value):
        return
    raise OodbenchError(f"{f}: `{key}` is {_json_type(value)}, expected {kind}",
                        f"correct `{key}` in {f}, or score the run again (`oodbench score "
                        f"{f.parent}`) to rewrite the file")


def _need_all(f: Path, key: str, obj: dict[str, Any], names: tuple[str, ...], kind: str) -> None:
    """Every present name of `names` in `obj` is of `kind`."""
    for k in names:
        if k in obj:
            _need(f, f"{key}.{k}", obj[k], kind)


def check_metrics(m: dict[str, Any], f: Path) -> None:
    """Raise an OodbenchError naming `f` and the key when `m` has a type the report cannot
    read (a list where an object belongs, a string as a metric value...)."""
    for k in ("benchmark", "in_distribution", "model", "loss"):
        _need(f, k, m[k], "a string")
    _need(f, "seed", m["seed"], "an integer")
    for k in ("ood_sets", "classification", "detectors"):
        _need(f, k, m[k], "an object")
    for o, g in m["ood_sets"].items():
        _need(f, f"ood_sets.{o}", g, '"near" or "far"')
    for state in ("uncalibrated", "calibrated"):
        if state in m["classification"]:
            _need(f, f"classification.{state}", m["classification"][state], "an object")
            _need_all(f, f"classification.{state}", m["classification"][state],
                      CLASSIFICATION_METRICS, "a number")
    for k, kind in (("test_set", "a string"), ("n", "an object"), ("calibration", "an object"),
                    ("provenance", "an object"), ("weights", "a string"),
                    ("cache_keys", "an object")):
        _need(f, k, m.get(k), kind, nullable=k not in m or k not in ("n", "test_set"))
    if isinstance(m.get("calibration"), dict):
        _need_all(f, "calibration", m["calibration"], ("temperature",), "a number")
    msp = m["classification"].get("selective_msp")
    _need(f, "classification.selective_msp", msp, "an object", nullable=True)
    for state, cell in (msp or {}).items():
        _check_selective(f, f"classification.selective_msp.{state}", cell)
    for name, d in m["detectors"].items():
        _check_detector(f, f"detectors.{name}", d)


def _check_detector(f: Path, key: str, d: Any) -> None:
    _need(f, key, d, "an object")
    for k in ("ood", "nonfinite", "hparams", "selected"):
        _need(f, f"{key}.{k}", d.get(k), "an object", nullable=True)
    for k in ("cost", "temperature"):
        _need(f, f"{key}.{k}", d.get(k), "a number", nullable=True)
    for o, cell in (d.get("ood") or {}).items():
        _need(f, f"{key}.ood.{o}", cell, "an object")
        lacking = [k for k in OOD_METRICS if k not in cell]
        if lacking:
            raise OodbenchError(f"{f}: `{key}.ood.{o}` lacks {lacking}",
                                f"score the run again (`oodbench score {f.parent}`)")
        _need_all(f, f"{key}.ood.{o}", cell, OOD_METRICS, "a number")
    _need_all(f, f"{key}.nonfinite", d.get("nonfinite") or {}, tuple(d.get("nonfinite") or {}),
              "an integer")
    sel = d.get("selective")
    _need(f, f"{key}.selective", sel, "an object", nullable=True)
    if isinstance(sel, dict):
        if sel.get("in_distribution") is not None:
            _check_selective(f, f"{key}.selective.in_distribution", sel["in_distribution"])
        _need(f, f"{key}.selective.with_ood", sel.get("with_ood"), "an object", nullable=True)
        for o, cell in (sel.get("with_ood") or {}).items():
            _check_selective(f, f"{key}.selective.with_ood.{o}", cell)


def _check_selective(f: Path, key: str, cell: Any) -> None:
    _need(f, key, cell, "an object")
    _need_all(f, key, cell, SELECTIVE_METRICS, "a number")


def _cell(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "n": len(a), "values": [float(v) for v in a]}


def _keep(name: str, allowed: tuple[str, ...] | None) -> bool:
    return allowed is None or name in allowed


RowKey = tuple[str, str, str, str, str]  # benchmark, in-dist, model, loss, detector label


@dataclass
class Report:
    groups: list[dict[str, Any]]
    filters: Filters = field(default_factory=Filters)
    manifest: dict[str, Any] = field(default_factory=dict)
    bootstrap: dict[str, Any] | None = None
    significance: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    # what each row was computed from: (detector name, the runs = seeds), for paired tests
    row_runs: dict[RowKey, tuple[str, list[LoadedMetrics]]] = field(default_factory=dict,
                                                                     repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "units": UNITS, "conventions": CONVENTIONS,
                "filters": self.filters.to_dict(), "bootstrap": self.bootstrap,
                "significance": self.significance, "warnings": self.warnings,
                "manifest": self.manifest, "groups": self.groups}


def significance_info(replicates: int, seed: int) -> dict[str, Any]:
    return {"test": "paired bootstrap over test samples", "metric": "auroc",
            "replicates": replicates, "seed": seed, "level": LEVEL,
            "method": "in-dist and OOD indices resampled jointly for both rows; per seed, then "
                      "the per-seed differences averaged replicate by replicate; significant "
                      "when the 95 % percentile interval of the difference excludes 0"}


def grouped_runs(runs: list[LoadedMetrics], filters: Filters, group_by: str = "benchmark"
                 ) -> dict[tuple[str, str, str], list[LoadedMetrics]]:
    """The runs the --loss filter keeps, by (benchmark, in-distribution set, model). With
    `group_by` "data", benchmarks of one data set and model share a group, keyed by their names
    joined with " + ": an ablation written as its own benchmark file then sits in its base's
    table, its rows tested against the base's for ties."""
    if group_by not in GROUP_BY:
        raise OodbenchError(f"unknown grouping {group_by!r}", f"use one of: {', '.join(GROUP_BY)}")
    by_setting: dict[tuple[str, ...], list[LoadedMetrics]] = defaultdict(list)
    for r in runs:
        if _keep(r.data["loss"], filters.losses):
            m = r.data
            where = (m["in_distribution"], m["model"])
            by_setting[where if group_by == "data" else (m["benchmark"], *where)].append(r)
    if group_by == "benchmark":
        return {(k[0], k[1], k[2]): v for k, v in by_setting.items()}
    return {(" + ".join(sorted({r.data["benchmark"] for r in v})), k[0], k[1]): v
            for k, v in by_setting.items()}


def build_report(runs: list[LoadedMetrics], filters: Filters | None = None,
                 bootstrap: int = 0, bootstrap_seed: int = 0, significance: int = 0,
                 group_by: str = "benchmark") -> Report:
    """The report over `runs`. `bootstrap` > 0 adds a 95 % percentile interval to every AUROC
    cell from that many replicates per seed (in-dist and OOD scores resampled independently;
    the interval of a seed mean averages the replicates across seeds, index by index).
    `significance` > 0 adds, per group and AUROC column, the rows statistically tied with the
    best (`ties`; a paired bootstrap of that many replicates, see `paired_difference`).
    `group_by`: see `grouped_runs`."""
    filters = filters or Filters()
    _check_ood_names(runs, filters)
    by_group = grouped_runs(runs, filters, group_by)
    if not by_group:
        raise OodbenchError("no run matches the --loss filter",
                            f"losses present: {sorted({r.data['loss'] for r in runs})}")
    row_runs: dict[RowKey, tuple[str, list[LoadedMetrics]]] = {}
    groups = [_group(key, g, filters, bootstrap, bootstrap_seed, row_runs)
              for key, g in sorted(by_group.items())]
    if not any(g["rows"] for g in groups):
        if filters.metrics and not filters.ood_metrics:
            raise OodbenchError("no run has the selective-classification metrics asked for "
                                f"({', '.join(filters.metrics)})",
                                "score the runs again with this version (`oodbench score RUN`)")
        detectors = sorted({d for r in runs for d in r.data["detectors"]})
        raise OodbenchError("no detector / OOD set matches the filters",
                            "check --detector and --ood against the runs' names (detectors "
                            f"present: {', '.join(detectors)})")
    boot = {"replicates": bootstrap, "seed": bootstrap_seed, "level": 0.95,
            "method": "percentile; in-dist and OOD resampled independently"} if bootstrap else None
    warnings = [*staleness_warnings([r for g in by_group.values() for r in g]),
                *(w for g in groups for w in seed_warnings(g))]
    rep = Report(groups, filters, report_manifest([(r.path, r.data) for r in runs]), boot,
                 None, warnings, row_runs)
    if significance:
        rep.significance = significance_info(significance, bootstrap_seed)
        if "auroc" not in filters.ood_metrics:
            warnings.append("ties with the best are tested on AUROC, which --metric left out")
        else:
            for g in groups:
                g["ties"] = _ties(g, row_runs, significance, bootstrap_seed, warnings)
    return rep


def _check_ood_names(runs: list[LoadedMetrics], filters: Filters) -> None:
    """An --ood name no run has is a typo, not a filter: without this check it would leave
    empty tables (or, beside valid names, means over fewer sets than asked for)."""
    present = list(dict.fromkeys(o for r in runs for o in r.data["ood_sets"]))
    unknown = [o for o in filters.ood or () if o not in present]
    if unknown:
        raise OodbenchError(f"no run has the OOD set{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))} (--ood)",
                            f"use OOD sets present: {', '.join(present)}")


def staleness_warnings(runs: list[LoadedMetrics]) -> list[str]:
    """A warning per run whose metrics.json no longer matches its calibration.json (see
    `_stale`). Only the two JSON files are read, no checkpoint."""
    out = []
    for r in runs:
        path = r.run_dir / "calibration.json"
        try:
            current = read_json(path) if path.is_file() else None
        except (OSError, ValueError):
            current = None
        why = _stale(r.data, current) if isinstance(current, dict) else None
        if why:
            fix = (f"`oodbench calibrate {r.run_dir}`, then `oodbench score {r.run_dir}`"
                   if why[1] else f"`oodbench score {r.run_dir}` again")
            out.append(f"{r.path} is out of date: {why[0]}; run {fix}")
    return out


def _stale(m: dict[str, Any], current: dict[str, Any]) -> tuple[str, bool] | None:
    """Why metrics `m` disagree with the run's calibration.json `current` (None if they do
    not): other weights (the checkpoint changed after one was written), no calibration at
    scoring though it is for the same weights (calibrated after scoring), or another
    temperature (calibrated again after scoring). With the reason: whether calibrating
    again is part of the fix."""
    weights, fitted_on = m.get("weights"), current.get("weights")
    if weights and fitted_on and fitted_on != weights:
        return ("its calibration.json was fitted on other weights than the ones it was scored "
                "on (the checkpoint changed after one of the two was written)", True)
    used = m.get("calibration")
    if used is None:
        return ("it was scored before its calibration.json was written (the report has no "
                "calibrated figures for it)", False) if weights and fitted_on == weights else None
    t_used, t_now = used.get("temperature"), current.get("temperature")
    if not all(isinstance(t, int | float) for t in (t_used, t_now)) or t_used == t_now:
        return None
    shown = next(f"{t_used:.{d}g} / {t_now:.{d}g}" for d in (3, 6, 17)
                 if f"{t_used:.{d}g}" != f"{t_now:.{d}g}" or d == 17)
    used_text, now_text = shown.split(" / ")
    return (f"it was scored with the fitted temperature {used_text} (calibrated figures, "
            f"--calibrated detectors); its calibration.json now holds {now_text}", False)


def seed_warnings(g: dict[str, Any]) -> list[str]:
    """A warning when a group, or a loss within it, has too few seeds to tell a real difference
    from seed noise. A loss with fewer seeds than the group is named (one seed beside others
    with three; seed 0 for one loss and seed 1 for another is 1 seed each, not 2)."""
    title = f"{g['benchmark']} · {g['in_distribution']} · {g['model']}"
    advice = (f"with fewer than {MIN_SEEDS} seeds a difference between rows may be seed "
              "noise: do not conclude from it")
    n = len(g["seeds"])
    per_loss = {loss: c.get("seeds", g["seeds"]) for loss, c in g["classification"].items()}
    if n < MIN_SEEDS and all(s == g["seeds"] for s in per_loss.values()):
        return [f"{title}: {n} seed{'s' if n != 1 else ''} ({', '.join(map(str, g['seeds']))}); "
                f"{advice}"]
    few = {loss: s for loss, s in per_loss.items() if len(s) < MIN_SEEDS}
    return [f"{title}: " + "; ".join(f"{loss} has {len(s)} seed{'s' if len(s) != 1 else ''} "
                                     f"({', '.join(map(str, s))})" for loss, s in few.items())
            + f"; {advice}"] if few else []


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys, so two setups can say which key differs."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_setup(m: dict[str, Any]) -> dict[str, Any]:
    """What made the run apart from its seed: `provenance.config` flattened ("config.benchmark.
    train.epochs"), without NOT_SETUP. Files scored before provenance existed give
    {"config": None}: equal to each other, so old seeds still average together."""
    cfg = (m.get("provenance") or {}).get("config")
    if not isinstance(cfg, dict):
        return {"config": None}
    return {f"config.{k}": v for k, v in _flatten(cfg).items() if k not in NOT_SETUP}


def detector_setup(d: dict[str, Any]) -> dict[str, Any]:
    """The detector's setup in one run: the user-given hyperparameters, the selection mode and
    whether a calibrated temperature was used; not what selection chose nor the temperature's
    value (per-seed results). Older files lack `given` / `calibrated`: the effective
    hyperparameters less the selected ones, and temperature != 1, stand in."""
    selection = d.get("selection") if isinstance(d.get("selection"), dict) else {}
    given = d.get("given")
    if not isinstance(given, dict):
        chosen = d.get("selected") or selection.get("chosen") or {}
        given = {k: v for k, v in (d.get("hparams") or {}).items() if k not in chosen}
    calibrated = d.get("calibrated")
    if not isinstance(calibrated, bool):
        calibrated = float(d.get("temperature", 1.0)) != 1.0
    flat = {f"given.{k}": v for k, v in _flatten(given).items() if k and k != "selection"}
    mode = selection.get("mode", given.get("selection", "none"))
    return {**flat, "selection": str(mode), "calibrated": calibrated}


@dataclass
class Variant:
    """Runs that are seeds of one setup; `label` / `settings` name what sets it apart from the
    other variants of its row (None when the row has one variant)."""

    runs: list[LoadedMetrics]
    label: str | None = None
    settings: dict[str, Any] | None = None

    def suffix(self, name: str) -> str:
        return f"{name} [{self.label}]" if self.label else name

    def to_dict(self) -> dict[str, Any] | None:
        return {"label": self.label, "settings": self.settings} if self.label else None


_ABSENT = object()


def _label(settings: dict[str, Any]) -> str:
    items = []
    for k, v in settings.items():
        if k == "calibrated":
            items.append("calibrated" if v else "uncalibrated")
            continue
        name = k.removeprefix("config.").removeprefix("benchmark.").removeprefix("given.")
        if v is _ABSENT:
            text = "default" if k.startswith("given.") else "absent"
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
        items.append(f"{name}={text if len(text) <= 40 else text[:37] + '...'}")
    more = len(items) - LABEL_ITEMS
    return ", ".join(items[:LABEL_ITEMS]) + (f", +{more} more" if more > 0 else "")


def split_variants(runs: list[LoadedMetrics], setup_of: Callable[[LoadedMetrics], dict[str, Any]],
                   what: str, same_model_ok: bool = False) -> list[Variant]:
    """`runs` split by setup, each part checked to hold each seed once. `same_model_ok`: a
    repeated seed with identical weights is one model scored twice and is counted once (for
    classification, where the weights alone decide the numbers)."""
    setups = [setup_of(r) for r in runs]
    parts: dict[str, list[int]] = {}
    for i, s in enumerate(setups):
        parts.setdefault(digest(s), []).append(i)
    # label order: run config, then the detector's hyperparameters, selection, calibration
    rank = ("config", "given.", "selection", "calibrated")
    keys = sorted({k for s in setups for k in s},
                  key=lambda k: (next(i for i, p in enumerate(rank) if k.startswith(p)), k))
    differ = [k for k in keys if len({json.dumps(s.get(k, "\0absent"), sort_keys=True,
                                                 default=str) for s in setups}) > 1]
    out = []
    for idx in parts.values():
        vruns = _one_per_seed([runs[i] for i in idx], what, same_model_ok)
        if len(parts) == 1:
            return [Variant(vruns)]
        settings = {k: setups[idx[0]].get(k, _ABSENT) for k in differ}
        label = _label(settings)
        # labels shortened ("+N more", long values cut) may coincide: number the twins
        twins = sum(v.label == label or str(v.label).startswith(f"{label} (variant ")
                    for v in out)
        out.append(Variant(vruns, f"{label} (variant {twins + 1})" if twins else label,
                           {k: None if v is _ABSENT else v for k, v in settings.items()}))
    return sorted(out, key=lambda v: v.label or "")


def _one_per_seed(runs: list[LoadedMetrics], what: str, same_model_ok: bool
                  ) -> list[LoadedMetrics]:
    kept: dict[Any, LoadedMetrics] = {}
    for r in runs:
        seed = r.data["seed"]
        first = kept.get(seed)
        if first is None:
            kept[seed] = r
        elif not (same_model_ok and first.data.get("weights")
                  and first.data.get("weights") == r.data.get("weights")):
            raise OodbenchError(
                f"{first.path} and {r.path} are both seed {seed} of {what} with the same setup; "
                "averaging them would count one seed twice",
                "remove one of them, or report them separately (one `oodbench report` each)")
    return list(kept.values())


def _group(key: tuple[str, str, str], runs: list[LoadedMetrics], filters: Filters,
           bootstrap: int, bootstrap_seed: int,
           row_runs: dict[RowKey, tuple[str, list[LoadedMetrics]]]) -> dict[str, Any]:
    bench, ind, model = key
    ood_sets: dict[str, str] = {}
    for r in runs:
        ood_sets.update({o: g for o, g in r.data["ood_sets"].items() if _keep(o, filters.ood)})
    order = sorted(ood_sets, key=lambda n: (ood_sets[n] != "near", list(ood_sets).index(n)))
    by_loss: dict[str, list[LoadedMetrics]] = defaultdict(list)
    several = len({r.data["benchmark"] for r in runs}) > 1  # grouped by data: name each's loss
    for r in runs:
        by_loss[f"{r.data['loss']} ({r.data['benchmark']})" if several
                else r.data["loss"]].append(r)
    rows, classification = [], {}
    for loss, lruns in sorted(by_loss.items()):
        for v in split_variants(lruns, lambda r: config_setup(r.data), f"loss {loss}",
                                same_model_ok=True):
            classification[v.suffix(loss)] = {**_classification(v.runs, filters),
                                              "variant": v.to_dict()}
        detectors = sorted({d for r in lruns for d in r.data["detectors"]
                            if _keep(d, filters.detectors)})
        for det in detectors:
            druns = [r for r in lruns if det in r.data["detectors"]]
            for v in split_variants(druns, lambda r, det=det: {
                    **config_setup(r.data), **detector_setup(r.data["detectors"][det])},
                    f"{loss} + {det}"):
                row = _labelled(_row(loss, det, v.runs, order, ood_sets, filters, bootstrap,
                                     bootstrap_seed), v, det)
                rows.append(row)
                row_runs[(*key, loss, row["detector"])] = (det, v.runs)
    rows = [r for r in rows if r["ood"] or r.get("nonfinite") or r.get("not_applicable")
            or r.get("selective")]
    return {"benchmark": bench, "in_distribution": ind, "model": model,
            "ood_sets": {o: ood_sets[o] for o in order},
            "seeds": sorted({r.data["seed"] for r in runs}),
            "classification": classification, "rows": rows}


def _labelled(row: dict[str, Any], v: Any, det: str) -> dict[str, Any]:
    """The row under its variant label; an oracle selection (hyperparameters chosen on an OOD
    TEST set, only with --oracle) is always named in the label, even when it is alone."""
    label = v.suffix(det)
    if row.get("oracle"):
        label += f" [oracle: {row['oracle']}]"
    return {**row, "detector": label, "variant": v.to_dict()}


def _classification(runs: list[LoadedMetrics], filters: Filters) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": sorted(r.data["seed"] for r in runs)}
    for state in ("uncalibrated", "calibrated"):
        vals = [r.data["classification"][state] for r in runs
                if state in r.data["classification"]]
        if vals:
            out[state] = {k: _cell([v[k] for v in vals]) for k in CLASSIFICATION_METRICS
                          if all(k in v for v in vals)}
    temps = [r.data["calibration"]["temperature"] for r in runs
             if isinstance(r.data.get("calibration"), dict)
             and "temperature" in r.data["calibration"]]
    if temps:
        out["temperature"] = _cell(temps)
    msp = {}
    for state in ("uncalibrated", "calibrated"):
        cells = _selective_cells([(r.data["classification"].get("selective_msp") or {}).get(state)
                                  for r in runs], filters.selective_metrics)
        if cells:
            msp[state] = cells
    if msp:
        out["selective_msp"] = msp
    shift = _shift_classification(runs)
    if shift:
        out["shift"] = shift
    return out


def _shift_classification(runs: list[LoadedMetrics]) -> dict[str, Any]:
    """Accuracy / ECE / NLL on each corrupted copy of the test set (`shift:`), over seeds."""
    out: dict[str, Any] = {}
    names = sorted({n for r in runs for n in (r.data.get("shift") or {})})
    for name in names:
        vals = [r.data["shift"][name] for r in runs if name in (r.data.get("shift") or {})]
        out[name] = {"corruption": vals[0]["corruption"], "severity": vals[0]["severity"],
                     **{k: _cell([v["classification"][k] for v in vals])
                        for k in CLASSIFICATION_METRICS}}
    return out


def _shift_row(per_run: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """Per corrupted set: AUROC with the shifted set as OOD, and the full-spectrum AUROC
    (shifted counted as in-distribution) averaged over the OOD sets within each seed."""
    out: dict[str, Any] = {}
    names = sorted({n for d in per_run for n in (d.get("shift") or {})})
    for name in names:
        recs = [d["shift"][name] for d in per_run if name in (d.get("shift") or {})]
        spectrum = [np.mean([rec["full_spectrum"][o]["auroc"] for o in order
                             if o in rec["full_spectrum"]]) for rec in recs
                    if any(o in rec["full_spectrum"] for o in order)]
        out[name] = {"as_ood_auroc": _cell([rec["as_ood"]["auroc"] for rec in recs])}
        if spectrum:
            out[name]["full_spectrum_auroc"] = _cell(spectrum)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and bool(np.isfinite(v))


def _selective_cells(per_seed: list[Any], metrics: tuple[str, ...]) -> dict[str, Any]:
    """Cells of the selective metrics over the seeds that have them. A value that is not finite
    (the misclassification AUROC of a seed without errors is undefined) leaves that seed out."""
    out = {}
    for k in metrics:
        vals = [d[k] for d in per_seed if isinstance(d, dict) and _finite(d.get(k))]
        if vals:
            out[k] = _cell(vals)
    return out


def _selective(per_run: list[dict[str, Any]], order: list[str], ood_sets: dict[str, str],
               metrics: tuple[str, ...]) -> dict[str, Any]:
    """The detector's score judged as a confidence: the in-distribution cells, the with-OOD
    cells per OOD set (accepted OOD samples count as errors) and their near / far / all means
    (averaged over the sets within each seed first, as the OOD means)."""
    sel = [d.get("selective") if isinstance(d.get("selective"), dict) else {} for d in per_run]
    out: dict[str, Any] = {}
    ind = _selective_cells([s.get("in_distribution") for s in sel], metrics)
    if ind:
        out["in_distribution"] = ind
    wo = [s.get("with_ood") if isinstance(s.get("with_ood"), dict) else {} for s in sel]
    with_ood = {o: c for o in order
                if (c := _selective_cells([w.get(o) for w in wo], metrics))}
    if with_ood:
        out["with_ood"] = with_ood
    means = {}
    for col in MEAN_COLUMNS:
        sets = [o for o in order if col == "all" or ood_sets[o] == col]
        if not sets or any(o not in with_ood for o in sets):
            continue
        complete = [w for w in wo if all(isinstance(w.get(o), dict) for o in sets)]
        cells = _selective_cells([{k: float(np.mean([w[o].get(k, np.nan) for o in sets]))
                                   for k in metrics} for w in complete], metrics)
        if cells:
            means[col] = cells
    if means:
        out["with_ood_means"] = means
    return out


def _row(loss: str, det: str, runs: list[LoadedMetrics], order: list[str],
         ood_sets: dict[str, str], filters: Filters, bootstrap: int,
         bootstrap_seed: int) -> dict[str, Any]:
    """One row: `runs` are seeds of one setup (see `split_variants`)."""
    metrics = filters.ood_metrics
    per_run = [r.data["detectors"][det] for r in runs]
    cells: dict[str, dict[str, Any]] = {}
    for ood in order:
        vals = [d["ood"][ood] for d in per_run if ood in d.get("ood", {})]
        if vals and metrics:
            cells[ood] = {k: _cell([v[k] for v in vals]) for k in metrics}
            if bootstrap and "auroc" in metrics:
                have = [r for r, d in zip(runs, per_run, strict=True) if ood in d.get("ood", {})]
                cells[ood]["auroc"]["ci95"] = _auroc_interval(have, det, [ood], bootstrap,
                                                              bootstrap_seed)
    nonfinite = _nonfinite(runs, per_run, ood_sets)
    means: dict[str, Any] = {}
    for col in MEAN_COLUMNS:
        sets = [o for o in order if col == "all" or ood_sets[o] == col]
        if not metrics or any(o not in cells for o in sets):
            continue
        # a seed counts in a mean only when it has every set of that mean
        complete = [(r, d) for r, d in zip(runs, per_run, strict=True)
                    if sets and all(o in d.get("ood", {}) for o in sets)]
        if not complete:
            continue
        means[col] = {k: _cell([np.mean([d["ood"][o][k] for o in sets]) for _, d in complete])
                      for k in metrics}
        if bootstrap and "auroc" in metrics:
            means[col]["auroc"]["ci95"] = _auroc_interval([r for r, _ in complete], det, sets,
                                                          bootstrap, bootstrap_seed)
    costs = [d["cost"] for d in per_run if isinstance(d.get("cost"), int | float)]
    row = {"loss": loss, "detector": det, "seeds": sorted(r.data["seed"] for r in runs),
           "ood": cells, "means": means}
    if costs:
        row["cost"] = _cell(costs)
    selective = _selective(per_run, order, ood_sets, filters.selective_metrics)
    if selective:
        row["selective"] = selective
    if nonfinite:
        row["nonfinite"] = nonfinite
    reasons = {d["reason"] for d in per_run if d.get("applicable") is False}
    if reasons:  # the detector refused this model (e.g. it needs a linear head)
        row["not_applicable"] = "; ".join(sorted(reasons))
    oracle = {str(d["selection"].get("negatives")) for d in per_run
              if isinstance(d.get("selection"), dict) and d["selection"].get("oracle")}
    if oracle:
        row["oracle"] = ", ".join(sorted(oracle))
    shift = _shift_row(per_run, order)
    if shift:
        row["shift"] = shift
    return row


def _nonfinite(runs: list[LoadedMetrics], per_run: list[dict[str, Any]],
               ood_sets: dict[str, str]) -> dict[str, int]:
    """NaN/inf scores counted per set (the in-dist test set's count blocks every set); such a
    set has no metric, and a mean that would have to leave it out is not reported."""
    counts: dict[str, int] = defaultdict(int)
    for r, d in zip(runs, per_run, strict=True):
        for s, n in d.get("nonfinite", {}).items():
            counts[s if s in ood_sets else r.data.get("in_distribution", s)] += int(n)
    return dict(counts)


def load_scores(r: LoadedMetrics, det: str, dataset: str) -> np.ndarray:
    path = r.score_file(det, dataset)
    if not path.exists():
        raise OodbenchError(f"no saved scores {path}",
                            f"score the run again (`oodbench score {r.run_dir}`) or drop "
                            "--bootstrap / --plots")
    return np.load(path)


def _auroc_interval(runs: list[LoadedMetrics], det: str, sets: list[str], n_boot: int,
                    seed: int) -> list[float]:
    """Percentile interval of the AUROC averaged over `sets` and then over `runs` (seeds)."""
    reps = []
    for r in runs:
        in_scores = load_scores(r, det, r.test_set)
        reps.append(np.mean([bootstrap_auroc(in_scores, load_scores(r, det, o), n_boot, seed)
                             for o in sets], axis=0))
    return list(percentile_interval(np.mean(reps, axis=0)))


# ------------------------------------------------------------------ is a difference real?
def pairing_problem(ra: LoadedMetrics, rb: LoadedMetrics, sets: list[str]) -> str | None:
    """Why two runs' scores cannot be paired sample by sample (None when they can): one run
    pairs with itself; two runs need the same test set and the same data, by the content
    fingerprints `score` stores in `provenance.datasets`."""
    if ra.path.resolve() == rb.path.resolve():
        return None
    if ra.test_set != rb.test_set:
        return f"test sets differ ({ra.test_set} vs {rb.test_set})"
    fa = (ra.data.get("provenance") or {}).get("datasets")
    fb = (rb.data.get("provenance") or {}).get("datasets")
    if not isinstance(fa, dict) or not isinstance(fb, dict):
        return "no dataset fingerprints in provenance (older metrics.json)"
    for name in (ra.test_set, *sets):
        if not fa.get(name) or fa.get(name) != fb.get(name):
            return f"{name} is not the same data in both runs (provenance fingerprints differ)"
    return None


class _Scores:
    """Saved scores, each file read once per report; None when the file is missing."""

    def __init__(self) -> None:
        self.cache: dict[Path, np.ndarray | None] = {}

    def get(self, r: LoadedMetrics, det: str, dataset: str) -> np.ndarray | None:
        path = r.score_file(det, dataset)
        if path not in self.cache:
            self.cache[path] = np.load(path) if path.exists() else None
        return self.cache[path]


def paired_difference(pairs: list[tuple[LoadedMetrics, LoadedMetrics]], det_a: str, det_b: str,
                      sets: list[str], n_boot: int, seed: int, scores: _Scores | None = None
                      ) -> dict[str, Any]:
    """Paired bootstrap of AUROC(b) − AUROC(a) (averaged over `sets`) for runs paired by seed:
    per seed the in-dist and OOD indices are resampled jointly for both rows, then the per-seed
    differences are averaged replicate by replicate. Seeds whose runs cannot be paired (other
    data, missing scores) are left out and named in `skipped`; no seed left = no `ci95`."""
    return _paired(pairs, det_a, det_b, sets, n_boot, seed, scores or _Scores())[0]


def _paired(pairs: list[tuple[LoadedMetrics, LoadedMetrics]], det_a: str, det_b: str,
            sets: list[str], n_boot: int, seed: int, scores: _Scores
            ) -> tuple[dict[str, Any], list[str]]:
    """`paired_difference` and the distinct reasons seeds were left out."""
    reps, used, skipped, reasons = [], [], [], []
    for ra, rb in pairs:
        s = ra.data["seed"]
        problem = pairing_problem(ra, rb, sets)
        if problem is None:
            a = [scores.get(ra, det_a, n) for n in (ra.test_set, *sets)]
            b = [scores.get(rb, det_b, n) for n in (rb.test_set, *sets)]
            if any(x is None for x in (*a, *b)):
                problem = "no saved scores"
            else:
                try:
                    reps.append(paired_bootstrap_auroc(a[0], a[1:], b[0], b[1:], n_boot,
                                                       seed * 100_003 + abs(int(s))))
                    used.append(s)
                    continue
                except ValueError as e:
                    problem = str(e)
        skipped.append(f"seed {s}: {problem}")
        reasons.append(problem)
    out: dict[str, Any] = {"seeds": used}
    if reps:
        diff = np.mean(reps, axis=0)
        lo, hi = percentile_interval(diff, LEVEL)
        out.update(ci95=[lo, hi], significant=bool(lo > 0 or hi < 0))
    if skipped:
        out["skipped"] = "; ".join(skipped)
    elif not pairs:
        out["skipped"] = "no seed both rows have"
        reasons.append(out["skipped"])
    return out, list(dict.fromkeys(reasons))


def _column_sets(group: dict[str, Any], col: str) -> list[str]:
    if col in group["ood_sets"]:
        return [col]
    return [o for o, g in group["ood_sets"].items() if col == "all" or g == col]


def _seed_pairs(runs_a: list[LoadedMetrics], runs_b: list[LoadedMetrics], det_a: str,
                det_b: str, sets: list[str]) -> list[tuple[LoadedMetrics, LoadedMetrics]]:
    """Runs of the two rows with the same seed, where both have a metric for every set."""
    def has(r: LoadedMetrics, det: str) -> bool:
        return all(o in r.data["detectors"][det].get("ood", {}) for o in sets)
    by_seed = {r.data["seed"]: r for r in runs_b if has(r, det_b)}
    return [(r, by_seed[r.data["seed"]]) for r in sorted(runs_a, key=lambda r: r.data["seed"])
            if r.data["seed"] in by_seed and has(r, det_a)]


def _ties(group: dict[str, Any], row_runs: dict[RowKey, tuple[str, list[LoadedMetrics]]],
          n_boot: int, seed: int, warnings: list[str]) -> dict[str, Any]:
    """Per column: the best row by mean AUROC and every row not significantly worse (the tie
    set, best included), from a paired bootstrap of each row against the best."""
    key = (group["benchmark"], group["in_distribution"], group["model"])
    scores = _Scores()
    out: dict[str, Any] = {}
    problems: dict[str, list[str]] = {}
    for col in columns(group):
        have = [(r, c) for r in group["rows"] if (c := cell_of(r, col, "auroc"))]
        if not have:
            continue
        best, _ = max(have, key=lambda rc: rc[1]["mean"])
        det_best, runs_best = row_runs[(*key, best["loss"], best["detector"])]
        sets = _column_sets(group, col)
        tied, tests = [_name(best)], []
        for r, c in have:
            if r is best:
                continue
            det, runs = row_runs[(*key, r["loss"], r["detector"])]
            res, why = _paired(_seed_pairs(runs_best, runs, det_best, det, sets), det_best, det,
                               sets, n_boot, seed, scores)
            for w in why:
                problems.setdefault(w, []).append(f"{r['loss']} + {r['detector']} ({col})")
            if "ci95" in res and not res["significant"]:
                tied.append(_name(r))
            tests.append({**_name(r), "delta": c["mean"] - cell_of(best, col, "auroc")["mean"],
                          **res})
        out[col] = {"best": _name(best), "tied": tied, "tests": tests}
    warnings += [f"{_where(group)}: some seeds (or rows) not paired with the best for the tie "
                 f"test ({why}): {_few(rows)}; see `ties` in report.json"
                 for why, rows in problems.items()]
    return out


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _name(row: dict[str, Any]) -> dict[str, str]:
    return {"loss": row["loss"], "detector": row["detector"]}


def _where(g: dict[str, Any]) -> str:
    return f"{g['benchmark']} · {g['in_distribution']} · {g['model']}"


def is_tied(group: dict[str, Any], row: dict[str, Any], column: str) -> bool:
    """Whether `row` is in the tie set of `column` (False when no ties were computed)."""
    return _name(row) in group.get("ties", {}).get(column, {}).get("tied", [])


def best_values(group: dict[str, Any], metric: str) -> dict[str, float]:
    """Best mean value per column (OOD set or near/far/all mean), for highlighting."""
    pick = max if HIGHER_IS_BETTER[metric] else min
    best: dict[str, float] = {}
    for col in [*group["ood_sets"], *MEAN_COLUMNS]:
        vals = [cell_of(r, col, metric) for r in group["rows"]]
        vals = [v["mean"] for v in vals if v]
        if vals:
            best[col] = pick(vals)
    return best


def cell_of(row: dict[str, Any], column: str, metric: str) -> dict[str, Any] | None:
    """The cell of `row` in an OOD-set column or a mean column ("near", "far", "all")."""
    if column in row["ood"]:
        return row["ood"][column].get(metric)
    if column in MEAN_COLUMNS:
        return row["means"].get(column, {}).get(metric)
    return None


def columns(group: dict[str, Any]) -> list[str]:
    """OOD sets (near first) then the means; near / far means only when both groups exist
    (otherwise they equal the overall mean)."""
    present = {c for r in group["rows"] for c in r["means"]}
    both = {"near", "far"} <= present
    return [*group["ood_sets"], *[c for c in MEAN_COLUMNS if c in present
                                  and (both or c == "all")]]


def _compared_row(ra: dict[str, Any], rb: dict[str, Any], cells: dict[str, Any],
                  selective: tuple[str, ...]) -> dict[str, Any]:
    row = {"loss": ra["loss"], "detector": ra["detector"], "columns": cells,
           "seeds": {"a": ra["seeds"], "b": rb["seeds"]}}
    sa = (ra.get("selective") or {}).get("in_distribution", {})
    sb = (rb.get("selective") or {}).get("in_distribution", {})
    sel = {k: _delta(sa[k], sb[k]) for k in selective if k in sa and k in sb}
    if sel:
        row["selective"] = sel
    return row


def _compared_classification(ga: dict[str, Any], gb: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for loss, ca in ga["classification"].items():
        cb = gb["classification"].get(loss, {})
        if "uncalibrated" in ca and "uncalibrated" in cb:
            out[loss] = {k: _delta(ca["uncalibrated"][k], cb["uncalibrated"][k])
                         for k in CLASSIFICATION_METRICS
                         if k in ca["uncalibrated"] and k in cb["uncalibrated"]}
    return out


def _compared_group(a: Report, b: Report, ga: dict[str, Any], gb: dict[str, Any],
                    test: tuple[int, int], scores: _Scores, warnings: list[str],
                    labels: dict[str, str]) -> dict[str, Any]:
    """One group of a comparison: per shared row and column, A, B and B − A; with `test` =
    (replicates, seed), replicates > 0, the AUROC cells' paired test. The rows one side lacks
    are named (`unpaired`, and a warning using `labels`: side → its label)."""
    significance, seed = test
    keys = (_group_key(ga), _group_key(gb))
    b_rows = {(r["loss"], r["detector"]): r for r in gb["rows"]}
    cols = [c for c in columns(ga) if c in columns(gb)]
    rows = []
    problems: dict[str, list[str]] = {}
    for ra in ga["rows"]:
        rb = b_rows.get((ra["loss"], ra["detector"]))
        if rb is None:
            continue
        cells: dict[str, dict[str, Any]] = {}
        for col in cols:
            cells[col] = {}
            for k in a.filters.ood_metrics:
                ca, cb = cell_of(ra, col, k), cell_of(rb, col, k)
                if ca and cb:
                    cells[col][k] = {"a": ca["mean"], "b": cb["mean"],
                                     "delta": cb["mean"] - ca["mean"]}
                    if k == "auroc" and significance:
                        cells[col][k].update(_compare_test(
                            a, b, keys, ra, col, _column_sets(ga, col), _column_sets(gb, col),
                            significance, seed, scores, problems))
        rows.append(_compared_row(ra, rb, cells, a.filters.selective_metrics))
    warnings += [f"{_where(ga)}: some seeds not paired for the significance test ({why}): "
                 f"{_few(cells)}" for why, cells in problems.items()]
    benchmark = (ga["benchmark"] if ga["benchmark"] == gb["benchmark"]
                 else f"{ga['benchmark']} → {gb['benchmark']}")
    out = {"benchmark": benchmark, "in_distribution": ga["in_distribution"],
           "model": ga["model"],
           "ood_sets": {o: g for o, g in ga["ood_sets"].items() if o in cols},
           "columns": cols, "seeds": {side: sorted({s for r in rows for s in r["seeds"][side]})
                                      for side in ("a", "b")},
           "classification": _compared_classification(ga, gb), "rows": rows}
    unpaired = _unpaired_rows(ga, gb)
    if unpaired:
        out["unpaired"] = unpaired
        warnings.append(f"{_where(ga)}: rows not compared, the other side has no row of that "
                        f"name: {_unpaired_text(unpaired, labels)}")
    return out


def _unpaired_rows(ga: dict[str, Any], gb: dict[str, Any]) -> dict[str, list[str]]:
    """The rows (`loss detector`) one side has and the other lacks, per side: a row is
    paired by name, variant label included (`msp [calibrated]` pairs only with its like)."""
    names = {side: [f"{r['loss']} {r['detector']}" for r in g["rows"]]
             for side, g in (("a", ga), ("b", gb))}
    out = {side: [n for n in names[side] if n not in names[other]]
           for side, other in (("a", "b"), ("b", "a"))}
    return {side: v for side, v in out.items() if v}


def _unpaired_text(unpaired: dict[str, list[str]], labels: dict[str, str]) -> str:
    return "; ".join(f"only {labels[side]} has {', '.join(names)}"
                     for side, names in unpaired.items())


GroupKey = tuple[str, str, str]


def _group_key(g: dict[str, Any]) -> GroupKey:
    return (g["benchmark"], g["in_distribution"], g["model"])


def matched_groups(groups_a: list[dict[str, Any]], groups_b: list[dict[str, Any]]
                   ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The groups a comparison pairs: same benchmark, data and model; then, among the groups
    left, one per side with the same data and model though the benchmark is named differently
    (an ablation written as its own benchmark file: DisMax with and without the mosaic)."""
    b_by_key = {_group_key(g): g for g in groups_b}
    pairs = [(ga, b_by_key[_group_key(ga)]) for ga in groups_a if _group_key(ga) in b_by_key]
    paired = {id(g) for pair in pairs for g in pair}

    def left(groups: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for g in groups:
            if id(g) not in paired:
                out.setdefault((g["in_distribution"], g["model"]), []).append(g)
        return out

    left_b = left(groups_b)
    for setting, gs in left(groups_a).items():
        if len(gs) == 1 and len(left_b.get(setting, [])) == 1:
            pairs.append((gs[0], left_b[setting][0]))
    return pairs


def compare(a: Report, b: Report, label_a: str, label_b: str, significance: int = 0,
            seed: int = 0) -> dict[str, Any]:
    """Cell-by-cell B − A over the groups (`matched_groups`), rows and columns both reports
    have. `significance` > 0: each AUROC Δ gets a paired bootstrap (seed by seed, on the same
    test samples; see `paired_difference`) and says whether it is significant."""
    warnings = [*a.warnings, *b.warnings]
    scores = _Scores()
    labels = {"a": label_a, "b": label_b}
    matched = matched_groups(a.groups, b.groups)
    groups = [_compared_group(a, b, ga, gb, (significance, seed), scores, warnings, labels)
              for ga, gb in matched]
    for side, rep in (("a", a), ("b", b)):
        paired = {id(pair[side == "b"]) for pair in matched}
        warnings += [f"{_where(g)}: not compared, only {labels[side]} has this group"
                     for g in rep.groups if id(g) not in paired]
    if not any(g["rows"] for g in groups):
        raise _nothing_shared(a, b, label_a, label_b)
    return {"schema": COMPARISON_SCHEMA, "units": UNITS, "delta": "b − a",
            "a": {"label": label_a, "manifest": a.manifest},
            "b": {"label": label_b, "manifest": b.manifest},
            "filters": a.filters.to_dict(),
            "significance": significance_info(significance, seed) if significance else None,
            "warnings": list(dict.fromkeys(warnings)), "groups": groups}


def _nothing_shared(a: Report, b: Report, label_a: str, label_b: str) -> OodbenchError:
    """Say what each side holds: two runs of one benchmark with different losses share no row,
    and "compare runs of the same benchmark" would send the user back to what they did."""
    def holds(rep: Report) -> str:
        return "; ".join(f"{g['benchmark']} · {g['model']}: "
                         + ", ".join(sorted({r['loss'] for r in g['rows']}) or ["no rows"])
                         for g in rep.groups) or "nothing"
    return OodbenchError(
        f"{label_a} and {label_b} share no row (benchmark, model, loss and detector): "
        f"{label_a} holds {holds(a)}; {label_b} holds {holds(b)}",
        "--compare pairs the same loss and detector before and after a change (e.g. "
        "--compare runs-old runs-new); to set two losses side by side, report both: "
        f"`oodbench report {label_a} {label_b}`")


def _delta(ca: dict[str, Any], cb: dict[str, Any]) -> dict[str, float]:
    return {"a": ca["mean"], "b": cb["mean"], "delta": cb["mean"] - ca["mean"]}


def _compare_test(a: Report, b: Report, keys: tuple[GroupKey, GroupKey], row: dict[str, Any],
                  col: str, sets_a: list[str], sets_b: list[str], n_boot: int, seed: int,
                  scores: _Scores, problems: dict[str, list[str]]) -> dict[str, Any]:
    """The paired test of one AUROC cell of a comparison: A's and B's runs of each seed.
    Why seeds could not be paired goes to `problems` (reason → the cells)."""
    if sets_a != sets_b:
        res: dict[str, Any] = {"seeds": [], "skipped": "the mean is over other OOD sets in A "
                                                       "and B"}
        why = [res["skipped"]]
    else:
        det_a, runs_a = a.row_runs[(*keys[0], row["loss"], row["detector"])]
        det_b, runs_b = b.row_runs[(*keys[1], row["loss"], row["detector"])]
        pairs = _seed_pairs(runs_a, runs_b, det_a, det_b, sets_a)
        res, why = _paired(pairs, det_a, det_b, sets_a, n_boot, seed, scores)
    for w in why:
        problems.setdefault(w, []).append(f"{row['loss']} + {row['detector']} ({col})")
    return res
