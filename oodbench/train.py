"""Training loop: the whole training set lives on the device as uint8; each step gathers a batch
by index, augments it with batched tensor ops and normalises it, so no per-sample Python runs.

Resumable and reproducible: the epoch's shuffle comes from a generator seeded by (seed, epoch),
and every step reseeds the global RNG from (seed, epoch, step) before its augmentation and loss
preprocessing. A checkpoint (every epoch, every `checkpoint_seconds` mid-epoch, and on Ctrl-C)
holds weights, optimizer state and the position; resuming replays the same random numbers, so a
resumed CPU run ends with the same weights as an uninterrupted one. The learning rate is a pure
function of the global step, so there is no scheduler state to restore.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from oodbench.config import RunConfig, TrainConfig
from oodbench.data import DataContext, ImageSet, InputTransform, augment
from oodbench.experiment import build_model, in_distribution_info, load_in_distribution
from oodbench.losses import LOSSES
from oodbench.runs import Run, load_weights

MAX_STEP_SEED = 2**62


def step_seed(seed: int, epoch: int, step: int = -1) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + step + 1) % MAX_STEP_SEED


def learning_rate(t: TrainConfig, global_step: int, steps_per_epoch: int) -> float:
    epoch_f = global_step / steps_per_epoch
    if t.warmup_epochs and epoch_f < t.warmup_epochs:
        return t.lr * (epoch_f + 1.0 / steps_per_epoch) / t.warmup_epochs
    if t.schedule == "multistep":
        return t.lr * t.gamma ** sum(epoch_f >= m for m in t.milestones)
    progress = (epoch_f - t.warmup_epochs) / max(t.epochs - t.warmup_epochs, 1e-9)
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_accuracy: float
    val_accuracy: float
    images_per_second: float


class StepReporter:
    """What the loop tells its caller; the CLI implements it with rich progress bars."""

    def start(self, epochs: int, steps_per_epoch: int, epoch: int, step: int) -> None: ...
    def step(self, loss: float, accuracy: float, images_per_second: float) -> None: ...
    def epoch_end(self, stats: EpochStats) -> None: ...


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, data: ImageSet, transform: InputTransform,
                      batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(data), batch_size):
        logits = model(transform(data.images[s:s + batch_size]))
        correct += int((logits.argmax(1) == data.labels[s:s + batch_size]).sum())
    return correct / len(data)


def _checkpoint(model, optimizer, epoch: int, step: int, history: list[dict[str, Any]],
                finished: bool) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "step": step, "history": history, "finished": finished}


def save_checkpoint(run: Run, state: dict[str, Any]) -> None:
    from oodbench.io import atomic_write

    atomic_write(run.checkpoint_path, lambda p: torch.save(state, p))


def train(run: Run, ctx: DataContext, device: torch.device,
          reporter: StepReporter | None = None,
          stop_after_steps: int | None = None,
          on_step: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Train (or resume) the run to the end of its schedule; returns the per-epoch history.

    `stop_after_steps` simulates an interruption (tests): the loop saves a mid-epoch checkpoint
    and raises KeyboardInterrupt after that many steps in this call.
    """
    cfg: RunConfig = run.config()
    t = cfg.benchmark.train
    reporter = reporter or StepReporter()
    info = in_distribution_info(cfg)
    transform = InputTransform.for_model(info)
    train_set = load_in_distribution(cfg, "train", ctx).to(device)
    val_set = load_in_distribution(cfg, "val", ctx).to(device)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    criterion = LOSSES.get(cfg.loss).criterion(**cfg.loss_options).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                                nesterov=t.nesterov, weight_decay=t.weight_decay)
    n = len(train_set)
    bs = min(t.batch_size, n)
    steps_per_epoch = max(1, n // bs)  # drop the ragged last batch: BatchNorm needs real batches
    epoch, step, history = 0, 0, []
    if run.checkpoint_path.exists():
        state = run.require_checkpoint()
        load_weights(model, state["model"], str(run.checkpoint_path))
        optimizer.load_state_dict(state["optimizer"])
        epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        if state.get("finished"):
            return history

    reporter.start(t.epochs, steps_per_epoch, epoch, step)
    steps_this_call = 0
    last_save = time.monotonic()
    try:
        while epoch < t.epochs:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(
                step_seed(cfg.seed, epoch))).to(device)
            model.train()
            criterion.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            seen = 0
            tic = time.perf_counter()
            while step < steps_per_epoch:
                torch.manual_seed(step_seed(cfg.seed, epoch, step))
                idx = perm[step * bs:(step + 1) * bs]
                x = augment(train_set.images[idx], t.crop_padding, t.flip)
                x, targets = criterion.preprocess(transform(x), train_set.labels[idx])
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(t, epoch * steps_per_epoch + step, steps_per_epoch)
                logits = model(x)
                loss = criterion(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                steps_this_call += 1
                seen += len(idx)
                loss_sum += loss.detach() * len(idx)
                hard = targets if targets.dim() == 1 else targets[:, 0]
                correct += (logits.detach().argmax(1) == hard).sum()
                reporter.step(float(loss.detach()), float(correct) / seen,
                              seen / max(time.perf_counter() - tic, 1e-9))
                if on_step:
                    on_step(steps_this_call)
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    raise KeyboardInterrupt
                if time.monotonic() - last_save > t.checkpoint_seconds:
                    save_checkpoint(run, _checkpoint(model, optimizer, epoch, step, history,
                                                     False))
                    last_save = time.monotonic()
            stats = EpochStats(epoch + 1, float(loss_sum) / max(seen, 1),
                               float(correct) / max(seen, 1),
                               evaluate_accuracy(model, val_set, transform),
                               seen / max(time.perf_counter() - tic, 1e-9))
            history.append(stats.__dict__)
            epoch, step = epoch + 1, 0
            save_checkpoint(run, _checkpoint(model, optimizer, epoch, step, history,
                                             epoch >= t.epochs))
            last_save = time.monotonic()
            reporter.epoch_end(stats)
    except KeyboardInterrupt:
        save_checkpoint(run, _checkpoint(model, optimizer, epoch, step, history, False))
        raise
    write_manifest(run, device, {"train": train_set, "val": val_set}, history)
    return history


def write_manifest(run: Run, device: torch.device, data: dict[str, ImageSet],
                   history: list[dict[str, Any]]) -> None:
    """Provenance of the trained weights: versions, device, data fingerprints, final numbers."""
    from oodbench.io import write_json
    from oodbench.pipeline import environment

    write_json(run.manifest_path, {
        "environment": {**environment(), "device": str(device)},
        "data": {k: {"name": d.name, "n": len(d), "sha256": d.fingerprint()}
                 for k, d in data.items()},
        "epochs": len(history),
        "final": history[-1] if history else None,
    })
