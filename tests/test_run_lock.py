"""A run folder is held while a process trains it: a second process gets a clear refusal (exit
2, naming the holder) from `train`, and `run` leaves that run to its holder and does the rest.
The holder here is a real second process, as in a user's two terminals or two CI jobs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import make_digits_run
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.io import Busy, held_now
from oodbench.runs import Run

REPO = Path(__file__).resolve().parent.parent
HOLD = ("import sys\nfrom oodbench.io import held_now\n"
        "with held_now(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n")


@contextmanager
def held_elsewhere(lock: Path) -> Iterator[subprocess.Popen]:
    """Another process holding `lock` until the block ends."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _bench(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
    cfg.update(name="locks", detectors=["msp"], losses=["softmax", "isomax"], seeds=[0])
    cfg["train"]["epochs"] = 1
    path = tmp_path / "locks.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_second_holder_is_refused_at_once_and_told_who_holds(tmp_path):
    lock = tmp_path / "run.lock"
    with held_now(lock), pytest.raises(Busy) as busy, held_now(lock):
        pass
    assert busy.value.holder == f"pid {os.getpid()} on {socket.gethostname()}"
    with held_now(lock):  # released when the block ended
        pass


def test_a_run_held_by_another_process_is_in_use_until_that_process_dies(tmp_path):
    run = Run(tmp_path / "run")
    with held_elsewhere(run.path / "run.lock") as proc:
        assert run.in_use() == f"pid {proc.pid} on {socket.gethostname()}"
        proc.kill()  # killed, not released: the kernel drops the lock with the process
        proc.wait()
        assert run.in_use() is None
    lock = run.path / "run.lock"
    text = lock.read_text()
    assert run.in_use() is None and lock.read_text() == text  # asking writes nothing
    lock.unlink()
    assert run.in_use() is None and not lock.exists()  # ... nor creates the file
    with run.hold():
        assert run.in_use() is None  # this process's own hold is not "in use"
        with run.hold():  # re-entrant
            pass


@pytest.mark.slow
def test_train_exits_2_naming_the_holder_and_run_leaves_the_held_run_alone(tmp_path):
    bench = _bench(tmp_path)
    held = tmp_path / "runs" / "locks" / "softmax-seed0"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with held_elsewhere(held / "run.lock") as holder:
        r = subprocess.run([sys.executable, "-m", "oodbench", "train", "--benchmark", str(bench),
                            "--loss", "softmax", "--run-dir", str(held)],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        out = " ".join((r.stdout + r.stderr).split())
        assert f"pid {holder.pid}" in out and "is in use by" in out and "fix:" in out
        assert not (held / "checkpoint.pt").exists()
        r2 = CliRunner().invoke(app, ["run", str(bench), "--runs-root", str(tmp_path / "runs")],
                                catch_exceptions=False)
    assert r2.exit_code == 0, r2.output
    text = " ".join(r2.output.split())
    assert f"skipped locks/softmax/seed0: in use by pid {holder.pid}" in text
    assert "run this command again" in text
    assert not (held / "checkpoint.pt").exists()
    other = tmp_path / "runs" / "locks" / "isomax-seed0" / "metrics.json"
    assert set(json.loads(other.read_text())["detectors"]) == {"msp"}


PROBE = """import os, sys
from pathlib import Path
from oodbench.runs import HELD_BY_PARENT, Run
run = Run(Path(sys.argv[1]))
with run.hold():  # the parent's hold covers this child: no refusal
    pass
os.environ.pop(HELD_BY_PARENT)  # as any other process sees the folder
print("held by", run.in_use())
"""


def test_run_jobs_holds_each_run_for_all_three_of_its_child_steps(tmp_path):
    """The sweep's parent holds the run folder while its train, calibrate and score children
    work on it: each child may hold it (told through the environment), every other process
    finds it in use, so a concurrent `run` cannot calibrate or score it a second time."""
    from oodbench.sweep import Job, _execute

    run = make_digits_run(tmp_path / "run", train=False)
    probe = [sys.executable, "-c", PROBE, str(run.path)]
    job = Job(run, [("training", probe), ("calibrating", probe), ("scoring", probe)])
    seen: list[str] = []
    _execute(job, {**os.environ, "PYTHONPATH": str(REPO)}, lambda label, step: seen.append(step))
    assert job.returncode == 0 and seen == ["training", "calibrating", "scoring", "done"]
    log = (run.path / "job.log").read_text()
    assert log.count(f"held by pid {os.getpid()} on {socket.gethostname()}") == 3, log
    assert run.in_use() is None  # released when the job ended


def test_a_sweep_job_leaves_a_run_another_process_holds(tmp_path):
    from oodbench.sweep import Job, _execute

    run = make_digits_run(tmp_path / "run", train=False)
    job = Job(run, [("training", [sys.executable, "-c", "raise SystemExit(3)"])])
    seen: list[str] = []
    with held_elsewhere(run.path / "run.lock") as proc:
        _execute(job, dict(os.environ), lambda label, step: seen.append(step))
    assert job.returncode is None and job.held_by == f"pid {proc.pid} on {socket.gethostname()}"
    assert seen == [f"skipped: in use by {job.held_by}"]


SWEEP_PARENT = """import os, sys, time
from pathlib import Path
from oodbench.runs import Run
from oodbench.sweep import Job, _execute
run, ready = Run(Path(sys.argv[1])), sys.argv[2]
child = [sys.executable, "-c", "import os, sys, time; "
         "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)", ready]
_execute(Job(run, [("training", child)]), dict(os.environ), lambda label, step: None)
"""


def test_a_sweep_child_keeps_the_run_held_when_its_parent_is_killed(tmp_path):
    """`kill` of the `run --jobs` process alone leaves its training child running: the child
    inherited the lock, so no other `run` starts training the same folder beside it."""
    run = make_digits_run(tmp_path / "run", train=False)
    ready = tmp_path / "child.pid"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", SWEEP_PARENT, str(run.path), str(ready)],
                              env=env)
    child = None
    try:
        while not (ready.exists() and ready.read_text()):
            assert parent.poll() is None, "the sweep parent died before starting its child"
            time.sleep(0.05)
        child = int(ready.read_text())
        parent.kill()
        parent.wait()
        assert run.in_use() is not None  # the child, still running, holds it
    finally:
        parent.kill()
        if child is not None:
            os.kill(child, signal.SIGKILL)
    for _ in range(100):  # the kernel drops the lock once the child is gone
        if run.in_use() is None:
            break
        time.sleep(0.05)
    assert run.in_use() is None
