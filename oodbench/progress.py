"""What the training loop reports while it runs, as a protocol of its own.

Kept below both the loop (oodbench.train) and the terminal front end (oodbench.console), so the
console can draw progress bars without importing the trainer, and anything else (a logger, a
test) can listen the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_accuracy: float
    val_accuracy: float
    images_per_second: float


class StepReporter:
    """What the loop tells its caller; the CLI implements it with rich progress bars. The
    methods do nothing by default, so a reporter overrides only what it shows."""

    def start(self, epochs: int, steps_per_epoch: int, epoch: int, step: int) -> None: ...
    def step(self, loss: float, accuracy: float, images_per_second: float) -> None: ...
    def epoch_end(self, stats: EpochStats) -> None: ...
