"""Time every gradient-free detector on warm-cache-shaped inputs (10k samples), and ODIN against
a plain forward pass of the same model. Usage: PYTHONPATH=. python benchmarks/speed_detectors.py

Targets (issue 5): gradient-free ≤ 1 s per 10k samples on a CPU; ODIN ≤ 3.3× a forward pass.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from oodbench.data import DATASETS, DataContext, InputTransform
from oodbench.detectors import DETECTORS, DetectorInput, create
from oodbench.models import build_classifier
from oodbench.pipeline import time_forward
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


def odin_ratio() -> None:
    from oodbench.losses import LOSSES

    info = DATASETS.get("digits").info_for()
    model = build_classifier("smallcnn8", LOSSES.get("softmax").head, 10, 1, 8).eval()
    data = DATASETS.get("digits").load("test", DataContext.resolve("x"))
    tf = InputTransform.for_model(info)
    fwd = time_forward(model, data, tf, torch.device("cpu"))
    inp = DetectorInput(data.name, None, data.labels, model=model, images=data, transform=tf,
                        device=torch.device("cpu"))
    tic = time.perf_counter()
    create("odin")(inp)
    odin = (time.perf_counter() - tic) / len(data)
    print(f"odin / forward (smallcnn8, digits test): {odin / fwd:.2f}×")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    gradient_free()
    odin_ratio()
