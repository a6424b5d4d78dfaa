"""A torchrun entry point for tests: train the run folder RUN on the CPU and stop, as a Ctrl-C
would, after STEPS steps (the trainer's `stop_after_steps` hook, which saves a checkpoint).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_interrupt.py RUN STEPS
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from oodbench.data import DataContext
from oodbench.distributed import join
from oodbench.runs import Run
from oodbench.train import train


def main(run_dir: str, steps: int) -> int:
    device = join(torch.device("cpu"))
    try:
        train(Run.open(Path(run_dir)), DataContext.resolve(), device, stop_after_steps=steps)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
