"""`oodbench.evaluate` on a torchvision model: a ResNet-18 (random weights, no download) trained
for a few steps on scikit-learn's digits upsampled to 32×32 RGB, then benchmarked against noise
and natural-image patches — features read by hooks, no oodbench model code involved.

    python examples/evaluate_torchvision.py      # ~20 s on an idle 2-core CPU
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import oodbench
from oodbench.data import DATASETS, DataContext

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the model's input normalisation


def to_rgb32(x: torch.Tensor) -> torch.Tensor:
    """N×1×8×8 pixels in [0, 1] → N×3×32×32 (bilinear upsampling, gray replicated)."""
    return F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1).expand(
        -1, 3, -1, -1).contiguous()


def digits() -> tuple[torch.Tensor, ...]:
    d = load_digits()
    x = to_rgb32(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0)
    y = torch.tensor(d.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y,
                                                        random_state=0)
    return x_train, y_train, x_test, y_test


def train(x: torch.Tensor, y: torch.Tensor, steps: int = 40) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,))
        loss = F.cross_entropy(model((x[idx] - mean) / std), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main() -> None:
    x_train, y_train, x_test, y_test = digits()
    model = train(x_train, y_train)
    g = torch.Generator().manual_seed(1)
    noise = torch.rand((300, 3, 32, 32), generator=g)                      # floats in [0, 1]
    patches = DATASETS.get("patches").load("test", DataContext.resolve())  # uint8 1×8×8
    patches = to_rgb32(patches.images[:300].float() / 255)

    with tempfile.TemporaryDirectory() as cache:
        result = oodbench.evaluate(
            model, (x_test, y_test), {"noise": noise, "patches": patches},
            train=(x_train[:600], y_train[:600]),
            detectors=("msp", "energy", "maxlogit", "knn", "vim"),
            mean=MEAN, std=STD, cache_dir=cache)
        print(result.tables(metrics=["auroc"]))
        gate = result.gate("auroc:noise>=0.5", "accuracy>=0.5")
        print("gate:", "passed" if gate else "FAILED")
        print(gate)


if __name__ == "__main__":
    main()
