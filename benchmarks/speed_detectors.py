"""Time every gradient-free detector on warm-cache-shaped inputs (10k samples).
Usage: PYTHONPATH=. python benchmarks/speed_detectors.py  (ODIN and the whole cold `score`
against a conventional loop: benchmarks/speed_score.py)

Target (issue 5): gradient-free ≤ 1 s per 10k samples on a CPU.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from oodbench.detectors import DETECTORS, DetectorInput, create
from oodbench.summaries import summarise_blocks

N, C, D = 10_000, 10, 512


def gradient_free() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, C, (N,), generator=g)
    blocks = {}
    for name, (ch, hw) in {"layer1": (64, 8), "layer2": (128, 4), "layer3": (256, 2)}.items():
        for _ in range(0, N, 1000):  # summaries only, as the cache stores them
            for k, v in summarise_blocks({name: torch.randn(1000, ch, hw, hw)}).items():
                blocks.setdefault(k, []).append(v)
    blocks = {k: torch.cat(v) for k, v in blocks.items()}
    data = DetectorInput("x", torch.randn(N, C, generator=g) * 3, labels,
                         torch.randn(N, D, generator=g), blocks)
    for name, cls in DETECTORS.items():
        if name == "odin" or "test" in name:
            continue
        hp = {"selection": "none"} if cls.selection_modes else {}
        det = create(name, **hp)
        if det.requires_fit:
            det.fit(data)
        tic = time.perf_counter()
        det(data)
        print(f"{name:24s} {time.perf_counter() - tic:7.3f} s / 10k samples")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    gradient_free()
