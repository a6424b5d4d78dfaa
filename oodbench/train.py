"""Training loop: the whole training set lives on the device as uint8; each step gathers a batch
by index, augments it with batched tensor ops and normalises it, so no per-sample Python runs.

Resumable and reproducible: the epoch's shuffle comes from a generator seeded by (seed, epoch),
and every step reseeds the global RNG from (seed, epoch, step) before its augmentation and loss
preprocessing. A checkpoint (every epoch, every `checkpoint_seconds` mid-epoch, and on Ctrl-C)
holds weights, optimizer state and the position; resuming replays the same random numbers, so a
resumed CPU run ends with the same weights as an uninterrupted one. The learning rate is a pure
function of the global step, so there is no scheduler state to restore.

The loss is `criterion.training_loss(model.forward_all(x, aux=criterion.aux), targets)` (see
oodbench.losses.base), so losses that need more than the logits plug in without trainer changes.
On CUDA the loop uses mixed precision (bfloat16 autocast; float16 + loss scaling where bf16 is
unsupported) and channels_last memory layout; on CPU/MPS it runs in float32, bit-reproducibly.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from oodbench.config import RunConfig, TrainConfig
from oodbench.data import DataContext, ImageSet, InputTransform, augment
from oodbench.errors import OodbenchError
from oodbench.experiment import build_model, in_distribution_info, load_in_distribution
from oodbench.losses import LOSSES, Criterion
from oodbench.progress import EpochStats, StepReporter
from oodbench.runs import Run, load_weights

MAX_STEP_SEED = 2**62


def step_seed(seed: int, epoch: int, step: int = -1) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + step + 1) % MAX_STEP_SEED


ONE_CYCLE_PEAK = 0.25  # fraction of training spent rising to the peak learning rate
ONE_CYCLE_START = 1 / 25  # starting learning rate, as a fraction of the peak


def learning_rate(t: TrainConfig, global_step: int, steps_per_epoch: int) -> float:
    """Schedules: multistep (×gamma at each milestone epoch, the papers'), cosine (to 0), and
    onecycle (linear rise from lr/25 to lr over the first quarter, then cosine to 0), all after
    an optional linear warm-up of `warmup_epochs`."""
    epoch_f = global_step / steps_per_epoch
    if t.warmup_epochs and epoch_f < t.warmup_epochs:
        return t.lr * (epoch_f + 1.0 / steps_per_epoch) / t.warmup_epochs
    if t.schedule == "multistep":
        return t.lr * t.gamma ** sum(epoch_f >= m for m in t.milestones)
    if t.schedule == "onecycle":
        p = (epoch_f - t.warmup_epochs) / max(t.epochs - t.warmup_epochs, 1e-9)
        if p < ONE_CYCLE_PEAK:
            return t.lr * (ONE_CYCLE_START + (1 - ONE_CYCLE_START) * p / ONE_CYCLE_PEAK)
        q = min((p - ONE_CYCLE_PEAK) / (1 - ONE_CYCLE_PEAK), 1.0)
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * q))
    progress = (epoch_f - t.warmup_epochs) / max(t.epochs - t.warmup_epochs, 1e-9)
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


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
                finished: bool, partial: dict[str, float] | None = None,
                scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """`partial` holds the running sums of the unfinished epoch, so its statistics stay
    complete across a resume."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "step": step, "history": history, "finished": finished,
             "partial": partial or {"loss_sum": 0.0, "correct": 0.0, "seen": 0}}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    return state


def clean_rows(targets: torch.Tensor) -> torch.Tensor:
    """Mask of rows with one hard class: all of (B,), or rows of (B, 4) quadrant classes that
    agree (DisMax's clean half); training accuracy is counted on those only."""
    if targets.dim() == 1:
        return torch.ones_like(targets, dtype=torch.bool)
    return (targets == targets[:, :1]).all(dim=1)


def precision_for(device: torch.device, mixed_precision: bool | None) -> torch.dtype | None:
    """The autocast dtype: bf16 (or fp16 without bf16 support) on CUDA, None elsewhere."""
    if device.type != "cuda" or mixed_precision is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def save_checkpoint(run: Run, state: dict[str, Any]) -> None:
    from oodbench.io import atomic_write

    atomic_write(run.checkpoint_path, lambda p: torch.save(state, p))


def train(run: Run, ctx: DataContext, device: torch.device,
          reporter: StepReporter | None = None,
          stop_after_steps: int | None = None,
          on_step: Callable[[int], None] | None = None,
          mixed_precision: bool | None = None) -> list[dict[str, Any]]:
    """Train (or resume) the run to the end of its schedule; returns the per-epoch history.

    `stop_after_steps` simulates an interruption (tests): the loop saves a mid-epoch checkpoint
    and raises KeyboardInterrupt after that many steps in this call. `mixed_precision` (default:
    on for CUDA) also switches on channels_last; it is ignored off CUDA.
    """
    cfg: RunConfig = run.config()
    t = cfg.benchmark.train
    reporter = reporter or StepReporter()
    info = in_distribution_info(cfg)
    transform = InputTransform.for_model(info)
    train_set = load_in_distribution(cfg, "train", ctx).to(device)
    val_set = load_in_distribution(cfg, "val", ctx).to(device)

    torch.manual_seed(cfg.seed)
    amp_dtype = precision_for(device, mixed_precision)
    model = build_model(cfg).to(device)
    if amp_dtype is not None:
        model = model.to(memory_format=torch.channels_last)
    criterion = make_criterion(cfg).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                                nesterov=t.nesterov, weight_decay=t.weight_decay)
    n = len(train_set)
    bs = min(t.batch_size, n)
    steps_per_epoch = max(1, n // bs)  # drop the ragged last batch: BatchNorm needs real batches
    epoch, step, history = 0, 0, []
    partial = {"loss_sum": 0.0, "correct": 0.0, "seen": 0}
    if run.checkpoint_path.exists():
        state = run.require_checkpoint()
        if state.get("finished"):
            return list(state["history"])
        load_weights(model, state["model"], str(run.checkpoint_path))
        optimizer.load_state_dict(state["optimizer"])
        epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        partial = dict(state.get("partial") or partial)
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])

    reporter.start(t.epochs, steps_per_epoch, epoch, step)
    steps_this_call = 0
    last_save = time.monotonic()
    try:
        while epoch < t.epochs:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(
                step_seed(cfg.seed, epoch))).to(device)
            model.train()
            criterion.train()
            loss_sum = torch.full((), partial["loss_sum"], device=device, dtype=torch.float64)
            correct = torch.full((), partial["correct"], device=device, dtype=torch.float64)
            seen, counted = int(partial["seen"]), int(partial.get("counted", partial["seen"]))
            seen_now = 0  # images this call, for the speed
            tic = time.perf_counter()
            while step < steps_per_epoch:
                torch.manual_seed(step_seed(cfg.seed, epoch, step))
                idx = perm[step * bs:(step + 1) * bs]
                x = augment(train_set.images[idx], t.crop_padding, t.flip)
                x, targets = criterion.preprocess(transform(x), train_set.labels[idx])
                if amp_dtype is not None:
                    x = x.contiguous(memory_format=torch.channels_last)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(t, epoch * steps_per_epoch + step, steps_per_epoch)
                with (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                      else contextlib.nullcontext()):
                    out = model.forward_all(x, aux=criterion.aux)
                    loss = criterion.training_loss(out, targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if criterion.max_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), criterion.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                steps_this_call += 1
                seen += len(idx)
                seen_now += len(idx)
                loss_sum += loss.detach().double() * len(idx)
                clean = clean_rows(targets)
                counted += int(clean.sum())
                hard = targets if targets.dim() == 1 else targets[:, 0]
                correct += ((out.logits.detach().argmax(1) == hard) & clean).sum()
                reporter.step(float(loss.detach()), float(correct) / max(counted, 1),
                              seen_now / max(time.perf_counter() - tic, 1e-9))
                partial = {"loss_sum": float(loss_sum), "correct": float(correct), "seen": seen,
                           "counted": counted}
                if on_step:
                    on_step(steps_this_call)
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    raise KeyboardInterrupt
                if time.monotonic() - last_save > t.checkpoint_seconds:
                    save_checkpoint(run, _checkpoint(model, optimizer, epoch, step, history,
                                                     False, partial, scaler))
                    last_save = time.monotonic()
            stats = EpochStats(epoch + 1, float(loss_sum) / max(seen, 1),
                               float(correct) / max(counted, 1),
                               evaluate_accuracy(model, val_set, transform),
                               seen_now / max(time.perf_counter() - tic, 1e-9))
            history.append(stats.__dict__)
            epoch, step = epoch + 1, 0
            partial = {"loss_sum": 0.0, "correct": 0.0, "seen": 0, "counted": 0}
            save_checkpoint(run, _checkpoint(model, optimizer, epoch, step, history,
                                             epoch >= t.epochs, partial, scaler))
            last_save = time.monotonic()
            reporter.epoch_end(stats)
    except KeyboardInterrupt:
        save_checkpoint(run, _checkpoint(model, optimizer, epoch, step, history, False, partial,
                                         scaler))
        raise
    write_manifest(run, device, {"train": train_set, "val": val_set}, history)
    return history


def make_criterion(cfg: RunConfig) -> Criterion:
    """The run's criterion with its loss options; a wrong option is an input error."""
    factory = LOSSES.get(cfg.loss).criterion
    try:
        return factory(**cfg.loss_options)
    except TypeError as e:
        raise OodbenchError(f"bad option for loss {cfg.loss!r}: {e}",
                            "check `loss_options` in the benchmark or --loss-option") from None


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
