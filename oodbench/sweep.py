"""`oodbench run --jobs N`: the independent (loss × seed) runs of a benchmark as N parallel
processes, each the same three commands a user would type (`train`, `calibrate`, `score` on its
run folder), so a sweep is nothing but the ordinary, resumable steps. A run whose results are
complete is skipped, and so is one another process holds (`Run.hold`: this process holds each
run for its three children, so a concurrent `run` cannot calibrate or score it twice); an
unfinished one resumes from its checkpoint. Each job's output goes to `<run>/job.log`; its
current step is reported through `on_status`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from oodbench.data import DataContext
from oodbench.distributed import refuse_under_torchrun
from oodbench.pipeline import run_state
from oodbench.runs import HELD_BY_PARENT, Run, RunInUse
from oodbench.workflow import BenchmarkRequest, prepared_runs, run_label

Status = Callable[[str, str], None]  # (run label, step) → shown by the CLI


def is_complete(run: Run) -> bool:
    """Trained, calibrated and scored for every benchmark detector and set on the current
    weights (`pipeline.run_state`: by content, the same test the single-process `run` uses)."""
    return run_state(run).scored


@dataclass
class Job:
    run: Run
    steps: list[tuple[str, list[str]]]
    returncode: int | None = None
    failed_step: str = ""
    held_by: str = ""  # set when another process was training the run: the job did not start
    label: str = ""  # `loss/seedN`, or an imported checkpoint's name (`workflow.run_label`)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.run.path / "job.log"


def _job(run: Run, ctx: DataContext, device: str, label: str, compile_model: bool = False,
         imported: bool = False) -> Job:
    """`imported`: the run holds imported weights (a benchmark's `checkpoints:`), so there is
    no training step."""
    common = ["--data-root", str(ctx.root), "--device", device]
    base = [sys.executable, "-m", "oodbench"]
    path = str(run.path)
    train = [*base, "train", "--run-dir", path, *common, *(["--compile"] if compile_model else [])]
    return Job(run, [*([] if imported else [("training", train)]),
                     ("calibrating", [*base, "calibrate", path, *common]),
                     ("scoring", [*base, "score", path, *common])], label=label)


def _execute(job: Job, env: dict[str, str], on_status: Status) -> None:
    """The job's steps, with its run folder held for all three: its children are told the
    hold is theirs, and no other `oodbench` process can train, calibrate or score it meanwhile."""
    try:
        with job.run.hold() as fd:  # the children inherit the lock: killing this process alone
            _steps(job, {**env, HELD_BY_PARENT: str(job.run.path.resolve())}, on_status,
                   () if fd is None else (fd,))  # leaves the running child holding it
    except RunInUse as e:  # another `oodbench` process holds it: leave it to that one
        job.held_by = e.holder or "another process"
        on_status(job.label, f"skipped: in use by {job.held_by}")


def _steps(job: Job, env: dict[str, str], on_status: Status, fds: tuple[int, ...]) -> None:
    with open(job.log, "a") as log:
        for step, argv in job.steps:
            on_status(job.label, step)
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            job.returncode = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, pass_fds=fds, check=False).returncode
            if job.returncode:
                job.failed_step = step
                on_status(job.label, f"failed while {step} (exit {job.returncode}; {job.log})")
                return
    on_status(job.label, "done")


def run_sweep(req: BenchmarkRequest, ctx: DataContext, device: str, jobs: int,
              on_status: Status) -> tuple[Path, list[Job]]:
    """Run the benchmark's unfinished runs, `jobs` at a time; returns the benchmark's runs
    folder and the jobs that ran (each with its return code)."""
    refuse_under_torchrun("oodbench run --jobs")
    bench, runs = prepared_runs(req, ctx, lambda message: on_status("import", message))
    todo = []
    for run in runs:
        if not req.rescore and is_complete(run):
            on_status(run_label(bench, run), "complete: skipped")
        else:
            todo.append(_job(run, ctx, device, run_label(bench, run), req.compile_model,
                             imported=bool(bench.checkpoints)))
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    pending, active = list(todo), []
    while pending or active:
        active = [t for t in active if t.is_alive()]
        while pending and len(active) < jobs:
            t = threading.Thread(target=_execute, args=(pending.pop(0), env, on_status))
            t.start()
            active.append(t)
        time.sleep(0.2)
    return runs[0].path.parent, todo
