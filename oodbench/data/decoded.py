"""The on-disk uint8 decode cache: decode a dataset's files once, memory-map the result after.

Decoding 60k JPEGs takes tens of seconds; loading the decoded N×C×H×W uint8 array is a page-cache
read. Entries live under `ctx.cache_root/decoded/<name>/<key>/` (never in the data root, which
may be read-only). The key hashes the dataset name, the decoder version and a *source signature*
(path, size and mtime of every source file), so editing, adding or removing a source file makes
a new entry and the old one is deleted.

Atomicity: an entry is written into a temporary folder named after the writing process and
renamed into place only when complete, so a reader never sees a half-written entry. A decode
interrupted by an exception (Ctrl-C included) deletes its temporary folder; one killed outright
leaves a folder whose process is gone, which the next decode of that dataset removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from oodbench.data.base import DataContext

DECODER_VERSION = 1
TMP_PREFIX = ".tmp-"

Decoded = tuple[np.ndarray, np.ndarray]


def stat_signature(paths: Iterable[Path]) -> str:
    """sha256 over (path, size, mtime) of each file: cheap, and changes when a file changes."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def entry_dir(ctx: DataContext, name: str, signature: str) -> Path:
    key = hashlib.sha256(f"{name}|v{DECODER_VERSION}|{signature}".encode()).hexdigest()[:20]
    return Path(ctx.cache_root) / "decoded" / _safe(name) / key


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(parent: Path, keep: Path) -> None:
    """Delete older entries of this dataset and temp folders of processes that no longer run."""
    for d in parent.iterdir() if parent.is_dir() else []:
        if d == keep or not d.is_dir():
            continue
        if d.name.startswith(TMP_PREFIX):
            try:
                pid = int(d.name[len(TMP_PREFIX):].split("-")[0])
            except ValueError:
                pid = -1
            if pid == os.getpid() or (pid > 0 and _pid_alive(pid)):
                continue
        shutil.rmtree(d, ignore_errors=True)


def _load(entry: Path) -> tuple[torch.Tensor, torch.Tensor]:
    # Copy-on-write mapping: pages are read lazily from the page cache and the tensor is
    # writable without touching the file.
    images = np.load(entry / "images.npy", mmap_mode="c")
    labels = np.load(entry / "labels.npy")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def cached_decode(ctx: DataContext, name: str, signature: str,
                  decode: Callable[[], Decoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded (images uint8 N×C×H×W, labels int64) of `name`, decoding only on a miss."""
    entry = entry_dir(ctx, name, signature)
    if (entry / "meta.json").is_file():
        return _load(entry)
    images, labels = decode()
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"{name}: decoder returned {images.dtype} {images.shape} images, "
                         f"{labels.shape} labels")
    parent = entry.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TMP_PREFIX}{os.getpid()}-{entry.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        np.save(tmp / "images.npy", np.ascontiguousarray(images))
        np.save(tmp / "labels.npy", labels.astype(np.int64))
        # meta.json is written last: its presence marks a complete entry.
        (tmp / "meta.json").write_text(json.dumps(
            {"name": name, "shape": list(images.shape), "decoder_version": DECODER_VERSION,
             "signature": signature}))
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not a concurrent writer's finished entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale(parent, keep=entry)
    return _load(entry)
