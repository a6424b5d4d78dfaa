"""Training: schedules, resume after an interruption ends with bit-identical weights on CPU, and
`oodbench train --loss L` works for every loss."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.config import RunConfig, TrainConfig, load_benchmark
from oodbench.data import DataContext
from oodbench.errors import OodbenchError, Terminated
from oodbench.experiment import build_model
from oodbench.losses import LOSSES
from oodbench.runs import Run
from oodbench.train import clean_rows, learning_rate, make_criterion, precision_for, train


def test_schedules() -> None:
    multi = TrainConfig(epochs=10, lr=0.1, schedule="multistep", milestones=[5, 8], gamma=0.1)
    assert [round(learning_rate(multi, e * 10, 10), 6) for e in (0, 4, 5, 7, 8, 9)] == [
        0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    cos = TrainConfig(epochs=10, lr=0.1, schedule="cosine")
    assert learning_rate(cos, 0, 10) == pytest.approx(0.1)
    assert learning_rate(cos, 50, 10) == pytest.approx(0.05)
    one = TrainConfig(epochs=8, lr=0.2, schedule="onecycle")
    assert learning_rate(one, 0, 10) == pytest.approx(0.2 / 25)
    assert learning_rate(one, 20, 10) == pytest.approx(0.2)  # peak at a quarter
    assert learning_rate(one, 79, 10) < 0.001
    lrs = [learning_rate(one, s, 10) for s in range(80)]
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1], strict=True))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:], strict=False))
    with pytest.raises(OodbenchError):
        TrainConfig(schedule="linear").validate()


def test_mixed_precision_only_on_cuda_and_accuracy_rows() -> None:
    assert precision_for(torch.device("cpu"), True) is None
    assert clean_rows(torch.tensor([[1, 1, 1, 1], [1, 2, 1, 1]])).tolist() == [True, False]


def test_bad_loss_option_is_an_input_error() -> None:
    cfg = RunConfig(load_benchmark("digits"), "dismax", 0, {"not_an_option": 1})
    with pytest.raises(OodbenchError, match="dismax"):
        make_criterion(cfg)


def _cfg(loss: str) -> RunConfig:
    bench = load_benchmark("digits-near")  # 5 classes: 535 training images, 8 steps of 64
    bench.train.epochs = 2
    bench.train.batch_size = 64
    bench.train.checkpoint_seconds = 0.0  # a checkpoint after every step: a kill loses one step
    return RunConfig(bench, loss, 3, {"entropy_weight": 1e-3} if loss != "dismax" else {})


def _weights(run: Run) -> dict[str, torch.Tensor]:
    state = run.require_checkpoint()
    assert state["finished"]
    return state["model"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dismax", "logsoftmax-resnet"])
def test_resume_after_interruption_gives_identical_weights(tmp_path: Path, loss: str) -> None:
    """DisMax draws random mosaics, the crop is random, the log-softmax loss clips gradients and
    adds the entropy term: all must replay exactly after a resume."""
    ctx, cpu = DataContext.resolve(), torch.device("cpu")
    cfg = _cfg(loss)
    full = Run.create(tmp_path / "full", cfg)
    history = train(full, ctx, cpu)
    assert len(history) == 2

    # Ctrl-C mid-epoch (the loop saves where it stopped), then the same call resumes.
    ctrl_c = Run.create(tmp_path / "ctrl_c", cfg)
    with pytest.raises(KeyboardInterrupt):
        train(ctrl_c, ctx, cpu, stop_after_steps=4)
    assert not ctrl_c.is_trained()
    train(ctrl_c, ctx, cpu)

    # A hard kill in the second epoch: nothing is saved at the kill; the last periodic
    # checkpoint (one step earlier) is where the next call starts.
    def kill(steps: int) -> None:
        if steps == 10:
            raise RuntimeError("killed")

    killed = Run.create(tmp_path / "killed", cfg)
    with pytest.raises(RuntimeError, match="killed"):
        train(killed, ctx, cpu, on_step=kill)
    state = Run.open(killed.path).require_checkpoint()
    assert (state["epoch"], state["step"]) == (1, 1)  # 9 of the 10 steps were saved
    resumed_history = train(killed, ctx, cpu)

    reference = _weights(full)
    for other in (ctrl_c, killed):
        weights = _weights(other)
        assert weights.keys() == reference.keys()
        for k, v in reference.items():
            assert torch.equal(weights[k], v), f"{other.path.name}: {k} differs"
    for a, b in zip(history, resumed_history, strict=True):
        assert (a["loss"], a["train_accuracy"], a["val_accuracy"]) == (
            b["loss"], b["train_accuracy"], b["val_accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES.names())
def test_cli_train_every_loss_on_digits(tmp_path: Path, loss: str) -> None:
    run_dir = tmp_path / loss
    args = ["train", "--benchmark", "digits", "--loss", loss, "--epochs", "1", "--run-dir",
            str(run_dir), "--device", "cpu"]
    if loss == "logsoftmax-resnet":
        args += ["-o", "entropy_weight=1e-3"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    run = Run.open(run_dir)
    assert run.is_trained()
    history = run.require_checkpoint()["history"]
    assert len(history) == 1 and history[0]["loss"] == history[0]["loss"]  # finite, not NaN
    r = CliRunner().invoke(app, args)  # the same command on a finished run does nothing
    assert r.exit_code == 0 and "already trained" in r.output


def test_cli_rejects_a_loss_the_model_cannot_take(tmp_path: Path) -> None:
    bench = tmp_path / "b.yaml"
    digits = Path(__file__).resolve().parent.parent / "oodbench" / "benchmarks" / "digits.yaml"
    bench.write_text(digits.read_text().replace("model: smallcnn8", "model: densenet100")
                     .replace("name: digits", "name: dn"))
    r = CliRunner().invoke(app, ["train", "--benchmark", str(bench), "--loss",
                                 "logsoftmax-resnet", "--run-dir", str(tmp_path / "r")])
    assert r.exit_code == 2 and "resnet20" in r.output
    assert not (tmp_path / "r").exists()


def test_compile_flag_compiles_the_training_forward_and_saves_the_plain_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compile` goes through torch.compile (here with dynamo's eager backend: the same graph
    capture without inductor's C++ build, so the test is fast); the checkpoint holds the plain
    model's keys, so `score` and a resume without --compile load it."""
    compiled: list[torch.nn.Module] = []
    real_compile = torch.compile

    def eager_compile(module: torch.nn.Module, **options: object) -> torch.nn.Module:
        compiled.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    r = CliRunner().invoke(app, ["train", "--benchmark", "digits-near", "--epochs", "1",
                                 "--run-dir", str(tmp_path / "c"), "--device", "cpu",
                                 "--compile"])
    assert r.exit_code == 0, r.output
    assert len(compiled) == 1 and hasattr(compiled[0], "model")  # the forward_all wrapper
    state = Run.open(tmp_path / "c").require_checkpoint()
    assert state["finished"] and state["history"][0]["loss"] == state["history"][0]["loss"]
    plain = build_model(RunConfig(load_benchmark("digits-near"), "dismax", 0, {}))
    assert list(state["model"]) == list(plain.state_dict())


def test_sigterm_saves_a_checkpoint_like_ctrl_c_and_the_run_resumes(tmp_path: Path) -> None:
    """A cancelled CI job or a scheduler's preemption sends SIGTERM: the loop saves where it
    stopped (not at the last periodic checkpoint) and raises Terminated (exit 143 in the CLI)."""
    ctx, cpu = DataContext.resolve(), torch.device("cpu")
    cfg = _cfg("dismax")
    cfg.benchmark.train.checkpoint_seconds = 1e9  # no periodic save: only the signal's
    run = Run.create(tmp_path / "run", cfg)

    def terminate(steps: int) -> None:
        if steps == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Terminated):
        train(run, ctx, cpu, on_step=terminate)
    state = run.require_checkpoint()
    assert not state["finished"] and (state["epoch"], state["step"]) == (0, 3)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    train(run, ctx, cpu)
    assert run.is_trained()


def test_the_epoch_speed_counts_training_steps_not_the_validation_pass(tmp_path, monkeypatch):
    """A clock that advances 1 s per training step and 1000 s in the validation pass: the
    images/s of an epoch is its images over its 8 step-seconds."""
    import oodbench.train as train_module

    clock = {"now": 0.0}
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock["now"])
    real_eval = train_module.evaluate_accuracy

    def slow_eval(*args: object) -> float:
        clock["now"] += 1000.0
        return real_eval(*args)

    monkeypatch.setattr(train_module, "evaluate_accuracy", slow_eval)
    cfg = _cfg("dismax")
    cfg.benchmark.train.epochs = 1
    run = Run.create(tmp_path / "run", cfg)
    history = train(run, DataContext.resolve(), torch.device("cpu"),
                    on_step=lambda steps: clock.__setitem__("now", clock["now"] + 1.0))
    # digits-near: 8 full steps of 64 (the 23 images left over are not a step)
    assert history[0]["images_per_second"] == pytest.approx(8 * 64 / 8)
