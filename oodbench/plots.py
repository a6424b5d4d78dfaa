"""PNG figures of a report: score histograms, ROC curves, reliability diagrams.

For each (benchmark, loss) the run with the lowest seed is drawn (figures of one model, not
averages); each detector gets a histogram figure (in-distribution vs each OOD set, one panel per
set) and a ROC figure (one curve per OOD set, the TPR-95 % operating point marked). Each run
with its test logits in the output cache gets a reliability diagram before / after temperature
scaling. Matplotlib runs with the Agg backend: no display is needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from oodbench.io import atomic_write
from oodbench.metrics import operating_point, reliability_bins, roc_curve
from oodbench.report import Filters, LoadedMetrics, load_scores


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", "_".join(str(p) for p in parts))


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    _pyplot().close(fig)
    return path


def write_plots(runs: list[LoadedMetrics], dest: Path, filters: Filters | None = None,
                warn: Callable[[str], None] = lambda s: None) -> list[Path]:
    filters = filters or Filters()
    first: dict[tuple[str, str, str, str], LoadedMetrics] = {}
    for r in sorted(runs, key=lambda r: r.data["seed"]):
        m = r.data
        if filters.losses and m["loss"] not in filters.losses:
            continue
        first.setdefault((m["benchmark"], m["in_distribution"], m["model"], m["loss"]), r)
    written: list[Path] = []
    for r in first.values():
        m = r.data
        tag = (m["benchmark"], m["loss"], f"seed{m['seed']}")
        oods = [o for o in m["ood_sets"] if not filters.ood or o in filters.ood]
        for det, rec in m["detectors"].items():
            if filters.detectors and det not in filters.detectors:
                continue
            if rec.get("applicable") is False:  # refused this head: it has no scores to draw
                warn(f"{det} is n/a on {r.run_dir} ({rec.get('reason', 'refused')}): no plots")
                continue
            in_scores = load_scores(r, det, r.test_set)
            # a set left out (non-finite scores) has no metric and may have no saved scores
            out_scores = {o: load_scores(r, det, o) for o in oods if o in rec.get("ood", {})}
            title = f"{m['benchmark']} · {m['loss']} + {det} · seed {m['seed']}"
            written.append(_save(histograms(in_scores, out_scores, title, r.test_set),
                                 dest / f"{_safe(*tag, det)}_hist.png"))
            written.append(_save(roc_figure(in_scores, out_scores, title),
                                 dest / f"{_safe(*tag, det)}_roc.png"))
        logits = _test_outputs(r)
        if logits is None:
            warn(f"no cached test logits for {r.run_dir}: reliability diagram skipped "
                 "(score the run again with this version)")
            continue
        temp = (m.get("calibration") or {}).get("temperature")
        written.append(_save(reliability_figure(*logits, temp,
                                                f"{m['benchmark']} · {m['loss']} · "
                                                f"seed {m['seed']}"),
                             dest / f"{_safe(*tag)}_reliability.png"))
    return written


def _test_outputs(r: LoadedMetrics) -> tuple[np.ndarray, np.ndarray] | None:
    key = (r.data.get("cache_keys") or {}).get(r.test_set)
    if not key:
        return None
    d = r.run_dir / "cache" / key
    if not (d / "logits.npy").exists() or not (d / "labels.npy").exists():
        return None
    return np.load(d / "logits.npy"), np.load(d / "labels.npy")


def histograms(in_scores: np.ndarray, out_scores: dict[str, np.ndarray], title: str,
               in_name: str = "in-distribution"):
    """One panel per OOD set: in-distribution vs that set, shared bins, densities."""
    plt = _pyplot()
    n = max(1, len(out_scores))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (name, s) in zip(axes[0], out_scores.items(), strict=False):
        both = np.concatenate([in_scores, s])
        lo, hi = float(both.min()), float(both.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
        ax.hist(in_scores, bins=bins, density=True, alpha=0.6, color="tab:blue",
                label=f"{in_name} (in, n={len(in_scores)})")
        ax.hist(s, bins=bins, density=True, alpha=0.6, color="tab:red",
                label=f"{name} (OOD, n={len(s)})")
        ax.set_title(f"{in_name} vs {name}")
        ax.set_xlabel("score (higher = more in-distribution)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle(f"score histograms: {title}")
    fig.tight_layout()
    return fig


def roc_figure(in_scores: np.ndarray, out_scores: dict[str, np.ndarray], title: str):
    """ROC curves (in-distribution positive) with the TPR-95 % operating point marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, s in out_scores.items():
        fpr, tpr, _ = roc_curve(in_scores, s)
        auc = float(np.trapezoid(tpr, fpr))
        (line,) = ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUROC {auc:.1%})")
        i = operating_point(tpr)
        ax.plot(fpr[i], tpr[i], "o", color=line.get_color(), ms=5)
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
    ax.axhline(0.95, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("FPR (OOD accepted)")
    ax.set_ylabel("TPR (in-distribution accepted)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(f"ROC: {title}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def reliability_figure(logits: np.ndarray, labels: np.ndarray, temperature: float | None,
                       title: str, bins: int = 15):
    """Accuracy vs confidence per bin, before and (when calibrated) after temperature scaling."""
    import torch

    from oodbench.metrics import ece

    plt = _pyplot()
    cases = [("before calibration (T = 1)", 1.0)]
    if temperature is not None:
        cases.append((f"after calibration (T = {temperature:.3f})", float(temperature)))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.4 * len(cases), 4.2), squeeze=False)
    lt, yt = torch.from_numpy(np.asarray(logits)), torch.from_numpy(np.asarray(labels))
    width = 1.0 / bins
    centers = (np.arange(bins) + 0.5) * width
    for ax, (name, t) in zip(axes[0], cases, strict=True):
        conf, acc, count = reliability_bins(lt, yt, t, bins)
        used = count > 0
        ax.bar(centers[used], acc[used], width=width, edgecolor="black", color="tab:blue",
               alpha=0.75, label="accuracy in bin")
        gap_lo = np.minimum(acc[used], conf[used])
        ax.bar(centers[used], np.abs(conf[used] - acc[used]), bottom=gap_lo, width=width,
               fill=False, hatch="//", edgecolor="tab:red", lw=0.8,
               label="gap to mean confidence")
        ax.plot(centers[used], conf[used], "_", color="tab:red", ms=12, mew=2)
        ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max softmax)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}\nECE {ece(lt, yt, t, bins):.2%}", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"reliability: {title}", fontsize=10)
    fig.tight_layout()
    return fig
