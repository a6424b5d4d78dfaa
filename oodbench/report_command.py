"""What `oodbench report` does, apart from parsing options: build, render, write, plot, gate.

Kept out of cli.py so the command line stays a thin wrapper and this is testable directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from oodbench.errors import OodbenchError
from oodbench.gate import evaluate, parse_gate
from oodbench.io import write_json, write_text
from oodbench.render import (
    DEFAULT_TABLE_METRICS,
    OUTPUT_FORMATS,
    PAPER_METRICS,
    PAPER_PAIRS,
    RenderedReport,
    comparison_csv,
    comparison_tables,
    paper_tables,
    report_csv,
    report_tables,
)
from oodbench.report import Filters, build_report, compare, find_metrics, load_metrics

STYLES = ("table", "paper")


@dataclass
class ReportOptions:
    metric: list[str] | None = None
    ood: list[str] | None = None
    detector: list[str] | None = None
    loss: list[str] | None = None
    fmt: str = "rich"
    style: str = "table"
    pair: list[str] | None = None
    compare: tuple[Path, Path] | None = None
    plots: Path | None = None
    bootstrap: int = 0
    fail_under: list[str] = field(default_factory=list)
    fail_over: list[str] = field(default_factory=list)
    output: Path | None = None
    write: bool = True
    table_metrics: tuple[str, ...] | None = None
    significance: int = 0  # paired-bootstrap replicates for ties / significant Δ (0 = off)
    group_by: str = "benchmark"  # or "data": see `report.grouped_runs`

    def filters(self) -> Filters:
        return Filters(*(tuple(v) if v else None
                         for v in (self.metric, self.ood, self.detector, self.loss)))


def _pairs(specs: list[str] | None) -> tuple[tuple[str, str], ...]:
    if not specs:
        return PAPER_PAIRS
    out = []
    for s in specs:
        loss, sep, det = s.partition(":")
        if not sep or not loss or not det:
            raise OodbenchError(f"--pair {s!r} is not LOSS:DETECTOR", "e.g. --pair dismax:mmles")
        out.append((loss, det))
    return tuple(out)


def _check_options(o: ReportOptions) -> None:
    """Options that are wrong whatever the runs: fail before any work."""
    if o.style not in STYLES:
        raise OodbenchError(f"unknown style {o.style!r}", f"use one of: {', '.join(STYLES)}")
    if o.bootstrap < 0:
        raise OodbenchError("--bootstrap must be >= 0", "e.g. --bootstrap 1000")
    if o.significance < 0:
        raise OodbenchError("--significance must be >= 0", "e.g. --significance 1000")
    if o.write and o.output is not None and o.output.exists() and not o.output.is_dir():
        raise OodbenchError(f"--output {o.output} is a file, not a folder",
                            "pass a folder (created if missing) for the report files, or "
                            "--no-write to write none")
    if o.plots is not None and o.plots.exists() and not o.plots.is_dir():
        raise OodbenchError(f"--plots {o.plots} is a file, not a folder",
                            "pass a folder (created if missing) for the PNG files")


def run_report(paths: list[Path], o: ReportOptions) -> int:
    """Print and write the report; returns the exit code (1 when a gate fails)."""
    from oodbench.console import console, out

    print_format = OUTPUT_FORMATS.get(o.fmt)  # an unknown --format fails before any work
    _check_options(o)
    gates = ([parse_gate(g, under=True) for g in o.fail_under]
             + [parse_gate(g, under=False) for g in o.fail_over])
    filters = o.filters()
    metrics = o.table_metrics or filters.metrics
    selective = filters.selective_metrics  # their tables show whenever the runs have them
    if o.compare:
        a_path, b_path = o.compare
        runs = load_metrics(find_metrics([b_path]))
        rep_a = build_report(load_metrics(find_metrics([a_path])), filters,
                             group_by=o.group_by)
        rep = build_report(runs, filters, o.bootstrap, group_by=o.group_by)
        doc = compare(rep_a, rep, str(a_path), str(b_path), o.significance)
        tables = comparison_tables(doc, metrics or DEFAULT_TABLE_METRICS, selective)
        csv_text, stem, heading = comparison_csv(doc), "comparison", "oodbench comparison"
        dest = o.output or (b_path if b_path.is_dir() else b_path.parent)
    else:
        runs = load_metrics(find_metrics(paths))
        rep = build_report(runs, filters, o.bootstrap, significance=o.significance,
                           group_by=o.group_by)
        doc = rep.to_dict()
        if o.style == "paper":
            tables = paper_tables(doc, metrics or PAPER_METRICS, _pairs(o.pair))
        else:
            tables = report_tables(doc, metrics or DEFAULT_TABLE_METRICS, selective)
        csv_text, stem, heading = report_csv(doc), "report", "oodbench report"
        dest = o.output or (paths[0] if paths[0].is_dir() else paths[0].parent)

    rendered = RenderedReport(doc, tables, heading, csv_text)
    print_format(rendered, out)
    if o.write:
        write_json(dest / f"{stem}.json", doc)
        write_text(dest / f"{stem}.md", rendered.markdown)
        write_text(dest / f"{stem}.csv", csv_text)
        console.print(f"wrote {dest / stem}.json, .md and .csv")
    if o.plots:
        from oodbench.plots import write_plots

        files = write_plots(runs, o.plots, filters, warn=lambda s: console.print(f"[yellow]{s}"))
        console.print(f"wrote {len(files)} plot(s) to {o.plots}")
    if gates:
        failed = evaluate(rep.to_dict(), gates)
        if failed:
            for gate, cell in failed:
                console.print(f"[bold red]FAIL[/] {escape(gate.text)}: {escape(cell.where)} = "
                              f"{cell.value:.4g}")
            console.print(f"[bold red]{len(failed)} cell(s) failed the gates")
            return 1
        console.print(f"[green]all {len(gates)} gate(s) passed")
    return 0
