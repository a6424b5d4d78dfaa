"""Datasets read from files in the data root: what they need, whether it is there, checksums.

A `FileSource` lists its `Resource`s (files or folders, relative to the data root, each with the
md5 of the reference copy where one is known). `missing` is an existence check (cheap; used
before every run), `status` also verifies checksums. A folder's checksum follows the shared
data's MD5SUMS convention: md5 of the sorted `md5sum` listing of its files, paths relative to the
data root. Verified checksums are remembered in the cache root, keyed by the files' size and
mtime, so `oodbench data` hashes a large folder only once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from oodbench.data.base import DataContext, DatasetSource
from oodbench.errors import OodbenchError

PRESENT, MISSING, MISMATCH = "present", "missing", "checksum mismatch"


@dataclass(frozen=True)
class Resource:
    path: str  # relative to the data root
    md5: str | None = None
    folder: bool = False


def walk_files(folder: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every regular file under `folder`, sorted by path bytes (the
    MD5SUMS order); dotfiles skipped. One scandir pass: fast on folders of 60k files."""
    out: list[tuple[str, int, int]] = []
    stack = [str(folder)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    stack.append(e.path)
                elif e.is_file():
                    st = e.stat()
                    out.append((e.path, st.st_size, st.st_mtime_ns))
    out.sort(key=lambda t: os.fsencode(t[0]))
    return out


def files_signature(files: list[tuple[str, int, int]]) -> str:
    return hashlib.sha256("\n".join(f"{p}\0{s}\0{m}" for p, s, m in files).encode()).hexdigest()


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def md5_folder(root: Path, folder: Path) -> str:
    lines = "".join(f"{md5_file(Path(p))}  {Path(p).relative_to(root).as_posix()}\n"
                    for p, _, _ in walk_files(folder))
    return hashlib.md5(lines.encode()).hexdigest()


def _stat_files(p: Path, folder: bool) -> list[tuple[str, int, int]]:
    if folder:
        return walk_files(p)
    st = p.stat()
    return [(str(p), st.st_size, st.st_mtime_ns)]


class _ChecksumMemo:
    """md5s already computed, keyed by path and stat signature (a JSON file in the cache root)."""

    def __init__(self, ctx: DataContext) -> None:
        self.path = Path(ctx.cache_root) / "checksums.json"
        try:
            self.data: dict[str, list[str]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def get(self, target: Path, signature: str) -> str | None:
        hit = self.data.get(str(target.resolve()))
        return hit[1] if hit and hit[0] == signature else None

    def put(self, target: Path, signature: str, md5: str) -> None:
        from oodbench.io import write_json

        self.data[str(target.resolve())] = [signature, md5]
        with contextlib.suppress(OSError):  # an unwritable cache only costs recomputation
            write_json(self.path, self.data)


class FileSource(DatasetSource):
    """A dataset made of files under the data root."""

    resources: tuple[Resource, ...] = ()
    obtain: str = ""  # how to get it, shown by `oodbench data` and in missing-data errors

    def resources_for(self, ctx: DataContext) -> tuple[Resource, ...]:
        return self.resources

    def locate(self, ctx: DataContext, rel: str) -> Path:
        return Path(ctx.root) / rel

    def missing(self, ctx: DataContext) -> list[Path]:
        out = []
        for r in self.resources_for(ctx):
            p = self.locate(ctx, r.path)
            ok = p.is_dir() and any(os.scandir(p)) if r.folder else p.is_file()
            if not ok:
                out.append(p)
        return out

    def status(self, ctx: DataContext) -> str:
        if self.missing(ctx):
            return MISSING
        memo = _ChecksumMemo(ctx)
        for r in self.resources_for(ctx):
            if r.md5 is None:
                continue
            p = self.locate(ctx, r.path)
            sig = files_signature(_stat_files(p, r.folder))
            got = memo.get(p, sig)
            if got is None:
                got = md5_folder(Path(ctx.root), p) if r.folder else md5_file(p)
                memo.put(p, sig, got)
            if got != r.md5:
                return MISMATCH
        return PRESENT

    def size_on_disk(self, ctx: DataContext) -> int:
        total = 0
        for r in self.resources_for(ctx):
            p = self.locate(ctx, r.path)
            if (p.is_dir() if r.folder else p.is_file()):
                total += sum(size for _, size, _ in _stat_files(p, r.folder))
        return total

    def how_to_get(self) -> str:
        return self.obtain

    def how_to_get_by_hand(self) -> str:
        """`how_to_get` without the download command: what to say once a download failed."""
        head, sep, rest = self.obtain.partition(", or ")
        return f"get it by hand: {rest}" if sep and "--download" in head else self.obtain

    def require(self, ctx: DataContext, name: str, only: tuple[str, ...] | None = None) -> None:
        """Raise naming every missing file (of the resources `only`, when given), with how to
        get them, unless downloading is allowed and this source can download."""

        def gone() -> list[Path]:
            wanted = None if only is None else {self.locate(ctx, r) for r in only}
            return [p for p in self.missing(ctx) if wanted is None or p in wanted]

        if gone() and ctx.download and self.can_download:
            self.download(ctx)
        if missing := gone():
            raise OodbenchError(
                f"dataset {name!r} is missing under data root {ctx.root}: "
                + ", ".join(str(p) for p in missing),
                f"{self.how_to_get()}; or point --data-root / $OODBENCH_DATA at the folder that "
                "holds it (`oodbench data` shows what is present)")

    can_download = False

    def download(self, ctx: DataContext) -> None:
        raise OodbenchError("this dataset cannot be downloaded automatically", self.how_to_get())
