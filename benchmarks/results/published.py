"""The side-by-side tables of docs/results.md: published figures (constants, with their sources)
next to the same detectors' AUROC in the published records of benchmarks/results.

    PYTHONPATH=. python benchmarks/results/published.py [benchmarks/results]

Reads only metrics.json files (no data, no forward pass). Tiny-ImageNet is the closest set we have
to OpenOOD's near-OOD (CIFAR-100 + TinyImageNet) and MNIST is one of its far-OOD sets; the
settings differ (see docs/results.md), so compare rankings, not values.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

# OpenOOD v1.5, CIFAR-10, ResNet-18, post-hoc on cross-entropy training (95.06 % accuracy):
# (near-OOD AUROC, far-OOD AUROC), mean of 3 trainings. Source: Jingkang50/OpenOOD,
# results/cifar10.csv (the v1.5 leaderboard). Our detector name → their postprocessor's row.
OPENOOD = {
    "msp": (88.03, 90.73), "maxlogit": (87.52, 91.10), "energy": (87.58, 91.21),
    "odin": (82.87, 87.96), "mahalanobis": (84.20, 89.72), "rmds": (89.80, 92.20),
    "react": (87.11, 90.42), "kl-matching": (79.19, 82.68), "vim": (88.68, 93.48),
    "knn": (90.64, 92.96), "dice": (78.34, 84.23), "ash-s": (75.27, 78.49),
    "she": (81.54, 85.32), "gen": (88.20, 91.35), "openmax": (87.62, 89.62),
    "scale": (82.55, 86.39), "gradnorm": (54.90, 57.55),
}
TIN = ("tinyimagenet-resize", "tinyimagenet-crop")


def auroc(m: dict, det: str, sets: tuple[str, ...]) -> float | None:
    ood = m["detectors"].get(det, {}).get("ood", {})
    vals = [ood[s]["auroc"] for s in sets if s in ood and "auroc" in ood[s]]
    return 100 * statistics.fmean(vals) if len(vals) == len(sets) else None


def cell(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def openood_table(root: Path) -> str:
    runs = sorted((root / "cifar10-jpeg-pretrained").glob("*/metrics.json"))
    metrics = {p.parent.name: json.loads(p.read_text()) for p in runs}
    head = "| detector | OpenOOD near | OpenOOD far |" + "".join(
        f" {n} TIN | {n} MNIST |" for n in metrics)
    rule = "|---|---:|---:|" + "---:|---:|" * len(metrics)
    lines = [head, rule]
    for det, (near, far) in OPENOOD.items():
        ours = "".join(f" {cell(auroc(m, det, TIN))} | {cell(auroc(m, det, ('mnist',)))} |"
                       for m in metrics.values())
        lines.append(f"| {det} | {near:.2f} | {far:.2f} |{ours}")
    acc = "".join(f" {100 * m['classification']['uncalibrated']['accuracy']:.1f} | |"
                  for m in metrics.values())
    lines.append(f"| *accuracy* | 95.06 | |{acc}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(openood_table(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")))
