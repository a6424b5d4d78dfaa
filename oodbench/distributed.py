"""Running under torchrun: which process this is, the process group, and the few collectives the
trainer and the sharded forward pass need.

`torchrun --nproc-per-node N -m oodbench train|score ...` (or `oodbench train --nproc-per-node N`,
which launches it) starts N processes with RANK / WORLD_SIZE / LOCAL_RANK set. Every process runs
the same command; rank 0 alone writes files and prints, the others compute their share and hand
it to rank 0. Outside torchrun (no WORLD_SIZE, or WORLD_SIZE=1) there is one process and every
function here returns at once, so single-process code pays nothing. The backend is gloo on CPU and
nccl on CUDA, where each rank takes the GPU cuda:LOCAL_RANK.

A write by another rank is a bug, and `check_may_write` (called by `oodbench.io`'s writers and
the cache's) turns it into an error instead of two processes writing one file.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from oodbench.errors import OodbenchError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous rows [lo, hi) of n; sizes differ by at most one, lower ranks
        take the extra rows."""
        base, extra = divmod(n, self.size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + int(self.rank < extra)


def world() -> World:
    """From torchrun's environment variables; WORLD_SIZE unset or 1 is a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0") or 0))


def is_main_process() -> bool:
    return world().main


def join(device: torch.device) -> torch.device:
    """The device this rank works on, with the process group joined (once). A no-op for a single
    process. On CUDA each rank takes cuda:LOCAL_RANK, so a device index is refused."""
    w = world()
    if not w.distributed:
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise OodbenchError(f"--device {device} names one GPU, but torchrun started "
                                f"{w.size} processes (each takes cuda:LOCAL_RANK)",
                                "pass --device cuda (or auto)")
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise OodbenchError(f"torchrun runs on CPU (gloo) or CUDA (nccl), not {device.type}",
                            "pass --device cpu or --device cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=w.rank, world_size=w.size)
        atexit.register(_leave)
    return device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_together() -> None:
    """End a command that succeeded on this rank: wait until every rank is done, then tear the
    group down while the interpreter is fully alive. A gloo group left to interpreter shutdown
    can abort a finished rank (SIGABRT from its worker threads), failing a job whose work was
    done. Only on success: after a failure the other ranks may be inside a collective (a
    barrier would hang them), and torchrun stops them anyway."""
    if dist.is_initialized():
        dist.barrier()
        _leave()


def active() -> bool:
    """True in a process of a joined group of more than one process."""
    return world().distributed and dist.is_initialized()


def joined_world() -> World:
    """`world()` once this process has joined its group (`join`), else a single process: code
    that shards its work does so only where the other ranks take part."""
    return world() if active() else World()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks, in place (on the rank's device)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable objects)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the others."""
    if not active():
        return [obj]
    w = world()
    into: list[Any] | None = [None] * w.size if w.main else None
    dist.gather_object(obj, into, dst=0)
    return into


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` run by rank 0 alone, its result given to every rank. Rank 0's `OodbenchError`
    is raised on every rank (each exits 2); another failure makes the other ranks fail too
    rather than wait forever."""
    if not active():
        return fn()
    outcome: tuple[str, Any, Any] = ("ok", None, None)
    if world().main:
        try:
            outcome = ("ok", fn(), None)
        except OodbenchError as e:
            outcome = ("input", e.message, e.hint)
        except BaseException as e:
            broadcast_object(("crash", repr(e), None))
            raise
    kind, value, hint = broadcast_object(outcome)
    if kind == "input":
        raise OodbenchError(value, hint)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, the others after it (for loading data whose decoded cache
    rank 0 may be writing: the others then read the finished file)."""
    if not world().main:
        barrier()
    yield
    if world().main:
        barrier()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank: the buffers the checkpoint holds."""
    if active():
        for b in module.buffers():
            dist.broadcast(b, src=0)


def refuse_under_torchrun(command: str) -> None:
    """For commands that do not split their work across ranks (each rank would write)."""
    if world().distributed:
        raise OodbenchError(f"{command} does not run under torchrun",
                            "run `oodbench train` and `oodbench score` under torchrun, or "
                            f"{command} without it")


def check_may_write(path: Path | str) -> None:
    """Refuse a write by a rank other than 0: only rank 0 writes (see the module docstring)."""
    w = world()
    if not w.main:
        raise RuntimeError(f"rank {w.rank} of {w.size} tried to write {path}; only rank 0 writes "
                           "(a bug in oodbench)")


def launch(argv: list[str], nproc: int) -> int:
    """`python -m oodbench ARGV` as `nproc` processes under torchrun on this machine; its exit
    code. A Ctrl-C reaches torchrun and its workers too: wait for them to stop (rank 0 saves a
    checkpoint), then raise KeyboardInterrupt."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), "-m", "oodbench", *argv]
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        raise
