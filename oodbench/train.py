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
Losses with `needs_outliers` (Outlier Exposure, energy-ft) also get the benchmark's auxiliary
outlier set, loaded once onto the device (`experiment.load_outliers`, which refuses a set that
shares an image with a test set); each step appends `ratio` × batch-size outliers, drawn without
replacement by a generator seeded from (seed, epoch, step) and augmented like the batch, with
target -1, so a resume replays them too. Other losses never load it and draw the same numbers as
before.

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
from oodbench.experiment import (
    build_model,
    in_distribution_info,
    load_in_distribution,
    load_outliers,
)
from oodbench.losses import LOSSES, OUTLIER_TARGET, Criterion
from oodbench.progress import EpochStats, StepReporter
from oodbench.runs import Run, load_weights

MAX_STEP_SEED = 2**62
OUTLIER_SEED_SALT = 0x0E0E0E0E  # separates the outlier draw's seed from the step's


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
    """Mask of rows with one hard class: all of (B,) but auxiliary outliers (target -1), or
    rows of (B, 4) quadrant classes that agree (DisMax's clean half); training accuracy is
    counted on those only."""
    if targets.dim() == 1:
        return targets != OUTLIER_TARGET
    return (targets == targets[:, :1]).all(dim=1)


def precision_for(device: torch.device, mixed_precision: bool | None) -> torch.dtype | None:
    """The autocast dtype: bf16 (or fp16 without bf16 support) on CUDA, None elsewhere."""
    if device.type != "cuda" or mixed_precision is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def save_checkpoint(run: Run, state: dict[str, Any]) -> None:
    from oodbench.io import atomic_write

    atomic_write(run.checkpoint_path, lambda p: torch.save(state, p))


class _Trainer:
    """One run's training state and its steps; `train` drives it. Split so each piece (setup,
    resume, a step, an epoch) reads on its own; the arithmetic is the loop's, unchanged."""

    def __init__(self, run: Run, ctx: DataContext, device: torch.device,
                 mixed_precision: bool | None) -> None:
        self.run, self.device = run, device
        self.cfg: RunConfig = run.config()
        t = self.t = self.cfg.benchmark.train
        self.transform = InputTransform.for_model(in_distribution_info(self.cfg))
        self.train_set = load_in_distribution(self.cfg, "train", ctx).to(device)
        self.val_set = load_in_distribution(self.cfg, "val", ctx).to(device)
        torch.manual_seed(self.cfg.seed)
        self.amp_dtype = precision_for(device, mixed_precision)
        self.model = build_model(self.cfg).to(device)
        if self.amp_dtype is not None:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = make_criterion(self.cfg).to(device)
        self.outliers = (load_outliers(self.cfg, ctx).to(device)
                         if self.criterion.needs_outliers else None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=t.lr, momentum=t.momentum,
                                         nesterov=t.nesterov, weight_decay=t.weight_decay)
        self.n = len(self.train_set)
        self.bs = min(t.batch_size, self.n)
        # drop the ragged last batch: BatchNorm needs real batches
        self.steps_per_epoch = max(1, self.n // self.bs)
        ratio = self.cfg.benchmark.outliers.ratio if self.outliers is not None else 0.0
        self.outlier_bs = max(1, round(self.bs * ratio))
        self.epoch, self.step, self.history = 0, 0, []
        self.partial: dict[str, Any] = {"loss_sum": 0.0, "correct": 0.0, "seen": 0}

    def resume(self) -> bool:
        """Load the checkpoint's position; True when the run is already finished."""
        if not self.run.checkpoint_path.exists():
            return False
        state = self.run.require_checkpoint()
        if state.get("finished"):
            self.history = list(state.get("history", []))
            return True
        load_weights(self.model, state["model"], str(self.run.checkpoint_path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.partial = dict(state.get("partial") or self.partial)
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        return False

    def save(self, finished: bool = False) -> None:
        save_checkpoint(self.run, _checkpoint(self.model, self.optimizer, self.epoch, self.step,
                                              self.history, finished, self.partial, self.scaler))

    def train_step(self, perm: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor, int]:
        """One optimiser step on the step's batch; returns (loss, output, targets, batch size)."""
        t = self.t
        torch.manual_seed(step_seed(self.cfg.seed, self.epoch, self.step))
        idx = perm[self.step * self.bs:(self.step + 1) * self.bs]
        x = augment(self.train_set.images[idx], t.crop_padding, t.flip)
        x, targets = self.criterion.preprocess(self.transform(x), self.train_set.labels[idx])
        if self.outliers is not None:
            x, targets = self.with_outliers(x, targets)
        if self.amp_dtype is not None:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(t, self.epoch * self.steps_per_epoch + self.step,
                                        self.steps_per_epoch)
        with (torch.autocast(self.device.type, dtype=self.amp_dtype)
              if self.amp_dtype is not None else contextlib.nullcontext()):
            out = self.model.forward_all(x, aux=self.criterion.aux)
            loss = self.criterion.training_loss(out, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.criterion.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.criterion.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return loss, out, targets, len(idx)

    def with_outliers(self, x: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with this step's auxiliary outliers appended (target -1). The draw has its
        own generator seeded from the step; the augmentation uses the reseeded global RNG after
        the batch's own, so both replay exactly after a resume."""
        assert self.outliers is not None
        g = torch.Generator().manual_seed(
            (step_seed(self.cfg.seed, self.epoch, self.step) + OUTLIER_SEED_SALT) % MAX_STEP_SEED)
        idx = torch.randperm(len(self.outliers), generator=g)[:self.outlier_bs].to(self.device)
        xo = self.transform(augment(self.outliers.images[idx], self.t.crop_padding, self.t.flip))
        yo = torch.full((len(idx),), OUTLIER_TARGET, dtype=targets.dtype, device=targets.device)
        return torch.cat([x, xo.to(x.dtype)]), torch.cat([targets, yo])

    def run_epoch(self, reporter: StepReporter, after_step: Callable[[], None]) -> EpochStats:
        """The rest of the current epoch (from a mid-epoch position after a resume)."""
        dev = self.device
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            step_seed(self.cfg.seed, self.epoch))).to(dev)
        self.model.train()
        self.criterion.train()
        p = self.partial
        loss_sum = torch.full((), p["loss_sum"], device=dev, dtype=torch.float64)
        correct = torch.full((), p["correct"], device=dev, dtype=torch.float64)
        seen, counted = int(p["seen"]), int(p.get("counted", p["seen"]))
        seen_now, tic = 0, time.perf_counter()  # images this call, for the speed
        while self.step < self.steps_per_epoch:
            loss, out, targets, k = self.train_step(perm)
            seen, seen_now = seen + k, seen_now + k
            loss_sum += loss.detach().double() * k
            clean = clean_rows(targets)
            counted += int(clean.sum())
            hard = targets if targets.dim() == 1 else targets[:, 0]
            correct += ((out.logits.detach().argmax(1) == hard) & clean).sum()
            reporter.step(float(loss.detach()), float(correct) / max(counted, 1),
                          seen_now / max(time.perf_counter() - tic, 1e-9))
            self.partial = {"loss_sum": float(loss_sum), "correct": float(correct),
                            "seen": seen, "counted": counted}
            after_step()
        return EpochStats(self.epoch + 1, float(loss_sum) / max(seen, 1),
                          float(correct) / max(counted, 1),
                          evaluate_accuracy(self.model, self.val_set, self.transform),
                          seen_now / max(time.perf_counter() - tic, 1e-9))


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
    tr = _Trainer(run, ctx, device, mixed_precision)
    if tr.resume():
        return tr.history
    reporter = reporter or StepReporter()
    reporter.start(tr.t.epochs, tr.steps_per_epoch, tr.epoch, tr.step)
    calls = {"steps": 0, "saved": time.monotonic()}

    def after_step() -> None:
        calls["steps"] += 1
        if on_step:
            on_step(calls["steps"])
        if stop_after_steps is not None and calls["steps"] >= stop_after_steps:
            raise KeyboardInterrupt
        if time.monotonic() - calls["saved"] > tr.t.checkpoint_seconds:
            tr.save()
            calls["saved"] = time.monotonic()

    try:
        while tr.epoch < tr.t.epochs:
            stats = tr.run_epoch(reporter, after_step)
            tr.history.append(stats.__dict__)
            tr.epoch, tr.step = tr.epoch + 1, 0
            tr.partial = {"loss_sum": 0.0, "correct": 0.0, "seen": 0, "counted": 0}
            tr.save(finished=tr.epoch >= tr.t.epochs)
            calls["saved"] = time.monotonic()
            reporter.epoch_end(stats)
    except KeyboardInterrupt:
        tr.save()
        raise
    sets = {"train": tr.train_set, "val": tr.val_set}
    if tr.outliers is not None:
        sets["outliers"] = tr.outliers
    write_manifest(run, device, sets, tr.history)
    return tr.history


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
