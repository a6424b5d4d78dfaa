"""Training loop: the whole training set lives on the device as uint8; each step gathers a batch
by index, augments it with batched tensor ops and normalises it, so no per-sample Python runs.

Resumable and reproducible: the epoch's shuffle comes from a generator seeded by (seed, epoch),
and every step reseeds the global RNG from (seed, epoch, step) before its augmentation and loss
preprocessing. A checkpoint (every epoch, every `checkpoint_seconds` mid-epoch, and on Ctrl-C or
SIGTERM) holds weights, optimizer state, BatchNorm statistics and the position, all at a step
boundary (an interrupt mid-step restores the buffers the step's forward changed; the update is
not cut); resuming replays the same random numbers, so a resumed CPU run ends with the same
weights and buffers as an uninterrupted one. The learning rate is a pure function of the global
step, so there is no scheduler state to restore.

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
`compile_model` wraps the training forward in `torch.compile` (off by default).

Under torchrun (`oodbench.distributed`) the model is wrapped in DistributedDataParallel. Every
rank holds the whole training set on its device, draws the same permutation and step seeds, and
takes its contiguous slice of each global batch of `batch_size` (with the crops and flips that
slice gets in the undivided batch, `augment(rows=...)`); the loss of a rank's slice is weighted
by its share, so DDP's gradient average is the global batch's. What differs from one process:
BatchNorm normalises each rank's slice with that slice's statistics (the running statistics are
rank 0's, which DDP broadcasts every step), and batch-level loss preprocessing (DisMax's mosaics)
mixes images within a rank's slice. Running sums (loss, accuracy) are summed over the ranks every
step, validation is sharded and summed, and only rank 0 writes checkpoints and the manifest, so a
checkpoint does not depend on the number of processes and resumes under any.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from oodbench.config import RunConfig, TrainConfig
from oodbench.data import DataContext, ImageSet, InputTransform, augment
from oodbench.distributed import (
    active,
    all_sum,
    broadcast_buffers,
    joined_world,
    main_first,
)
from oodbench.errors import OodbenchError, Terminated
from oodbench.experiment import (
    build_model,
    in_distribution_info,
    load_in_distribution,
    load_outliers,
)
from oodbench.losses import LOSSES, OUTLIER_TARGET, Criterion
from oodbench.models import Classifier, ModelOutput
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
    """Top-1 accuracy. Under torchrun each rank evaluates its contiguous shard and the counts
    are summed, so every rank returns the whole set's accuracy."""
    model.eval()
    lo, hi = joined_world().shard(len(data))
    correct = 0
    for s in range(lo, hi, batch_size):
        e = min(s + batch_size, hi)
        logits = model(transform(data.images[s:e]))
        correct += int((logits.argmax(1) == data.labels[s:e]).sum())
    if active():
        correct = int(all_sum(torch.tensor([correct], device=data.images.device)).item())
    return correct / len(data)


class _ForwardAll(torch.nn.Module):
    """`model.forward_all(x, aux=...)` as a module's `forward`: DistributedDataParallel syncs
    gradients, and torch.compile compiles, through `forward` only, and the loss needs
    forward_all's auxiliary outputs (the log-softmax entropy)."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, aux: tuple[str, ...]) -> ModelOutput:
        return self.model.forward_all(x, aux=aux)


def training_forward(model: Classifier, device: torch.device,
                     compile_model: bool = False) -> torch.nn.Module:
    """The module the loop calls: forward_all, in DDP under torchrun, compiled when asked. The
    checkpoint saves `model` itself, so it holds no wrapper prefixes."""
    fwd: torch.nn.Module = _ForwardAll(model)
    if active():
        from torch.nn.parallel import DistributedDataParallel

        # A convolution over one input channel gets a gradient whose size-1 dimension has
        # another stride than its parameter's: the same memory order, which DDP warns about.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        fwd = DistributedDataParallel(
            fwd, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        fwd = torch.compile(fwd)  # type: ignore[assignment]
    return fwd


@contextlib.contextmanager
def _signals(handlers: dict[signal.Signals, Any]) -> Iterator[None]:
    """Signal handlers for the block (main thread only: Python allows no other)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, h) for sig, h in handlers.items()}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class _StepBoundary:
    """Keeps the checkpoint saved on Ctrl-C or SIGTERM at a step boundary. A step's forward
    updates the BatchNorm running statistics before its optimiser update, so an interrupt in
    its first part restores the module buffers snapshotted at its start (`Trainer.train_step`);
    its commit (the update, the position, the running sums: no collectives) is `deferred`, the
    signal taking effect right after it. `handlers()` installs the signal handlers for this:
    SIGTERM always, SIGINT unless something other than Python's default handler owns it (a
    background job's ignored SIGINT stays ignored)."""

    def __init__(self) -> None:
        self.deferring = False
        self.pending: KeyboardInterrupt | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        stop = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        if not self.deferring:
            raise stop
        self.pending = self.pending or stop

    def handlers(self) -> contextlib.AbstractContextManager[None]:
        sigs = {signal.SIGTERM: self._handle}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            sigs[signal.SIGINT] = self._handle
        return _signals(sigs)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block a Ctrl-C or SIGTERM does not cut: the signal is raised after it."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            stop, self.pending = self.pending, None
            raise stop


def _stop_signals_ignored() -> contextlib.AbstractContextManager[None]:
    """A second Ctrl-C or SIGTERM (or torchrun forwarding the first) must not cut the save
    short."""
    return _signals({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN})


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


def check_batch_split(batch_size: int, processes: int) -> None:
    """Each process's slice of a batch needs 2 images (BatchNorm in training mode)."""
    if batch_size < 2 * processes:
        raise OodbenchError(
            f"a batch of {batch_size} split over {processes} processes leaves fewer than 2 "
            "images per process (BatchNorm needs 2)",
            f"use at most {max(1, batch_size // 2)} processes, or a larger batch_size")


class _Trainer:
    """One run's training state and its steps; `train` drives it. Split so each piece (setup,
    resume, a step, an epoch) reads on its own; the arithmetic is the loop's, unchanged."""

    def __init__(self, run: Run, ctx: DataContext, device: torch.device,
                 mixed_precision: bool | None) -> None:
        self.run, self.device, self.world = run, device, joined_world()
        self.cfg: RunConfig = run.config()
        t = self.t = self.cfg.benchmark.train
        self.transform = InputTransform.for_model(in_distribution_info(self.cfg))
        with main_first():  # rank 0 decodes (and caches) the data; the others then read it
            self.train_set = load_in_distribution(self.cfg, "train", ctx).to(device)
            self.val_set = load_in_distribution(self.cfg, "val", ctx).to(device)
        torch.manual_seed(self.cfg.seed)
        self.amp_dtype = precision_for(device, mixed_precision)
        self.model = build_model(self.cfg).to(device)
        if self.amp_dtype is not None:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = make_criterion(self.cfg).to(device)
        with main_first():
            self.outliers = (load_outliers(self.cfg, ctx).to(device)
                             if self.criterion.needs_outliers else None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=t.lr, momentum=t.momentum,
                                         nesterov=t.nesterov, weight_decay=t.weight_decay)
        self.n = len(self.train_set)
        self.bs = min(t.batch_size, self.n)
        check_batch_split(self.bs, self.world.size)
        # drop the ragged last batch: BatchNorm needs real batches
        self.steps_per_epoch = max(1, self.n // self.bs)
        ratio = self.cfg.benchmark.outliers.ratio if self.outliers is not None else 0.0
        self.outlier_bs = max(1, round(self.bs * ratio))
        self.epoch, self.step, self.history = 0, 0, []
        self.partial: dict[str, Any] = {"loss_sum": 0.0, "correct": 0.0, "seen": 0}
        self.forward: torch.nn.Module = _ForwardAll(self.model)
        self.boundary = _StepBoundary()

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
        """Rank 0 alone writes (atomically); the checkpoint holds the unwrapped model."""
        if self.world.main:
            save_checkpoint(self.run, _checkpoint(self.model, self.optimizer, self.epoch,
                                                  self.step, self.history, finished,
                                                  self.partial, self.scaler))

    def train_step(self, perm: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        """One optimiser step on this rank's slice of the step's batch; adds the step's sums
        (see `step_sums`) to `sums` and returns them. An interrupt before the update leaves the
        model's buffers as they were before the step (`_StepBoundary`)."""
        x, targets, rows, share = self.next_batch(perm)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.t, self.epoch * self.steps_per_epoch + self.step,
                                        self.steps_per_epoch)
        buffers = list(self.model.buffers())
        before = [b.clone() for b in buffers]  # BatchNorm statistics: small
        try:
            step = self.forward_backward(x, targets, rows, share)
        except KeyboardInterrupt:
            with torch.no_grad():
                for b, saved in zip(buffers, before, strict=True):
                    b.copy_(saved)
            raise
        with self.boundary.deferred():
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            sums += step
            loss_sum, correct, seen, counted = sums.tolist()
            self.partial = {"loss_sum": loss_sum, "correct": correct,
                            "seen": int(seen), "counted": int(counted)}
        return step

    def forward_backward(self, x: torch.Tensor, targets: torch.Tensor, rows: int,
                         share: float) -> torch.Tensor:
        """The step's loss and gradients (unscaled and clipped where the loss asks); returns
        the step's sums."""
        with (torch.autocast(self.device.type, dtype=self.amp_dtype)
              if self.amp_dtype is not None else contextlib.nullcontext()):
            out = self.forward(x, self.criterion.aux)
            loss = self.criterion.training_loss(out, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss if share == 1 else loss * share).backward()
        if self.criterion.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.criterion.max_grad_norm)
        return self.step_sums(loss, out, targets, rows)

    def next_batch(self, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """This step's input on the device (this rank's slice of the batch `perm` gives it,
        augmented in one batched call, normalised, with its outliers) and targets; its number of
        in-distribution rows; and the loss weight that keeps unequal slices' gradients exact.
        Seeds the step first, so a resumed run draws the same crops and flips."""
        t = self.t
        torch.manual_seed(step_seed(self.cfg.seed, self.epoch, self.step))
        batch = perm[self.step * self.bs:(self.step + 1) * self.bs]
        lo, hi = self.world.shard(len(batch))
        idx = batch[lo:hi]
        x = augment(self.train_set.images[idx], t.crop_padding, t.flip, rows=(lo, len(batch)))
        x, targets = self.criterion.preprocess(self.transform(x), self.train_set.labels[idx])
        if self.outliers is not None:
            x, targets = self.with_outliers(x, targets)
        if self.amp_dtype is not None:
            x = x.contiguous(memory_format=torch.channels_last)
        share = len(idx) * self.world.size / len(batch)  # 1 unless the slices are unequal
        return x, targets, len(idx), share

    def with_outliers(self, x: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with this step's auxiliary outliers appended (target -1): this rank's slice
        of the step's draw. The draw has its own generator seeded from the step; the
        augmentation uses the reseeded global RNG after the batch's own, so both replay exactly
        after a resume."""
        assert self.outliers is not None
        g = torch.Generator().manual_seed(
            (step_seed(self.cfg.seed, self.epoch, self.step) + OUTLIER_SEED_SALT) % MAX_STEP_SEED)
        drawn = torch.randperm(len(self.outliers), generator=g)[:self.outlier_bs]
        lo, hi = self.world.shard(len(drawn))
        idx = drawn[lo:hi].to(self.device)
        xo = self.transform(augment(self.outliers.images[idx], self.t.crop_padding, self.t.flip,
                                    rows=(lo, len(drawn))))
        yo = torch.full((len(idx),), OUTLIER_TARGET, dtype=targets.dtype, device=targets.device)
        return torch.cat([x, xo.to(x.dtype)]), torch.cat([targets, yo])

    def step_sums(self, loss: torch.Tensor, out: Any, targets: torch.Tensor, k: int
                  ) -> torch.Tensor:
        """(loss × rows, correct, rows, counted rows) of the step, summed over the ranks.
        Accuracy counts only rows with one hard class (`clean_rows`)."""
        clean = clean_rows(targets)
        hard = targets if targets.dim() == 1 else targets[:, 0]
        right = ((out.logits.detach().argmax(1) == hard) & clean).sum()
        rows = torch.full((), float(k), dtype=torch.float64, device=self.device)
        return all_sum(torch.stack([loss.detach().double() * k, right.double(), rows,
                                    clean.sum().double()]))

    def run_epoch(self, reporter: StepReporter, after_step: Callable[[], None]) -> EpochStats:
        """The rest of the current epoch (from a mid-epoch position after a resume)."""
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            step_seed(self.cfg.seed, self.epoch))).to(self.device)
        self.model.train()
        self.criterion.train()
        p = self.partial
        sums = torch.tensor([p["loss_sum"], p["correct"], p["seen"],
                             p.get("counted", p["seen"])], dtype=torch.float64, device=self.device)
        seen_now, tic = 0, time.perf_counter()  # images this call, for the speed
        while self.step < self.steps_per_epoch:
            step = self.train_step(perm, sums)
            step_loss, rows = step[:3:2].tolist()
            seen_now += int(rows)
            reporter.step(step_loss / rows, self.partial["correct"] / max(
                self.partial["counted"], 1), seen_now / max(time.perf_counter() - tic, 1e-9))
            after_step()
        speed = seen_now / max(time.perf_counter() - tic, 1e-9)  # training only, not validation
        broadcast_buffers(self.model)  # rank 0's statistics: the ones the checkpoint holds
        p = self.partial
        return EpochStats(self.epoch + 1, p["loss_sum"] / max(p["seen"], 1),
                          p["correct"] / max(p["counted"], 1),
                          evaluate_accuracy(self.model, self.val_set, self.transform), speed)


def _epochs(tr: _Trainer, reporter: StepReporter, after_step: Callable[[], None],
            calls: dict[str, float]) -> None:
    """The remaining epochs, each ending with a checkpoint."""
    while tr.epoch < tr.t.epochs:
        stats = tr.run_epoch(reporter, after_step)
        with tr.boundary.deferred():  # an interrupt saves the epoch whole or not at all
            tr.history.append(stats.__dict__)
            tr.epoch, tr.step = tr.epoch + 1, 0
            tr.partial = {"loss_sum": 0.0, "correct": 0.0, "seen": 0, "counted": 0}
        tr.save(finished=tr.epoch >= tr.t.epochs)
        calls["saved"] = time.monotonic()
        reporter.epoch_end(stats)


def train(run: Run, ctx: DataContext, device: torch.device,
          reporter: StepReporter | None = None,
          stop_after_steps: int | None = None,
          on_step: Callable[[int], None] | None = None,
          mixed_precision: bool | None = None,
          compile_model: bool = False) -> list[dict[str, Any]]:
    """Train (or resume) the run to the end of its schedule; returns the per-epoch history.

    `stop_after_steps` simulates an interruption (tests): the loop saves a mid-epoch checkpoint
    and raises KeyboardInterrupt after that many steps in this call. `mixed_precision` (default:
    on for CUDA) also switches on channels_last; it is ignored off CUDA. Under torchrun only
    rank 0 reports to `reporter` and writes.
    """
    tr = _Trainer(run, ctx, device, mixed_precision)
    if tr.resume():
        return tr.history
    tr.forward = training_forward(tr.model, device, compile_model)
    reporter = (reporter or StepReporter()) if tr.world.main else StepReporter()
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
        with tr.boundary.handlers():  # SIGTERM saves, as Ctrl-C does
            _epochs(tr, reporter, after_step, calls)
    except KeyboardInterrupt:
        with _stop_signals_ignored():
            tr.save()
        raise
    if tr.world.main:
        sets = {"train": tr.train_set, "val": tr.val_set}
        if tr.outliers is not None:
            sets["outliers"] = tr.outliers
        write_manifest(run, device, sets, tr.history, tr.world.size)
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
                   history: list[dict[str, Any]], processes: int = 1,
                   imported: dict[str, Any] | None = None) -> None:
    """Provenance of the weights: versions, device (and the number of processes of a torchrun
    job), data fingerprints, final numbers; for weights trained elsewhere (`imported`), the
    source they came from instead of training data and epochs."""
    from oodbench.io import write_json
    from oodbench.pipeline import environment

    write_json(run.manifest_path, {
        "environment": {**environment(), "device": str(device), "processes": processes},
        **({"imported": imported} if imported is not None else {}),
        "data": {k: {"name": d.name, "n": len(d), "sha256": d.fingerprint()}
                 for k, d in data.items()},
        "epochs": len(history),
        "final": history[-1] if history else None,
    })
