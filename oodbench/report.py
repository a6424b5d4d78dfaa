"""Collect the metrics.json of many runs and turn them into the comparison table.

Runs are grouped by (benchmark, in-distribution set, model); within a group a row is one
loss + detector, a column one OOD set (near sets first, then far) plus their mean. A cell is the
mean ± std over seeds (std with ddof=1; 0 for one seed). The "mean" column averages the OOD sets
within each seed first, then over seeds. All values are fractions in [0, 1]; the Markdown and
the terminal table show percentages.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oodbench.errors import OodbenchError
from oodbench.io import read_json
from oodbench.metrics import HIGHER_IS_BETTER, OOD_METRICS

SCHEMA = "oodbench.report/1"


def find_metrics(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == "metrics.json":
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("metrics.json")))
        else:
            raise OodbenchError(f"{p} does not exist", "give a run folder or a folder of runs")
    if not found:
        raise OodbenchError(f"no metrics.json under {', '.join(map(str, paths))}",
                            "score the runs first: `oodbench score RUN`")
    return found


def _cell(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "n": len(a)}


@dataclass
class Report:
    groups: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "units": "fractions in [0, 1]; cost in forward passes",
                "groups": self.groups}


def build_report(metric_files: list[Path]) -> Report:
    by_group: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for f in metric_files:
        m = read_json(f)
        by_group[(m["benchmark"], m["in_distribution"], m["model"])].append(m)
    groups = []
    for (bench, ind, model), runs in sorted(by_group.items()):
        ood_sets: dict[str, str] = {}
        for r in runs:
            ood_sets.update(r["ood_sets"])
        order = sorted(ood_sets, key=lambda n: (ood_sets[n] != "near", list(ood_sets).index(n)))
        rows, accuracy = [], {}
        by_loss: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in runs:
            by_loss[r["loss"]].append(r)
        for loss, lruns in sorted(by_loss.items()):
            accuracy[loss] = {k: _cell([r["classification"]["uncalibrated"][k] for r in lruns])
                              for k in ("accuracy", "ece", "nll")}
            detectors = sorted({d for r in lruns for d in r["detectors"]})
            for det in detectors:
                druns = [r for r in lruns if det in r["detectors"]]
                cells: dict[str, dict[str, Any]] = {}
                for ood in order:
                    vals = [r["detectors"][det]["ood"][ood] for r in druns
                            if ood in r["detectors"][det]["ood"]]
                    if vals:
                        cells[ood] = {k: _cell([v[k] for v in vals]) for k in OOD_METRICS}
                present = [o for o in order if o in cells]
                mean = {k: _cell([np.mean([r["detectors"][det]["ood"][o][k] for o in present])
                                  for r in druns]) for k in OOD_METRICS}
                rows.append({"loss": loss, "detector": det,
                             "seeds": sorted(r["seed"] for r in druns),
                             "cost": _cell([r["detectors"][det]["cost"] for r in druns]),
                             "ood": cells, "mean": mean})
        groups.append({"benchmark": bench, "in_distribution": ind, "model": model,
                       "ood_sets": {o: ood_sets[o] for o in order},
                       "classification": accuracy, "rows": rows})
    return Report(groups)


def fmt(cell: dict[str, float] | None, percent: bool = True) -> str:
    if cell is None:
        return "–"
    scale = 100.0 if percent else 1.0
    s = f"{cell['mean'] * scale:.1f}"
    return s + (f" ± {cell['std'] * scale:.1f}" if cell["n"] > 1 else "")


def best_rows(group: dict[str, Any], metric: str) -> dict[str, float]:
    """Best mean value per column (OOD set or 'mean'), for highlighting."""
    pick = max if HIGHER_IS_BETTER[metric] else min
    best: dict[str, float] = {}
    for col in [*group["ood_sets"], "mean"]:
        vals = [(r["mean"] if col == "mean" else r["ood"].get(col, {})).get(metric)
                for r in group["rows"]]
        vals = [v["mean"] for v in vals if v]
        if vals:
            best[col] = pick(vals)
    return best


def to_markdown(report: Report, metrics: tuple[str, ...] = ("auroc", "fpr_at_tpr95")) -> str:
    out = ["# oodbench report", "",
           "Values in %; mean ± std over seeds; best per column in **bold**; "
           "in-distribution is the positive class.", ""]
    for g in report.groups:
        out += [f"## {g['benchmark']}: {g['in_distribution']} · {g['model']}", ""]
        out += ["| loss | accuracy | ECE | NLL |", "|---|---|---|---|"]
        for loss, c in g["classification"].items():
            out.append(f"| {loss} | {fmt(c['accuracy'])} | {fmt(c['ece'])} | "
                       f"{fmt(c['nll'], percent=False)} |")
        out.append("")
        cols = list(g["ood_sets"])
        for metric in metrics:
            best = best_rows(g, metric)
            head = [f"{c} ({g['ood_sets'][c]})" for c in cols] + ["mean"]
            out += [f"### {metric}", "", "| loss | detector | " + " | ".join(head) + " |",
                    "|---|---|" + "---|" * len(head)]
            for r in g["rows"]:
                vals = []
                for c in [*cols, "mean"]:
                    cell = r["mean"] if c == "mean" else r["ood"].get(c, {}).get(metric)
                    cell = cell[metric] if c == "mean" else cell
                    s = fmt(cell)
                    if cell and np.isclose(cell["mean"], best.get(c, np.nan)):
                        s = f"**{s}**"
                    vals.append(s)
                out.append(f"| {r['loss']} | {r['detector']} | " + " | ".join(vals) + " |")
            out.append("")
    return "\n".join(out)
