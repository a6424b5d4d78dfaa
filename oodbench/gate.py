"""CI gates on a report: `--fail-under auroc=0.90`, `--fail-over fpr_at_tpr95:gaussian=0.3`.

A gate is `METRIC[:QUALIFIER...]=THRESHOLD`. It checks the mean over seeds of every cell it
selects; qualifiers narrow the selection and each must name something in the report: an OOD
set, a mean column (`near`, `far`, `mean`), a detector, a loss, a benchmark, an in-distribution
set or a model. Without an OOD-set or mean qualifier an OOD metric checks every OOD-set cell (the
means lie between them, so they add nothing). `accuracy`, `ece` and `nll` check each loss's
uncalibrated test values (`calibrated` as a qualifier checks the calibrated ones); `cost` checks
each detector's inference cost. A gate that selects no cell is an error, never a silent pass.

Selective-classification metrics (`misclassification_auroc`, `aurc`, `e_aurc`, `augrc`,
`risk_at_80`, `risk_at_95`) check each detector row's cell on the in-distribution test set by
default (qualifier `in_dist` names it explicitly). The "with OOD" cells (accepted OOD samples
count as errors) are checked only when named: `with_ood` selects every OOD set's cell, an OOD set
name that set's cell, and `mean` / `near` / `far` the with-OOD means. The MSP baseline of each
loss (`classification.selective_msp`) is checked only with the qualifier `baseline` (at T = 1;
`baseline:calibrated` at the fitted temperature): `--fail-under misclassification_auroc:msp=0.8`
checks the in-distribution cell of every `msp` detector row, `--fail-over aurc:baseline=0.05`
the uncalibrated MSP baseline of every loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from oodbench.errors import OodbenchError
from oodbench.metrics import CLASSIFICATION_METRICS, OOD_METRICS, SELECTIVE_METRICS

GATE_METRICS = (*OOD_METRICS, *SELECTIVE_METRICS, *CLASSIFICATION_METRICS, "cost")
MEAN_NAMES = {"mean": "all", "near": "near", "far": "far"}
IN_DIST, WITH_OOD, BASELINE = "in_dist", "with_ood", "baseline"


@dataclass(frozen=True)
class Gate:
    metric: str
    qualifiers: tuple[str, ...]
    threshold: float
    under: bool  # True: fail when value < threshold; False: fail when value > threshold

    @property
    def text(self) -> str:
        name = ":".join((self.metric, *self.qualifiers))
        return f"{name} {'>=' if self.under else '<='} {self.threshold:g}"


@dataclass(frozen=True)
class Cell:
    labels: dict[str, str]  # benchmark, in_distribution, model, loss, detector?, column?
    value: float

    @property
    def where(self) -> str:
        return " · ".join(v for k, v in self.labels.items() if v and not k.endswith("_name"))


def parse_gate(spec: str, under: bool) -> Gate:
    option = "--fail-under" if under else "--fail-over"
    name, sep, value = spec.rpartition("=")
    if not sep or not name:
        raise OodbenchError(f"{option} {spec!r} is not METRIC[:QUALIFIER]=VALUE",
                            f"e.g. {option} auroc=0.90 or {option} auroc:gaussian=0.95")
    try:
        threshold = float(value)
    except ValueError:
        raise OodbenchError(f"{option} {spec!r}: {value!r} is not a number",
                            "give the threshold as a fraction, e.g. 0.90 for 90 %") from None
    metric, *qualifiers = name.split(":")
    if metric not in GATE_METRICS:
        raise OodbenchError(f"{option} {spec!r}: unknown metric {metric!r}",
                            f"use one of: {', '.join(GATE_METRICS)}")
    if metric not in ("cost", "nll", "e_aurc") and not 0.0 <= threshold <= 1.0:
        raise OodbenchError(f"{option} {spec!r}: {metric} is a fraction in [0, 1]",
                            f"write {threshold / 100:g} for {threshold:g} %")
    return Gate(metric, tuple(q for q in qualifiers if q), threshold, under)


def _base(label: str) -> str:
    """"msp [train.epochs=2]" → "msp": a gate on a name covers every variant of it."""
    return label.split(" [", 1)[0]


def cells(report: dict[str, Any], metric: str) -> Iterator[Cell]:
    """Every cell of `metric` in the report, with the labels a qualifier can match."""
    for g in report["groups"]:
        base = {"benchmark": g["benchmark"], "in_distribution": g["in_distribution"],
                "model": g["model"]}
        if metric in SELECTIVE_METRICS:
            yield from _selective_cells(g, base, metric)
            continue
        if metric in CLASSIFICATION_METRICS:
            for loss, c in g["classification"].items():
                for state in ("uncalibrated", "calibrated"):
                    if metric in c.get(state, {}):
                        yield Cell({**base, "loss": loss, "loss_name": _base(loss),
                                    "state": state}, c[state][metric]["mean"])
            continue
        for r in g["rows"]:
            row = {**base, "loss": r["loss"], "detector": r["detector"],
                   "detector_name": _base(r["detector"])}
            if metric == "cost":
                if "cost" in r:
                    yield Cell(row, r["cost"]["mean"])
                continue
            for ood, ms in r["ood"].items():
                if metric in ms:
                    yield Cell({**row, "column": ood}, ms[metric]["mean"])
            # Sets with NaN/inf scores have no metric: a NaN cell, which fails every gate that
            # selects it (a broken detector must not pass CI by having no number).
            bad = r.get("nonfinite", {})
            blocked = list(g["ood_sets"]) if set(bad) - set(g["ood_sets"]) else list(bad)
            for ood in blocked:
                if ood not in r["ood"]:
                    yield Cell({**row, "column": ood}, float("nan"))
            for name, col in MEAN_NAMES.items():
                if metric in r["means"].get(col, {}):
                    yield Cell({**row, "column": name}, r["means"][col][metric]["mean"])


def _selective_cells(g: dict[str, Any], base: dict[str, str], metric: str) -> Iterator[Cell]:
    for loss, c in g["classification"].items():
        for state, ms in c.get("selective_msp", {}).items():
            if metric in ms:
                yield Cell({**base, "loss": loss, "loss_name": _base(loss), "detector": BASELINE,
                            "state": state, "view": IN_DIST}, ms[metric]["mean"])
    for r in g["rows"]:
        row = {**base, "loss": r["loss"], "detector": r["detector"],
               "detector_name": _base(r["detector"])}
        sel = r.get("selective", {})
        if metric in sel.get("in_distribution", {}):
            yield Cell({**row, "view": IN_DIST}, sel["in_distribution"][metric]["mean"])
        elif set(r.get("nonfinite", {})) - set(g["ood_sets"]):
            yield Cell({**row, "view": IN_DIST}, float("nan"))  # NaN test scores: no metric
        for ood, ms in sel.get("with_ood", {}).items():
            if metric in ms:
                yield Cell({**row, "view": WITH_OOD, "column": ood}, ms[metric]["mean"])
        for name, col in MEAN_NAMES.items():
            if metric in sel.get("with_ood_means", {}).get(col, {}):
                yield Cell({**row, "view": WITH_OOD, "column": name},
                           sel["with_ood_means"][col][metric]["mean"])


def _selected(gate: Gate, cell: Cell) -> bool:
    labels = set(cell.labels.values())
    if not all(q in labels for q in gate.qualifiers):
        return False
    if cell.labels.get("detector") == BASELINE and "view" in cell.labels \
            and BASELINE not in gate.qualifiers:
        return False  # the MSP baseline only when named
    if cell.labels.get("view") == WITH_OOD and WITH_OOD not in gate.qualifiers \
            and cell.labels.get("column") not in gate.qualifiers:
        return False  # with-OOD cells only when `with_ood` or their column is named
    if cell.labels.get("state") == "calibrated" and "calibrated" not in gate.qualifiers:
        return False
    column = cell.labels.get("column")
    return column not in MEAN_NAMES or column in gate.qualifiers  # means only when named


def evaluate(report: dict[str, Any], gates: list[Gate]) -> list[tuple[Gate, Cell]]:
    """The failed (gate, cell) pairs; raises when a gate selects nothing."""
    failed = []
    for gate in gates:
        all_cells = list(cells(report, gate.metric))
        known = {v for c in all_cells for v in c.labels.values()} | set(MEAN_NAMES)
        if gate.metric in SELECTIVE_METRICS:
            known |= {IN_DIST, WITH_OOD, BASELINE, "calibrated"}
        unknown = [q for q in gate.qualifiers if q not in known]
        if unknown:
            raise OodbenchError(f"gate {gate.text}: {unknown} names nothing in the report",
                                f"qualifiers can be: {', '.join(sorted(known))}")
        chosen = [c for c in all_cells if _selected(gate, c)]
        if not chosen:
            raise OodbenchError(f"gate {gate.text} selects no cell of the report",
                                "check its qualifiers against the report's filters")
        for c in chosen:
            if c.value != c.value or ((c.value < gate.threshold) if gate.under
                                      else (c.value > gate.threshold)):
                failed.append((gate, c))
    return failed
