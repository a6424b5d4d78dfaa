"""oodbench.io under real conditions: file modes under a umask, concurrent read-merge-writes
from real processes, stale temporaries of dead processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oodbench import io
from oodbench.io import (
    atomic_write,
    current_umask,
    locked,
    remove_stale_temps,
    temp_tag,
    update_json,
    write_json,
    write_text,
)


@pytest.fixture
def umask():
    """Set a umask for the test; the original is restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_gets_the_mode_open_would_give(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    write_json(tmp_path / "metrics.json", {"a": 1})
    with open(tmp_path / "plain.txt", "w"):
        pass
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == mode


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "report.md"
    write_text(path, "one")
    path.chmod(0o640)
    write_text(path, "two")
    assert path.read_text() == "two" and path.stat().st_mode & 0o777 == 0o640


def test_the_umask_fallback_without_proc_agrees(tmp_path, umask, monkeypatch):
    umask(0o027)
    monkeypatch.setattr(io, "Path", lambda p: tmp_path / "no-such-status")
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # the fallback restored it


def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"old": True})

    def broken(p: Path) -> None:
        p.write_text("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def _add_keys(path: str, worker: int, n: int) -> None:
    """Add keys w<worker>-<i> one update at a time; the merge sleeps to widen the window in
    which an unlocked read-merge-write loses another process's key."""
    for i in range(n):
        def merge(old, i=i):
            time.sleep(0.002)
            return {**(old or {}), f"w{worker}-{i}": i}
        update_json(Path(path), merge)


def test_concurrent_update_json_from_processes_loses_nothing(tmp_path):
    path = tmp_path / "metrics.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_add_keys, args=(str(path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(path.read_text())
    assert sorted(data) == sorted(f"w{w}-{i}" for w in range(4) for i in range(25))
    assert {p.name for p in tmp_path.iterdir()} == {"metrics.json", "metrics.json.lock"}


def _unlocked_add_keys(path: str, worker: int, n: int) -> None:
    for i in range(n):
        p = Path(path)
        old = json.loads(p.read_text()) if p.exists() else {}
        time.sleep(0.002)
        write_json(p, {**old, f"w{worker}-{i}": i})


def test_the_race_is_real_without_the_lock(tmp_path):
    """The same workload without `locked` loses keys: the test above can fail."""
    path = tmp_path / "metrics.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_unlocked_add_keys, args=(str(path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert len(json.loads(path.read_text())) < 100


def test_a_process_waits_for_the_lock(tmp_path):
    path = tmp_path / "metrics.json"
    code = ("import sys; from pathlib import Path; from oodbench.io import update_json; "
            "update_json(Path(sys.argv[1]), lambda old: {**(old or {}), 'child': 1})")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with locked(path):
        write_json(path, {"parent": 1})
        child = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env)
        time.sleep(1.0)
        assert child.poll() is None  # blocked on the lock
        assert json.loads(path.read_text()) == {"parent": 1}
    assert child.wait(60) == 0
    assert json.loads(path.read_text()) == {"parent": 1, "child": 1}


def test_an_unreadable_file_is_kept_aside(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("{hand-edited, broken")
    seen = []
    update_json(path, lambda old: seen.append(old) or {"new": 1})
    assert seen == [None]
    assert json.loads(path.read_text()) == {"new": 1}
    assert (tmp_path / "metrics.json.unreadable").read_text() == "{hand-edited, broken"


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = dead_pid()
    host = temp_tag().rsplit("-", 1)[1]
    files = {
        "dead_old_style": f"logits.npy.tmp-{dead}",
        "dead": f"features.npy.tmp-{dead}-{host}",
        "dead_labels": f"labels.npy.tmp-{dead}-{host}.npy",
        "dead_atomic": f".metrics.json.abc123.tmp-{dead}-{host}",
        "live": f"logits.npy{temp_tag()}",
        "other_host": f"logits.npy.tmp-{dead}-0badc0de",
        "data": "logits.npy",
        "not_a_temp": f"notes.tmp-{dead}.txt",
    }
    for name in files.values():
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temps(tmp_path)
    gone = {"dead_old_style", "dead", "dead_labels", "dead_atomic"}
    assert sorted(p.name for p in removed) == sorted(files[k] for k in gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        v for k, v in files.items() if k not in gone)


def test_atomic_write_temporaries_name_their_writer(tmp_path):
    names = []
    atomic_write(tmp_path / "x.json", lambda p: names.append(p.name) or p.write_text("{}"))
    assert names[0].startswith(".x.json.") and names[0].endswith(temp_tag())
