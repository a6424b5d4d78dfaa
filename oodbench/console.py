"""Rich progress bars and console for the CLI (the library itself never prints).

Under torchrun only rank 0 prints and draws progress bars: the other ranks' consoles are quiet
(`errors` still shows a bug's traceback from any rank)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from oodbench.distributed import is_main_process
from oodbench.errors import leave_closed_pipe
from oodbench.progress import EpochStats, StepReporter


def log_width(stream: TextIO) -> int | None:
    """None (rich's own choice: the terminal's width, else $COLUMNS, else 80) on a terminal or
    with $COLUMNS set; LOG_WIDTH when writing to a CI log, a pipe or a file. Those do not wrap
    lines, and at 80 columns a report table of eleven columns folds every name into pieces."""
    if os.environ.get("COLUMNS") or stream.isatty():
        return None
    return LOG_WIDTH


LOG_WIDTH = 200


class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich's default exits 1, the code of a failed gate
        self.quiet = True
        leave_closed_pipe()


console = _Console(stderr=True, quiet=not is_main_process(), width=log_width(sys.stderr))
out = _Console(quiet=not is_main_process(), width=log_width(sys.stdout))
errors = _Console(stderr=True, width=log_width(sys.stderr))


def make_progress() -> Progress:
    """Bars on a terminal. In a CI log, a pipe or a file nothing is drawn while work runs, and
    the finished bars are not printed either (transient): there the commands print lines of
    their own (one per epoch, the forward log), and 24 full bars would only be noise."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=not console.is_terminal,
                    disable=not is_main_process())


@contextmanager
def progress_factory(shared: Progress | None = None
                     ) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yields `new(description, total) -> advance(n)` for the pipeline's loops (on `shared`, a
    live display already open, or on a new one)."""

    def new_on(p: Progress) -> Callable[[str, int], Callable[[int], None]]:
        def new(description: str, total: int) -> Callable[[int], None]:
            task = p.add_task(description, total=total, info="")
            return lambda n: p.advance(task, n)

        return new

    if shared is not None:
        yield new_on(shared)
        return
    with make_progress() as p:
        yield new_on(p)


class RichTrainReporter(StepReporter):
    def __init__(self, progress: Progress, label: str) -> None:
        self.p, self.label = progress, label
        self.epoch_task = self.step_task = None
        self.epochs = 0

    def start(self, epochs: int, steps_per_epoch: int, epoch: int, step: int) -> None:
        if epoch or step:
            console.print(f"[yellow]resuming {self.label} at epoch {epoch + 1}, step {step}")
        self.epochs = epochs
        self.epoch_task = self.p.add_task(f"{self.label} epochs", total=epochs,
                                          completed=epoch, info="")
        self.step_task = self.p.add_task("  steps", total=steps_per_epoch, completed=step,
                                         info="")

    def step(self, loss: float, accuracy: float, images_per_second: float) -> None:
        self.p.update(self.step_task, advance=1,
                      info=f"loss {loss:.3f} · acc {accuracy:.1%} · {images_per_second:.0f} img/s")

    def epoch_end(self, stats: EpochStats) -> None:
        self.p.update(self.epoch_task, advance=1,
                      info=f"val acc {stats.val_accuracy:.1%} · loss {stats.loss:.3f}")
        if not self.p.console.is_terminal:  # a CI log or a file: bars are not drawn there
            self.p.console.print(
                f"{self.label} epoch {stats.epoch}/{self.epochs} · loss {stats.loss:.3f} · "
                f"train acc {stats.train_accuracy:.1%} · val acc {stats.val_accuracy:.1%} · "
                f"{stats.images_per_second:.0f} img/s", soft_wrap=True)
        if stats.epoch >= self.epochs:  # no next epoch: a "0/N steps" line would be false
            self.p.remove_task(self.step_task)
        else:
            self.p.reset(self.step_task, info="")
