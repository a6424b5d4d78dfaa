"""Render a report (the dict of `Report.to_dict` or `report.compare`) as tables, Markdown, CSV.

Tables are first built as plain `TableModel`s (strings + which cells to emphasise), so the
terminal (rich) and the Markdown outputs show exactly the same numbers. Tables show percentages
with one decimal; CSV and JSON keep fractions, with a unit column.

What `oodbench report --format NAME` prints is the function registered in `OUTPUT_FORMATS` as
NAME: adding a format is one decorated function here.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from oodbench.errors import OodbenchError
from oodbench.metrics import HIGHER_IS_BETTER, OOD_METRICS, SELECTIVE_METRICS
from oodbench.registry import Registry
from oodbench.report import best_values, cell_of, columns, is_tied

if TYPE_CHECKING:
    from rich.console import Console

NAMES = {"tnr_at_tpr95": "TNR@95", "fpr_at_tpr95": "FPR@95", "auroc": "AUROC", "dtacc": "DTACC",
         "aupr_in": "AUPR-in", "aupr_out": "AUPR-out", "misclassification_auroc": "misclass. AUROC",
         "aurc": "AURC", "e_aurc": "E-AURC", "augrc": "AUGRC", "risk_at_80": "risk@80",
         "risk_at_95": "risk@95"}
DEFAULT_TABLE_METRICS = ("auroc", "fpr_at_tpr95")
PAPER_METRICS = ("tnr_at_tpr95", "auroc", "dtacc")
PAPER_PAIRS = (("softmax", "msp"), ("softmax", "entropy"), ("dismax", "mmles"))
MEAN_LABELS = {"near": "near mean", "far": "far mean", "all": "mean"}
TIE_MARK = "†"


@dataclass
class TableModel:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    emphasis: list[list[bool]] = field(default_factory=list)
    caption: str = ""
    right_from: int = 1  # columns from this index are numbers (right-aligned)

    def add(self, cells: list[str], emphasis: list[bool] | None = None) -> None:
        self.rows.append(cells)
        self.emphasis.append(emphasis or [False] * len(cells))


def fmt(cell: dict[str, Any] | None, percent: bool = True, digits: int = 1) -> str:
    if not cell:
        return "–"
    scale = 100.0 if percent else 1.0
    s = f"{cell['mean'] * scale:.{digits}f}"
    if cell.get("n", 1) > 1:
        s += f" ± {cell['std'] * scale:.{digits}f}"
    if "ci95" in cell:
        lo, hi = cell["ci95"]
        s += f" [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"
    return s


def _col_label(group: dict[str, Any], col: str) -> str:
    return MEAN_LABELS.get(col) or f"{col} ({group['ood_sets'][col]})"


def _group_title(g: dict[str, Any]) -> str:
    return f"{g['benchmark']} · {g['in_distribution']} · {g['model']}"


def _severities(names: list[str], shifts: dict[str, Any]) -> list[int]:
    return sorted({shifts[n]["severity"] for n in names})


def shift_tables(g: dict[str, Any]) -> list[TableModel]:
    """Covariate shift (`shift:`): accuracy per loss × corruption across severities, then per
    loss + detector the AUROC with the shifted sets as OOD and the full-spectrum AUROC
    (shifted sets counted as in-distribution), each averaged over the corruptions."""
    shifts = {n: v for c in g["classification"].values() for n, v in c.get("shift", {}).items()}
    if not shifts:
        return []
    sevs = _severities(list(shifts), shifts)
    acc = TableModel(f"{_group_title(g)} · covariate shift: accuracy (%) by severity",
                     ["loss", "corruption", *[f"severity {s}" for s in sevs]], right_from=2)
    for loss, c in g["classification"].items():
        sh = c.get("shift", {})
        for corr in sorted({v["corruption"] for v in sh.values()}):
            by_sev = {v["severity"]: v for v in sh.values() if v["corruption"] == corr}
            acc.add([loss, corr, *[fmt(by_sev.get(s, {}).get("accuracy")) for s in sevs]])
    out = [acc]
    for key, title in (("as_ood_auroc", "AUROC, shifted test set as OOD"),
                       ("full_spectrum_auroc", "full-spectrum AUROC (shifted = in-dist) vs "
                                                "the OOD sets")):
        t = TableModel(f"{_group_title(g)} · {title}, mean over corruptions (%)",
                       ["loss", "detector", *[f"severity {s}" for s in sevs]], right_from=2)
        for r in g["rows"]:
            if not r.get("shift"):
                continue
            cells = []
            for sev in sevs:
                vals = [v[key]["mean"] for n, v in r["shift"].items()
                        if key in v and shifts.get(n, {}).get("severity") == sev]
                cells.append(f"{100 * sum(vals) / len(vals):.1f}" if vals else "–")
            t.add([r["loss"], r["detector"], *cells])
        out.append(t)
    return out


def classification_table(g: dict[str, Any]) -> TableModel:
    t = TableModel(f"{_group_title(g)} · classification (%; NLL in nats; T = temperature)",
                   ["loss", "accuracy", "ECE", "NLL", "ECE calibrated", "NLL calibrated", "T"],
                   caption=f"mean ± std over {_seeds_caption(g, rows=False)}"
                           + _fewer_classification_seeds(g))
    for loss, c in g["classification"].items():
        unc, cal = c.get("uncalibrated", {}), c.get("calibrated", {})
        t.add([loss, fmt(unc.get("accuracy")), fmt(unc.get("ece")),
               fmt(unc.get("nll"), percent=False, digits=3), fmt(cal.get("ece")),
               fmt(cal.get("nll"), percent=False, digits=3),
               fmt(c.get("temperature"), percent=False, digits=2)])
    return t


# the classification table's columns (but T) → where report.json keeps each one's seed count
_CLASSIFICATION_CELLS = {"accuracy": ("uncalibrated", "accuracy"),
                         "ECE": ("uncalibrated", "ece"), "NLL": ("uncalibrated", "nll"),
                         "ECE calibrated": ("calibrated", "ece"),
                         "NLL calibrated": ("calibrated", "nll")}


def _fewer_classification_seeds(g: dict[str, Any]) -> str:
    """The classification columns a loss has over fewer seeds than the loss has (the calibrated
    ones when only some seeds were scored with a calibration): the caption's seed count would
    be false for them."""
    notes = []
    for loss, c in g["classification"].items():
        n = len(c.get("seeds", g["seeds"]))
        counts = {name: c.get(state, {}).get(k, {}).get("n", n) for name, (state, k)
                  in _CLASSIFICATION_CELLS.items()}
        counts["T"] = c.get("temperature", {}).get("n", n)
        by_count: dict[int, list[str]] = {}
        for name, m in counts.items():
            if m < n:
                by_count.setdefault(m, []).append(name)
        notes += [f"{loss}: {', '.join(names)} over {m} of its {n} seeds"
                  for m, names in sorted(by_count.items())]
    return "".join(f"; {note}" for note in notes)


def _seeds_text(seeds: list[int]) -> str:
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} {seeds}"


def _seeds_caption(g: dict[str, Any], rows: bool = True) -> str:
    """The group's seeds, the losses that have fewer and, with `rows`, the rows that have fewer
    than their loss: a caption saying "3 seeds" under a loss with 2 would be false for it, and
    "2 seeds" false for every row when seed 0 is one loss's and seed 1 another's."""
    fewer: dict[tuple[int, ...], list[str]] = {}
    for loss, c in g["classification"].items():
        if c.get("seeds", g["seeds"]) != g["seeds"]:
            fewer.setdefault(tuple(c["seeds"]), []).append(loss)
    if g["classification"] and all(
            c.get("seeds", g["seeds"]) != g["seeds"] for c in g["classification"].values()):
        text = "the seeds each loss has"  # no loss has the union: "2 seeds" would fit no row
    else:
        text = _seeds_text(g["seeds"])
    for r in g["rows"] if rows else []:
        of_loss = g["classification"].get(r["loss"], {}).get("seeds", g["seeds"])
        if r.get("seeds", of_loss) != of_loss and not r.get("not_applicable"):
            fewer.setdefault(tuple(r["seeds"]), []).append(f"{r['loss']} {r['detector']}")
    if not fewer:
        return text
    return text + " (" + "; ".join(f"{', '.join(names)}: {_seeds_text(list(s))}"
                                   for s, names in fewer.items()) + ")"


def _tie_caption(rep: dict[str, Any]) -> str:
    sig = rep.get("significance")
    if not sig:
        return ""
    return (f"; {TIE_MARK} statistically tied with the best ({sig['test']}, "
            f"{sig['replicates']} replicates, {sig['level'] * 100:g} % interval of the difference "
            "includes 0)")


def _na_caption(g: dict[str, Any]) -> str:
    """The detectors that refused a loss's head, named once under the table (each reason is a
    sentence, in report.json; as a table row it filled a column with empty cells)."""
    refused: dict[str, list[str]] = {}
    for r in g["rows"]:
        if r.get("not_applicable"):
            refused.setdefault(r["loss"], []).append(r["detector"])
    if not refused:
        return ""
    return ("; n/a (the detector refuses this loss's head; each reason in report.json): "
            + "; ".join(f"{loss}: {', '.join(dets)}" for loss, dets in refused.items()))


def report_tables(rep: dict[str, Any], metrics: tuple[str, ...],
                  selective: tuple[str, ...] = ()) -> list[TableModel]:
    """Per group: the classification table, then one table per OOD metric of `metrics` (rows =
    loss + detector, columns = OOD sets near first, the near / far / all means, and the cost),
    then the selective-classification tables of the metrics in `selective` (or in `metrics`)."""
    tables = []
    ood = [m for m in metrics if m in OOD_METRICS]
    sel = tuple(dict.fromkeys([*selective, *[m for m in metrics if m in SELECTIVE_METRICS]]))
    for g in rep["groups"]:
        tables.append(classification_table(g))
        tables.extend(shift_tables(g))
        cols = columns(g)
        for m in ood:
            best = best_values(g, m)
            arrow = "↑" if HIGHER_IS_BETTER[m] else "↓"
            ties = m == "auroc" and "ties" in g
            t = TableModel(f"{_group_title(g)} · {NAMES[m]} {arrow} (%)",
                           ["loss", "detector", *[_col_label(g, c) for c in cols], "cost ×"],
                           caption=f"mean ± std over {_seeds_caption(g)}; best per column "
                                   "emphasised"
                                   + (_tie_caption(rep) if ties else "") + _na_caption(g),
                           right_from=2)
            for r in g["rows"]:
                if r.get("not_applicable"):  # named in the caption, not a row of empty cells
                    continue
                cells = [cell_of(r, c, m) for c in cols]
                t.add([r["loss"], r["detector"],
                       *[(fmt(c) + (f" {TIE_MARK}" if ties and is_tied(g, r, col) else ""))
                         if c or col not in r.get("nonfinite", {}) else
                         f"NaN×{r['nonfinite'][col]}" for c, col in zip(cells, cols, strict=True)],
                       fmt(r.get("cost"), percent=False, digits=2)],
                      [False, False, *[bool(c) and abs(c["mean"] - best.get(col, float("nan")))
                                       < 1e-12 for c, col in zip(cells, cols, strict=True)],
                       False])
            tables.append(t)
        if sel:
            tables += selective_tables(g, sel)
    return tables


def _emphasise_best(t: TableModel, values: list[list[dict[str, Any] | None]],
                    metrics: tuple[str, ...], first: int) -> None:
    """Emphasise the best mean per metric column (columns from index `first`)."""
    for j, m in enumerate(metrics):
        means = [row[j]["mean"] for row in values if row[j]]
        if not means:
            continue
        best = (max if HIGHER_IS_BETTER[m] else min)(means)
        for i, row in enumerate(values):
            t.emphasis[i][first + j] = bool(row[j]) and abs(row[j]["mean"] - best) < 1e-12


def selective_tables(g: dict[str, Any], metrics: tuple[str, ...]) -> list[TableModel]:
    """The detectors' scores judged as confidences (selective classification): on the
    in-distribution test set, with each loss's MSP baseline at T = 1 and at the fitted
    temperature; then with the OOD sets mixed in (accepted OOD samples count as errors), as the
    mean over the OOD sets (per set in report.json / .csv). Tables appear only when the runs
    have these metrics (runs scored before they existed have none)."""
    heads = ["loss", "detector", *[f"{NAMES[m]} {'↑' if HIGHER_IS_BETTER[m] else '↓'}"
                                   for m in metrics]]
    seeds = _seeds_caption(g)
    out = []
    t = TableModel(f"{_group_title(g)} · selective classification, in-distribution test set (%)",
                   heads, caption=f"mean ± std over {seeds}; misclassification AUROC: correct vs "
                                  "wrong predictions; AURC / AUGRC: area under the (generalized) "
                                  "risk–coverage curve; risk@c: selective risk at coverage c; "
                                  "best per column emphasised", right_from=2)
    values: list[list[dict[str, Any] | None]] = []
    for loss, c in g["classification"].items():
        for state, label in (("uncalibrated", "MSP baseline (T = 1)"),
                             ("calibrated", "MSP baseline (calibrated T)")):
            ms = c.get("selective_msp", {}).get(state)
            if ms:
                # the calibrated baseline exists only for the seeds scored with a calibration
                n, have = len(c.get("seeds", g["seeds"])), max(v["n"] for v in ms.values())
                label = label if have >= n else f"{label[:-1]}; {have} of {n} seeds)"
                values.append([ms.get(m) for m in metrics])
                t.add([loss, label, *[fmt(v) for v in values[-1]]])
    _add_selective_rows(t, values, g["rows"], metrics,
                        lambda r: r.get("selective", {}).get("in_distribution"))
    if t.rows:
        _emphasise_best(t, values, metrics, 2)
        out.append(t)
    n_sets = len(g["ood_sets"])
    t = TableModel(f"{_group_title(g)} · selective classification with OOD inputs (%)", heads,
                   caption=f"mean ± std over {seeds} of the mean over the {n_sets} OOD set"
                           f"{'s' if n_sets != 1 else ''}: each set mixed into the test stream, "
                           "every accepted OOD sample counted as an error; per set in "
                           "report.json / .csv; best per column emphasised", right_from=2)
    values = []
    _add_selective_rows(t, values, g["rows"], metrics,
                        lambda r: r.get("selective", {}).get("with_ood_means", {}).get("all"))
    if t.rows:
        _emphasise_best(t, values, metrics, 2)
        out.append(t)
    return out


def _add_selective_rows(t: TableModel, values: list[list[Any]], rows: list[dict[str, Any]],
                        metrics: tuple[str, ...], pick: Any) -> None:
    """One table row per report row that has the picked selective cells."""
    for r in rows:
        ms = pick(r)
        if ms:
            values.append([ms.get(m) for m in metrics])
            t.add([r["loss"], r["detector"], *[fmt(v) for v in values[-1]]])


def paper_tables(rep: dict[str, Any], metrics: tuple[str, ...] = PAPER_METRICS,
                 pairs: tuple[tuple[str, str], ...] = PAPER_PAIRS) -> list[TableModel]:
    """The layout of the IsoMax / DisMax tables: rows = OOD sets (and means), for each metric
    the loss + detector pairs side by side; the best pair per metric and row emphasised."""
    tables = []
    for g in rep["groups"]:
        rows = {(r["loss"], r["detector"]): r for r in g["rows"]}
        have = [p for p in pairs if p in rows]
        if not have:
            continue
        t = TableModel(f"{_group_title(g)} (%)",
                       ["OOD set", *[f"{NAMES[m]} {lo}+{d}" for m in metrics for lo, d in have]],
                       caption=" / ".join(f"{lo}+{d}" for lo, d in have)
                       + "; best per metric emphasised")
        for col in columns(g):
            cells, emph = [], []
            for m in metrics:
                vals = [cell_of(rows[p], col, m) for p in have]
                means = [v["mean"] for v in vals if v]
                best = (max if HIGHER_IS_BETTER[m] else min)(means) if means else None
                cells += [fmt(v) for v in vals]
                emph += [bool(v) and v["mean"] == best for v in vals]
            t.add([_col_label(g, col), *cells], [False, *emph])
        tables.append(t)
    if not tables:
        losses = sorted({r["loss"] for g in rep["groups"] for r in g["rows"]})
        raise OodbenchError("--style paper found none of its loss + detector pairs "
                            f"({', '.join(f'{lo}:{d}' for lo, d in pairs)})",
                            "name the pairs to show with --pair LOSS:DETECTOR; the losses here: "
                            + ", ".join(repr(lo) if " " in lo else lo for lo in losses))
    return tables


SIGNIFICANT_MARK = "sig."


def _delta_text(v: dict[str, Any]) -> str:
    """'a → b (Δ)' in points; a Δ that one decimal would show as ±0.0 gets two significant
    digits, so a tiny but significant difference does not read as none."""
    d = v["delta"] * 100
    delta = (f"{d:+.1f}" if d == 0 or abs(d) >= 0.05 else f"{d:+.2g}" if abs(d) >= 0.001
             else f"{'-' if d < 0 else '+'}<0.001")
    text = f"{v['a'] * 100:.1f} → {v['b'] * 100:.1f} ({delta})"
    if "significant" in v:
        text += f" {SIGNIFICANT_MARK}" if v["significant"] else " n.s."
    return text


def _compared_seeds(g: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Per side, the seeds of the rows shown: one count when every row has the same seeds,
    else each seed set with the losses (or, where a loss's rows differ, rows) that have it."""
    if not rows or not all("seeds" in r for r in rows):  # older comparison.json: the group's
        seeds = g.get("seeds")
        return f"A: {_seeds_text(seeds['a'])}, B: {_seeds_text(seeds['b'])}" if seeds else ""
    parts, several = [], False
    for side in ("a", "b"):
        by_loss: dict[str, set[tuple[int, ...]]] = {}
        for r in rows:
            by_loss.setdefault(r["loss"], set()).add(tuple(r["seeds"][side]))
        names: dict[tuple[int, ...], list[str]] = {}
        for r in rows:
            name = r["loss"] if len(by_loss[r["loss"]]) == 1 else f"{r['loss']} {r['detector']}"
            if name not in names.setdefault(tuple(r["seeds"][side]), []):
                names[tuple(r["seeds"][side])].append(name)
        text = ", ".join(_seeds_text(list(k)) + (f" ({', '.join(v)})" if len(names) > 1 else "")
                         for k, v in names.items())
        parts.append(f"{side.upper()}: {text}")
        several = several or len(names) > 1
    return ("; " if several else ", ").join(parts)


def _unpaired_caption(cmp: dict[str, Any], g: dict[str, Any]) -> str:
    """The rows left out because the other side has no row of that name."""
    unpaired = g.get("unpaired") or {}
    if not unpaired:
        return ""
    return "; not compared (no row of that name on the other side): " + "; ".join(
        f"only {cmp[side]['label']} has {', '.join(names)}" for side, names in unpaired.items())


def comparison_tables(cmp: dict[str, Any], metrics: tuple[str, ...],
                      selective: tuple[str, ...] = ()) -> list[TableModel]:
    """Per group and OOD metric: 'a → b (Δ)' in points; improvements emphasised; with
    --significance, AUROC cells say whether Δ is significant (sig.) or not (n.s.). Then the
    selective metrics (of `selective` or `metrics`) on the in-distribution test set."""
    tables = []
    sig = cmp.get("significance")
    sel = tuple(dict.fromkeys([*selective, *[m for m in metrics if m in SELECTIVE_METRICS]]))
    for g in cmp["groups"]:
        cols = g["columns"]
        seed_text = _compared_seeds(g, g["rows"]) + _unpaired_caption(cmp, g)
        for m in metrics:
            if m not in OOD_METRICS:
                continue
            caption = seed_text
            if sig and m == "auroc":
                caption += (f"; {SIGNIFICANT_MARK} significant, n.s. not ({sig['test']}, "
                            f"{sig['replicates']} replicates, {sig['level'] * 100:g} % "
                            "interval of Δ excludes 0)")
            t = TableModel(f"{_group_title(g)} · {NAMES[m]}: {cmp['a']['label']} → "
                           f"{cmp['b']['label']} (%; Δ in points)",
                           ["loss", "detector", *[_col_label(g, c) for c in cols]],
                           caption=caption.lstrip("; "), right_from=2)
            for r in g["rows"]:
                cells, emph = [], []
                for c in cols:
                    v = r["columns"].get(c, {}).get(m)
                    if v is None:
                        cells.append("–")
                        emph.append(False)
                        continue
                    cells.append(_delta_text(v))
                    better = v["delta"] > 0 if HIGHER_IS_BETTER[m] else v["delta"] < 0
                    emph.append(better and abs(v["delta"]) > 1e-12)
                t.add([r["loss"], r["detector"], *cells], [False, False, *emph])
            tables.append(t)
        rows = [r for r in g["rows"] if r.get("selective")]
        if sel and rows:
            t = TableModel(f"{_group_title(g)} · selective classification, in-distribution: "
                           f"{cmp['a']['label']} → {cmp['b']['label']} (%; Δ in points)",
                           ["loss", "detector", *[NAMES[m] for m in sel]],
                           caption=(_compared_seeds(g, rows) + _unpaired_caption(cmp, g))
                           .lstrip("; "), right_from=2)
            for r in rows:
                cells, emph = [], []
                for m in sel:
                    v = r["selective"].get(m)
                    cells.append(_delta_text(v) if v else "–")
                    better = v and (v["delta"] > 0 if HIGHER_IS_BETTER[m] else v["delta"] < 0)
                    emph.append(bool(better) and abs(v["delta"]) > 1e-12)
                t.add([r["loss"], r["detector"], *cells], [False, False, *emph])
            tables.append(t)
    return tables


def to_markdown(tables: list[TableModel], heading: str, warnings: list[str] | None = None
                ) -> str:
    out = [f"# {heading}", "",
           "Values in %; in-distribution is the positive class; emphasised cells in **bold**.",
           ""]
    out += [*(f"> **Warning:** {w}" for w in warnings or ()), *([""] if warnings else [])]
    for t in tables:
        out += [f"### {t.title}", "", "| " + " | ".join(t.headers) + " |",
                "|" + "|".join("---" if i < t.right_from else "---:"
                               for i in range(len(t.headers))) + "|"]
        for cells, emph in zip(t.rows, t.emphasis, strict=True):
            out.append("| " + " | ".join(f"**{c}**" if e else c
                                         for c, e in zip(cells, emph, strict=True)) + " |")
        if t.caption:
            out += ["", f"_{t.caption}_"]
        out.append("")
    return "\n".join(out)


def to_rich(tables: list[TableModel]) -> list[Any]:
    from rich.markup import escape
    from rich.table import Table

    out = []
    for t in tables:
        # titles and captions name rows ("msp [calibrated]") too: text, not rich markup
        table = Table(title=escape(t.title), caption=escape(t.caption) if t.caption else None)
        for i, h in enumerate(t.headers):
            # a narrow terminal wraps a long name ("tinyimagenet-resize") instead of cutting it
            table.add_column(escape(h), justify="right" if i >= t.right_from else "left",
                             overflow="fold")
        for cells, emph in zip(t.rows, t.emphasis, strict=True):
            # names such as "msp [calibrated]" are text, not rich markup
            table.add_row(*[f"[bold green]{escape(c)}[/]" if e else escape(c)
                            for c, e in zip(cells, emph, strict=True)])
        out.append(table)
    return out


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def report_csv(rep: dict[str, Any]) -> str:
    """One line per (group, loss, detector, column, metric): tidy, for pandas / spreadsheets."""
    header = ["benchmark", "in_distribution", "model", "loss", "detector", "column", "group",
              "metric", "mean", "std", "n", "ci95_low", "ci95_high", "unit"]
    rows: list[list[Any]] = []

    def line(g: dict[str, Any], loss: str, det: str, col: str, grp: str, metric: str,
             c: dict[str, Any], unit: str) -> None:
        lo, hi = c.get("ci95", ("", ""))
        rows.append([g["benchmark"], g["in_distribution"], g["model"], loss, det, col, grp,
                     metric, c["mean"], c["std"], c["n"], lo, hi, unit])

    for g in rep["groups"]:
        for loss, cls in g["classification"].items():
            for state in ("uncalibrated", "calibrated"):
                for k, c in cls.get(state, {}).items():
                    line(g, loss, "", state, "", k, c, "nats" if k == "nll" else "fraction")
            if "temperature" in cls:
                line(g, loss, "", "calibrated", "", "temperature", cls["temperature"], "")
            for state, ms in cls.get("selective_msp", {}).items():  # the MSP baseline
                for k, c in ms.items():
                    line(g, loss, "msp baseline", state, "selective", k, c, "fraction")
        for r in g["rows"]:
            if "cost" in r:
                line(g, r["loss"], r["detector"], "", "", "cost", r["cost"], "forward passes")
            for col in columns(g):
                grp = g["ood_sets"].get(col, "mean")
                cells = r["ood"].get(col) or r["means"].get(col) or {}
                for k, c in cells.items():
                    line(g, r["loss"], r["detector"], col, grp, k, c, "fraction")
            sel = r.get("selective", {})
            for k, c in sel.get("in_distribution", {}).items():
                line(g, r["loss"], r["detector"], "in_dist", "selective", k, c, "fraction")
            for col, ms in [*sel.get("with_ood", {}).items(),
                            *sel.get("with_ood_means", {}).items()]:
                grp = g["ood_sets"].get(col, "mean")
                for k, c in ms.items():
                    line(g, r["loss"], r["detector"], col, f"with_ood {grp}", k, c, "fraction")
    return _csv(header, rows)


def comparison_csv(cmp: dict[str, Any]) -> str:
    header = ["benchmark", "in_distribution", "model", "loss", "detector", "column", "metric",
              "a", "b", "delta", "unit", "ci95_low", "ci95_high", "significant"]
    rows: list[list[Any]] = []

    def sig(v: dict[str, Any]) -> list[Any]:
        lo, hi = v.get("ci95", ("", ""))
        return [lo, hi, v.get("significant", "")]

    for g in cmp["groups"]:
        where = [g["benchmark"], g["in_distribution"], g["model"]]
        for loss, ms in g["classification"].items():
            for k, v in ms.items():
                rows.append([*where, loss, "", "", k, v["a"], v["b"], v["delta"],
                             "nats" if k == "nll" else "fraction", "", "", ""])
        for r in g["rows"]:
            for col, ms in r["columns"].items():
                for k, v in ms.items():
                    rows.append([*where, r["loss"], r["detector"], col, k, v["a"], v["b"],
                                 v["delta"], "fraction", *sig(v)])
            for k, v in r.get("selective", {}).items():
                rows.append([*where, r["loss"], r["detector"], "in_dist", k, v["a"], v["b"],
                             v["delta"], "fraction", "", "", ""])
    return _csv(header, rows)


@dataclass(frozen=True)
class RenderedReport:
    """Everything an output format may print: the report dict and its tables and CSV."""

    doc: dict[str, Any]
    tables: list[TableModel]
    heading: str
    csv: str

    @property
    def markdown(self) -> str:
        return to_markdown(self.tables, self.heading, self.warnings)

    @property
    def warnings(self) -> list[str]:
        return list(self.doc.get("warnings") or [])


# `@OUTPUT_FORMATS.register("name")` on a function (report, console) -> None printing the report.
OUTPUT_FORMATS: Registry[Callable[[RenderedReport, Console], None]] = Registry("format")


@OUTPUT_FORMATS.register("rich")
def print_rich(report: RenderedReport, out: Console) -> None:
    from rich.markup import escape

    for table in to_rich(report.tables):
        out.print(table)
    for w in report.warnings:
        out.print(f"[yellow]warning:[/] {escape(w)}")


@OUTPUT_FORMATS.register("markdown")
def print_markdown(report: RenderedReport, out: Console) -> None:
    out.print(report.markdown, markup=False, highlight=False, soft_wrap=True)


@OUTPUT_FORMATS.register("csv")
def print_csv(report: RenderedReport, out: Console) -> None:
    out.file.write(report.csv)


@OUTPUT_FORMATS.register("json")
def print_json(report: RenderedReport, out: Console) -> None:
    out.file.write(json.dumps(report.doc, indent=2) + "\n")
