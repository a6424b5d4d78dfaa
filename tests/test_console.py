"""The training progress display: what it leaves on screen must be true."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from oodbench.console import RichTrainReporter
from oodbench.progress import EpochStats


def _drive(epochs: int, from_epoch: int = 0, terminal: bool = False) -> Progress:
    p = Progress(console=Console(file=io.StringIO(), force_terminal=terminal))
    rep = RichTrainReporter(p, "bench/softmax/seed0")
    rep.start(epochs, 3, from_epoch, 0)
    for e in range(from_epoch, epochs):
        for _ in range(3):
            rep.step(1.0, 0.5, 100.0)
        steps = [t for t in p.tasks if "steps" in t.description]
        assert [t.completed for t in steps] == [3]  # a full epoch of steps shown
        rep.epoch_end(EpochStats(e + 1, 1.0, 0.5, 0.25, 100.0))
    return p


def test_the_steps_line_resets_between_epochs_and_goes_after_the_last():
    p = _drive(2)
    assert [(t.description, t.completed, t.total) for t in p.tasks] == [
        ("bench/softmax/seed0 epochs", 2, 2)]


def test_a_resumed_run_also_ends_without_a_stale_steps_line():
    p = _drive(3, from_epoch=2)
    assert [(t.completed, t.total) for t in p.tasks] == [(3, 3)]


def test_logs_and_pipes_get_a_width_that_fits_the_tables(monkeypatch):
    """A CI log or a pipe is not a terminal: rich would give it 80 columns, folding an
    eleven-column report into fragments. $COLUMNS, when set, still decides."""
    from oodbench.console import LOG_WIDTH, log_width

    monkeypatch.delenv("COLUMNS", raising=False)
    assert log_width(io.StringIO()) == LOG_WIDTH
    monkeypatch.setenv("COLUMNS", "100")
    assert log_width(io.StringIO()) is None
    assert Console(file=io.StringIO(), width=log_width(io.StringIO())).width == 100


def test_a_log_gets_one_line_per_epoch_and_a_terminal_only_the_bars():
    log = _drive(2).console.file.getvalue()
    assert log.splitlines() == [
        f"bench/softmax/seed0 epoch {e}/2 · loss 1.000 · train acc 50.0% · val acc 25.0% · "
        "100 img/s" for e in (1, 2)]
    assert "epoch 1/2 ·" not in _drive(2, terminal=True).console.file.getvalue()
