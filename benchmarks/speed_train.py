"""Training-step cost of each loss against cross-entropy, on the same model and batch, measured
side by side in one process: each step alternates the losses (so a busy machine slows all of
them alike), and medians over the repeats are compared. DisMax includes its mosaic
preprocessing (FPR); the target is ≤ 1.05× a cross-entropy step.

    PYTHONPATH=. python benchmarks/speed_train.py [--model resnet18] [--batch 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from oodbench.losses import LOSSES
from oodbench.models import build_classifier

LOSSES_TIMED = ("softmax", "dismax", "isomaxplus", "logitnorm")


def step_timer(loss: str, model_name: str, batch: torch.Tensor, targets: torch.Tensor):
    """A closure running one full training step of `loss` (preprocess, forward, loss, backward,
    SGD update) and returning its wall time."""
    torch.manual_seed(0)
    spec = LOSSES.get(loss)
    model = build_classifier(model_name, spec.head, 10, batch.shape[1], batch.shape[-1])
    criterion = spec.criterion()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def run() -> float:
        tic = time.perf_counter()
        x, y = criterion.preprocess(batch, targets)
        out = model.forward_all(x, aux=criterion.aux)
        value = criterion.training_loss(out, y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return time.perf_counter() - tic

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    runners = {loss: step_timer(loss, a.model, x, y) for loss in LOSSES_TIMED}
    for run in runners.values():  # warm-up
        run()
    times: dict[str, list[float]] = {loss: [] for loss in runners}
    for _ in range(a.steps):
        for loss, run in runners.items():
            times[loss].append(run())
    base = statistics.median(times["softmax"])
    print(f"{a.model}, batch {a.batch} × 3×{a.size}×{a.size}, {torch.get_num_threads()} threads, "
          f"median of {a.steps} interleaved steps")
    for loss, t in times.items():
        med = statistics.median(t)
        print(f"  {loss:12s} {med * 1000:8.1f} ms/step  {med / base:.3f}× cross-entropy"
              + ("  (target ≤ 1.05×)" if loss == "dismax" else ""))


if __name__ == "__main__":
    main()
