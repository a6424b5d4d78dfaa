"""Measure the data pipeline: first decode and later loads of CIFAR-10-JPEG, and the share of a
ResNet-18 training step spent on loading + augmentation (gather a batch from the device-resident
uint8 set, random crop with padding 4, flip, normalise).

Targets (issue 3, on a CPU): first decode of the 60k images < 60 s, later loads < 2 s, loading +
augmentation <= 5 % of a ResNet-18 step.

    PYTHONPATH=. python benchmarks/speed_data.py --data-root ../shared/data [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    from oodbench.data import DataContext, InputTransform, augment, get_dataset
    from oodbench.experiment import pick_device
    from oodbench.losses import LOSSES
    from oodbench.models import build_classifier

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--cache-root", default=None,
                    help="default: a fresh temporary folder, so the first decode is measured")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory() if args.cache_root is None else None
    ctx = DataContext.resolve(args.data_root, args.cache_root or tmp.name)
    src = get_dataset("cifar10-jpeg")
    print(f"torch threads {torch.get_num_threads()}, data root {Path(ctx.root).resolve()}")

    first, _ = timed(lambda: [src.load(s, ctx) for s in ("train", "test")])
    later, sets = timed(lambda: [src.load(s, ctx) for s in ("train", "test")], repeat=3)
    n = sum(len(s) for s in sets)
    print(f"cifar10-jpeg: first load (decode {n} images) {first:.1f} s; later loads "
          f"{later:.2f} s (target < 60 s / < 2 s)")

    dev = pick_device(args.device)
    train = sets[0].to(dev)
    tf = InputTransform.for_model(src.info)
    model = build_classifier("resnet18", LOSSES.get("softmax").head, 10, 3, 32).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    bs = args.batch_size
    g = torch.Generator().manual_seed(0)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def data_step() -> torch.Tensor:
        idx = torch.randint(0, len(train), (bs,), generator=g).to(dev)
        x = tf(augment(train.images[idx], crop_padding=4, flip=True))
        sync()
        return x

    x = data_step()
    y = torch.randint(0, 10, (bs,), device=dev)

    def train_step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    train_step()  # warm-up
    d = [timed(data_step)[0] for _ in range(args.steps)]
    s = [timed(train_step)[0] for _ in range(args.steps)]
    dm, sm = statistics.median(d), statistics.median(s)
    print(f"device {dev}, batch {bs}: load+augment {dm * 1e3:.1f} ms, ResNet-18 step "
          f"{sm * 1e3:.0f} ms -> data share {dm / (dm + sm):.2%} (target <= 5 %)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
