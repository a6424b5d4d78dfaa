"""A Ctrl-C that lands inside a training step saves the state of the last completed step, so the
resumed run ends bit-identical to an uninterrupted one, BatchNorm buffers included. The Ctrl-C
is a real SIGINT raised at a fixed point of the step (no timing)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

import oodbench.train as train_module
from oodbench.config import RunConfig, load_benchmark
from oodbench.data import DataContext
from oodbench.runs import Run
from oodbench.train import train

CPU = torch.device("cpu")
STOP_AT = 3  # the call (of the loss, or of the optimiser update) that gets the Ctrl-C


def _cfg() -> RunConfig:
    bench = load_benchmark("digits-near")  # 535 training images: 8 steps of 64
    bench.train.epochs = 1
    bench.train.batch_size = 64
    return RunConfig(bench, "softmax", 3, {})


def _ctrl_c_on(calls: list[int]) -> None:
    calls.append(1)
    if len(calls) == STOP_AT:
        signal.raise_signal(signal.SIGINT)  # its handler runs before this call returns


def _after_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the loss, after the forward updated the BatchNorm statistics."""
    make, calls = train_module.make_criterion, []

    def patched(cfg: RunConfig):
        criterion = make(cfg)
        loss = criterion.training_loss

        def training_loss(*args, **kwargs):
            out = loss(*args, **kwargs)
            _ctrl_c_on(calls)
            return out

        criterion.training_loss = training_loss
        return criterion

    monkeypatch.setattr(train_module, "make_criterion", patched)


def _after_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C right after the optimiser updated the weights, before the step is counted."""
    step, calls = torch.optim.SGD.step, []

    def patched(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        _ctrl_c_on(calls)
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", patched)


@pytest.mark.parametrize("where, saved_step", [(_after_forward, STOP_AT - 1),
                                               (_after_update, STOP_AT)])
def test_ctrl_c_inside_a_step_resumes_bit_identical(tmp_path: Path, monkeypatch, where,
                                                     saved_step: int) -> None:
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ctx, cfg = DataContext.resolve(), _cfg()
    full = Run.create(tmp_path / "full", cfg)
    train(full, ctx, CPU)

    cut = Run.create(tmp_path / "cut", cfg)
    with monkeypatch.context() as m:
        where(m)
        with pytest.raises(KeyboardInterrupt):
            train(cut, ctx, CPU)
    state = cut.require_checkpoint()
    assert (state["finished"], state["epoch"], state["step"]) == (False, 0, saved_step)
    assert state["partial"]["seen"] == saved_step * 64
    train(cut, ctx, CPU)

    want, got = full.require_checkpoint(), cut.require_checkpoint()
    assert got["finished"] and got["model"].keys() == want["model"].keys()
    differ = [k for k, v in want["model"].items() if not torch.equal(got["model"][k], v)]
    assert not differ, f"differ after the resume: {differ}"
    def numbers(state: dict) -> list[dict]:  # the speed is a timing
        return [{k: v for k, v in h.items() if k != "images_per_second"} for h in state["history"]]

    assert numbers(got) == numbers(want)
