"""Safe file writes: a reader never sees a half-written file, an interrupted write leaves the
previous version intact, and concurrent read-merge-writes of one file do not lose each other.

- `atomic_write` writes a temporary file beside the target and renames it over the target. The
  temporary's name carries the writer's PID and host (`.<name>.<random>.tmp-<pid>-<host>`), so
  the leftovers of a killed process can be told from a live writer's (`remove_stale_temps`).
  The final file gets the permissions a plain `open(path, "w")` gives: those of the file it
  replaces, or 0o666 less the umask for a new file (mkstemp's 0600 would hide reports from
  teammates and CI artifact servers).
- `locked(path)` holds an exclusive `fcntl.flock` on the sidecar `<path>.lock` (never deleted:
  removing a lock file while another process waits on it would let two holders in). Where
  `fcntl` does not exist (Windows) it does not lock: concurrent updates are then unsafe there.
- `update_json(path, merge)` is the read-merge-write of a JSON file under that lock.
- `held_now(path)` takes such a lock without waiting: a second holder gets `Busy`, naming the
  first (its PID and host, written into the lock file). A run folder is held this way while it
  trains, so two processes never train one run into one checkpoint. `holder_of(path)` asks who
  holds it, writing nothing.
- Under torchrun only rank 0 writes: the writers here refuse another rank's write
  (`oodbench.distributed.check_may_write`), and other ranks never remove temporaries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from oodbench.distributed import check_may_write, is_main_process

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; `locked` degrades to no lock
    fcntl = None  # type: ignore[assignment]

# The host part of a temporary's name: a PID says nothing about a process on another machine
# (or in another PID namespace) sharing the folder, so only this host's temporaries are judged.
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# ".tmp-<pid>" optionally followed by "-<host>"; older names (no host) count as this host's.
TEMP_TAG = re.compile(r"\.tmp-(\d+)(?:-([0-9a-f]{8}))?(?:\.npy)?$")


def temp_tag() -> str:
    """The suffix naming this process's temporary files (see `remove_stale_temps`)."""
    return f".tmp-{os.getpid()}-{HOST}"


def current_umask() -> int:
    """The process umask. Read from /proc/self/status where Linux offers it; elsewhere by
    setting and restoring it, which is racy against threads creating files at that instant
    (acceptable in a CLI; a library user with such threads should run on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _final_mode(path: Path) -> int:
    """The permission bits `open(path, "w")` leaves: the existing file's, else 0o666 & ~umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, then rename tmp over `path` (same folder: an atomic rename)."""
    path = Path(path)
    check_may_write(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=temp_tag(), dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def lock_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".lock")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (through `<path>.lock`) for the block's duration.

    Blocks until other holders (processes or threads) release it. Not re-entrant: taking it
    again inside the block deadlocks. The lock dies with its holder, so a killed process never
    leaves it held."""
    if fcntl is None:
        yield
        return
    side = lock_path(path)
    check_may_write(side)
    side.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(side, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class Busy(Exception):
    """`held_now` found the lock held by another process (or another open in this one)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder  # "pid N on HOST", or "" when the holder wrote nothing yet


def _holder_text(fd: int) -> str:
    words = os.pread(fd, 200, 0).decode(errors="replace").split()
    return f"pid {words[0]} on {words[1]}" if len(words) >= 2 else ""


def holder_of(path: Path) -> str | None:
    """Who holds the lock file `path` ("pid N on HOST", or "" when it wrote nothing yet), or
    None when nobody does. A probe that writes nothing: no file is created and no PID is
    written, so `run --dry-run` can ask it of every run. Without `fcntl` (Windows): None."""
    if fcntl is None:
        return None
    try:  # opened for writing, as fcntl-emulated flock (NFS) needs for LOCK_EX; never written
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None  # a holder creates the file first
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the close below
    except BlockingIOError:
        return _holder_text(fd)
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def held_now(path: Path) -> Iterator[int | None]:
    """Hold the lock file `path` exclusively for the block, or raise `Busy` at once if another
    holder has it. The holder's PID and host are written into the file for that message; the
    lock dies with its process. Yields the lock's file descriptor: a child process given it
    (`subprocess`'s `pass_fds`) keeps the lock held should this process die first. Without
    `fcntl` (Windows) nothing is held and None is yielded."""
    if fcntl is None:
        yield None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(_holder_text(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def update_json(path: Path, merge: Callable[[Any | None], Any]) -> Any:
    """Read `path`, write `merge(old)` atomically, all under `locked(path)`; return what was
    written. `old` is None when the file is missing or not valid JSON; an unreadable file is
    kept as `<path>.unreadable` rather than silently lost."""
    path = Path(path)
    with locked(path):
        old = None
        if path.exists():
            try:
                old = read_json(path)
            except (ValueError, UnicodeDecodeError):
                os.replace(path, path.with_name(path.name + ".unreadable"))
        new = merge(old)
        write_json(path, new)
        return new


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files in `folder` (not below) left by dead processes of this host:
    a writer killed with SIGKILL cannot clean up after itself. Files of live processes, of
    other hosts, and everything else are left alone. Returns the files removed."""
    removed: list[Path] = []
    if not is_main_process():  # another rank of a torchrun job: rank 0 cleans
        return removed
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = TEMP_TAG.search(e.name)
        if m is None or ".tmp-" not in e.name or not e.is_file(follow_symlinks=False):
            continue
        if (m.group(2) or HOST) != HOST or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):  # another cleaner was quicker
            os.unlink(e.path)
            removed.append(Path(e.path))
    return removed
