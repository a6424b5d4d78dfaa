"""One training epoch on CIFAR-10-JPEG: oodbench's loop (the whole training set on the device as
uint8, each batch gathered by index and augmented with batched tensor ops: the trainer's own
`train_step`) against the conventional loop of the papers' code (a torchvision-style dataset of
PIL images, RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, in a
DataLoader with shuffle and num_workers=2). Same model, same initial weights, batch 128,
cross-entropy, SGD; the same images, loaded through oodbench's dataset code.

The two loops run in one process, alternating in blocks of steps. Not step by step: the
DataLoader's workers would then prepare the next batches while oodbench's step runs, hiding
their cost and slowing the other loop. A block's first steps are not timed (the conventional
loop's batches already prefetched by its workers; oodbench's first step, while those workers
refill their queue). Medians of the timed steps give the ratio and the epoch time extrapolated
to an epoch's steps (50 000 // 128).

    PYTHONPATH=. python benchmarks/speed_epoch.py --data-root ../shared/data \
        [--model resnet18] [--steps 30] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

WORKERS, PREFETCH = 2, 2  # the papers' num_workers; torch's default prefetch_factor


class PilDataset(Dataset):
    """What torchvision.datasets.CIFAR10 does: HWC uint8 arrays, a PIL image per sample, then
    the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def oodbench_step(args: argparse.Namespace, ctx, run_dir: Path, device: torch.device
                  ) -> tuple[Callable[[], float], object]:
    """The trainer's own step on a run of the cifar10-jpeg benchmark with `--model`."""
    from oodbench.experiment import load_checked_benchmark
    from oodbench.runs import Run
    from oodbench.train import _Trainer  # the loop's own step, not a copy of it
    from oodbench.workflow import run_config

    bench = load_checked_benchmark("cifar10-jpeg")
    bench.model, bench.train.batch_size = args.model, args.batch
    tr = _Trainer(Run.create(run_dir, run_config(bench, "softmax", 0)), ctx, device, args.amp)
    tr.model.train()
    state = {"perm": torch.randperm(tr.n, device=device)}

    def wrap() -> None:
        if tr.step >= tr.steps_per_epoch:
            tr.epoch, tr.step = tr.epoch + 1, 0
            state["perm"] = torch.randperm(tr.n, device=device)

    def step() -> float:
        wrap()
        tic = time.perf_counter()
        tr.train_step(state["perm"])
        _sync(device)
        return time.perf_counter() - tic

    def data() -> float:
        """The step's data side alone: the trainer's own `next_batch`."""
        wrap()
        tic = time.perf_counter()
        tr.next_batch(state["perm"])
        _sync(device)
        tr.step += 1
        return time.perf_counter() - tic

    return step, data, tr


def conventional_step(args: argparse.Namespace, tr, device: torch.device
                      ) -> tuple[Callable[[], float], Callable[[], float]]:
    """The papers' loop over the same training images, with a fresh copy of the same model."""
    import torchvision.transforms as T

    from oodbench.experiment import build_model

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(tr.transform.mean, tr.transform.std)])
    images = tr.train_set.images.permute(0, 2, 3, 1).cpu().contiguous().numpy()
    loader = DataLoader(PilDataset(images, tr.train_set.labels.cpu().numpy(), tf),
                        batch_size=args.batch, shuffle=True, num_workers=WORKERS,
                        prefetch_factor=PREFETCH, drop_last=True, persistent_workers=True,
                        pin_memory=device.type == "cuda")
    torch.manual_seed(tr.cfg.seed)
    model = build_model(tr.cfg).to(device).train()
    layout = torch.channels_last if tr.amp_dtype is not None else torch.contiguous_format
    model = model.to(memory_format=layout)
    t = tr.t
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                          nesterov=t.nesterov, weight_decay=t.weight_decay)
    batches = _forever(loader)

    def step() -> float:
        tic = time.perf_counter()
        x, y = next(batches)
        x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
        y = y.to(device, non_blocking=True)
        with _autocast(device, tr.amp_dtype):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - tic

    def data() -> float:
        """The loader alone: how fast its workers deliver batches when nothing else runs."""
        tic = time.perf_counter()
        x, y = next(batches)
        x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _sync(device)
        return time.perf_counter() - tic

    return step, data


def _forever(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def _autocast(device: torch.device, dtype: torch.dtype | None):
    import contextlib

    return (torch.autocast(device.type, dtype=dtype) if dtype is not None
            else contextlib.nullcontext())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(steps: dict[str, Callable[[], float]], skip: dict[str, int], total: int,
            block: int) -> dict[str, list[float]]:
    """`total` timed steps of each loop, in alternating blocks of `block` timed steps, each
    block after `skip[name]` untimed ones."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    while min(len(t) for t in times.values()) < total:
        for name in order:
            for _ in range(skip[name]):
                steps[name]()
            for _ in range(min(block, total - len(times[name]))):
                times[name].append(steps[name]())
        order.reverse()  # neither loop always runs right after the other's block
    return times


def main() -> None:
    from oodbench.data import DataContext
    from oodbench.experiment import pick_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--cache-root", default=None, help="decoded-data cache (default: oodbench's)")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each loop")
    ap.add_argument("--block", type=int, default=10, help="timed steps per block")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast + channels_last for both (default: on for CUDA)")
    args = ap.parse_args()
    device = pick_device(args.device)
    ctx = DataContext.resolve(args.data_root, args.cache_root)
    with tempfile.TemporaryDirectory() as tmp:
        ours, ours_data, tr = oodbench_step(args, ctx, Path(tmp) / "run", device)
        theirs, theirs_data = conventional_step(args, tr, device)
        ours(), theirs()  # warm-up (the workers start, allocators settle)
        skip = {"oodbench": 1, "conventional": WORKERS * PREFETCH}
        times = measure({"oodbench": ours, "conventional": theirs}, skip,
                        args.steps, max(1, args.block))
        data = measure({"oodbench": ours_data, "conventional": theirs_data}, skip,
                       args.steps, max(1, args.block))
    report(args, device, times, data)


def report(args: argparse.Namespace, device: torch.device, times: dict[str, list[float]],
           data: dict[str, list[float]]) -> None:
    epoch_steps = 50_000 // args.batch
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.model}, batch {args.batch}, {device}, {torch.get_num_threads()} threads, "
          f"conventional loader: {WORKERS} workers; medians of {args.steps} timed steps each")
    for name, m in med.items():
        print(f"  {name:13s} {m * 1000:8.1f} ms/step   epoch ({epoch_steps} steps) "
              f"≈ {m * epoch_steps / 60:.1f} min")
    print(f"  conventional / oodbench: {med['conventional'] / med['oodbench']:.2f}×")
    print("data side alone (no model step between batches): the fastest each loop could train")
    for name, t in data.items():
        m = statistics.median(t)
        print(f"  {name:13s} {m * 1000:8.1f} ms/batch  {args.batch / m:9.0f} images/s  "
              f"({100 * m / med[name]:.1f} % of its step here)")


if __name__ == "__main__":
    main()
