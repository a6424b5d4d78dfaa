"""Drop-in use of oodbench's losses in a plain PyTorch loop, as the DisMax repository's example.py:
a small CNN of your own, trained twice on scikit-learn's 8×8 digits — once with SoftMax, once with
DisMax — by swapping only the last layer (`spec.head`) and the loss (`spec.criterion`). Then MSP
vs MMLES AUROC against noise, computed with oodbench's detectors and metrics.

    python examples/dropin.py            # ~15 s on a 2-core CPU
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from oodbench.detectors import DetectorInput, create
from oodbench.losses import LOSSES
from oodbench.metrics import ood_metrics


def data() -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # N×1×8×8 in [0, 1]
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand((len(x_te), 1, 8, 8), generator=g)  # uniform-noise "images"
    return (x_tr - 0.5) / 0.5, y_tr, (x_te - 0.5) / 0.5, y_te, (noise - 0.5) / 0.5


class Net(nn.Module):
    """Any backbone; only `self.fc` is replaced by the loss's head."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def train(loss: str, x: torch.Tensor, y: torch.Tensor, epochs: int = 15) -> nn.Module:
    torch.manual_seed(0)
    spec = LOSSES.get(loss)
    model = Net(spec.head(64, 10))                 # replaces nn.Linear(64, 10)
    criterion = spec.criterion()                   # replaces nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            inputs, targets = criterion.preprocess(x[idx], y[idx])  # DisMax: mosaics
            loss_value = criterion(model(inputs), targets)
            opt.zero_grad()
            loss_value.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def scores(model: nn.Module, detector: str, x: torch.Tensor) -> np.ndarray:
    logits = model(x)
    return create(detector)(DetectorInput("x", logits=logits, labels=torch.full((len(x),), -1)))


def main() -> None:
    x_tr, y_tr, x_te, y_te, noise = data()
    print(f"{'loss':8s} {'accuracy':>9s} {'detector':>9s} {'AUROC vs uniform noise':>23s}")
    for loss in ("softmax", "dismax"):
        model = train(loss, x_tr, y_tr)
        with torch.no_grad():
            accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
        for detector in ("msp", "mmles"):
            s_in, s_out = scores(model, detector, x_te), scores(model, detector, noise)
            auroc = ood_metrics(s_in, s_out)["auroc"]
            print(f"{loss:8s} {accuracy:9.1%} {detector:>9s} {auroc:23.1%}")


if __name__ == "__main__":
    main()
