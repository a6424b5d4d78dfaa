"""A run folder is held while a process trains it: a second process gets a clear refusal (exit
2, naming the holder) from `train`, and `run` leaves that run to its holder and does the rest.
The holder here is a real second process, as in a user's two terminals or two CI jobs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
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
    cfg = yaml.safe_load((REPO / "benchmarks" / "digits.yaml").read_text())
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
