"""Content-keyed cache of forward outputs: one forward pass per (weights, data, transform, code).

    <run>/cache/<key>/logits.npy, features.npy, labels.npy, blocks/<block>.<summary>.npy,
                      meta.json

`key` = sha256 of the model weights and buffers, the dataset's pixels and labels, the input
transform, and the code that produces the outputs (the source of the model's backbone and head
modules, of the block summaries and of the input transform, plus the torch version), so an entry
can never be stale: retraining, other data, another transform or edited model code all change
the key. What the key cannot see: a change inside torch's own kernels within one version, or
code the model calls in other files; `CACHE_VERSION` is bumped when the entry layout changes.

A detector's derived output (`oodbench.detectors.base.Derived`: e.g. KNN's top-K neighbour
similarities of each query) is stored in the entry of the set it was derived from, as
derived/<name>-<hash>.npy, the hash covering the content key of the train outputs the
detector was fitted on, the derived output's parameters, its source files and the torch
version: same model and data → reused; another bank, K, normalisation or code → another file.
Beside it, <name>-<hash>.json keeps the seconds it took to compute, which a detector's cost
counts whether the file was made now or read.

An entry holds what has been asked of it. The base outputs (logits, features, labels) are
written together; block summaries are named by "<block>.<summary>" keys (`oodbench.summaries`)
and each is computed only when a detector asks for it, so a detector that reads block means
never pays for the channel-softmax statistics. Arrays are written batch by batch into
memory-mapped files (memory does not grow with the dataset) under temporary names, renamed into
place only when the whole pass is complete, and read back memory-mapped. A process killed
mid-pass (SIGKILL, OOM killer) leaves its temporaries behind; they are named after its PID and
host (`oodbench.io.temp_tag`) and removed when the cache is next opened or the entry next
written, once that PID is gone. Under torchrun `forward_sharded` splits a pass across the
processes and only rank 0 writes (an `EntryWriter` refuses to open on another rank).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodbench.data import ImageSet, InputTransform
from oodbench.distributed import World, check_may_write, gather_to_main
from oodbench.errors import OodbenchError
from oodbench.io import read_json, remove_stale_temps, temp_tag, write_json
from oodbench.models import Classifier, ModelOutput
from oodbench.summaries import BASE_OUTPUTS, BLOCK_SUMMARIES, split_key, summarise_blocks

CACHE_VERSION = "2"


def model_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@lru_cache(maxsize=64)
def _source_digest(files: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes() if f and Path(f).is_file() else f.encode())
    return h.hexdigest()


def code_digest(model: torch.nn.Module) -> str:
    """sha256 of the source files that turn pixels into cached outputs, and the torch version."""
    from oodbench import summaries
    from oodbench.data import transforms

    modules = [*dict.fromkeys(type(m) for m in model.modules()), summaries, transforms]
    files = []
    for m in modules:
        try:
            files.append(inspect.getsourcefile(m) or repr(m))
        except TypeError:  # built-in class (e.g. a torch module): its version covers it
            files.append(f"{getattr(m, '__module__', '')}.{getattr(m, '__qualname__', m)}")
    return _source_digest(tuple([*files, f"torch {torch.__version__}"]))


def cache_key(weights: str, data: ImageSet, transform: InputTransform, code: str = "") -> str:
    h = hashlib.sha256()
    for part in (CACHE_VERSION, weights, data.fingerprint(), transform.key(), code):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


@dataclass
class Outputs:
    """Cached outputs of one dataset, as CPU tensors over memory-mapped arrays. `blocks` holds
    the "<block>.<summary>" keys that were asked for."""

    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)


def _load(path: Path) -> torch.Tensor:
    # copy-on-write map: tensors may be modified in memory, the file never is
    try:
        return torch.from_numpy(np.load(path, mmap_mode="c"))
    except (OSError, ValueError) as e:
        raise OodbenchError(f"cache file {path} is unreadable ({e})",
                            f"delete the folder {path.parent} (it is recomputed on the next "
                            "`score`)") from None


class CacheEntry:
    """One folder of the cache: which outputs it holds, and reading them."""

    def __init__(self, path: Path, n: int) -> None:
        self.path, self.n = Path(path), n

    def file(self, key: str) -> Path:
        return self.path / f"{key}.npy" if key in (*BASE_OUTPUTS, "labels") else (
            self.path / "blocks" / f"{key}.npy")

    def has(self, key: str) -> bool:
        return self.file(key).exists()

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The requested keys not stored yet; the base outputs count as one unit."""
        want = [*BASE_OUTPUTS, *sorted(k for k in keys if k not in BASE_OUTPUTS)]
        return [k for k in want if not self.has(k)]

    def meta(self) -> dict:
        path = self.path / "meta.json"
        return read_json(path) if path.exists() else {}

    def load(self, keys: Collection[str]) -> Outputs:
        out = Outputs(*(self._checked(k) for k in (*BASE_OUTPUTS, "labels")))
        out.blocks = {k: self._checked(k) for k in keys if k not in BASE_OUTPUTS}
        return out

    def _checked(self, key: str) -> torch.Tensor:
        return self._checked_file(self.file(key))

    def _checked_file(self, path: Path) -> torch.Tensor:
        t = _load(path)
        if len(t) != self.n:
            raise OodbenchError(f"cache file {path} holds {len(t)} rows, expected "
                                f"{self.n} (truncated or foreign)",
                                f"delete the folder {self.path} (it is recomputed on the next "
                                "`score`)")
        return t

    def derived(self, name: str, params: Mapping[str, Any], code: Iterable[str],
                compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool, float]:
        """A detector's derived output of this entry's set (see the module docstring): the
        stored copy, else `compute()` saved atomically; True when it was computed now; and the
        seconds `compute()` took, now or when it was stored (kept beside it, as the forward
        time is kept with the entry, so a detector's cost does not depend on what the cache
        held). `params` must name everything it depends on besides this set's outputs (the
        fit's train key)."""
        path = self.path / "derived" / f"{name}-{derived_key(params, code)}.npy"
        timing = path.with_suffix(".json")
        if path.exists() and timing.exists():  # an entry from before timings is made again
            return self._checked_file(path), False, float(read_json(timing)["seconds"])
        tic = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - tic
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        tmp = str(path) + temp_tag() + ".npy"
        np.save(tmp, value.numpy())
        os.replace(tmp, path)
        write_json(timing, {"seconds": seconds})  # last: its presence marks a complete pair
        return value, True, seconds


def derived_key(params: Mapping[str, Any], code: Iterable[str]) -> str:
    """sha256 of a derived output's parameters, its source files and the torch version."""
    text = json.dumps({"version": CACHE_VERSION, "params": dict(params),
                       "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256((text + _source_digest(tuple(code))).encode()).hexdigest()[:24]


def key_taps(keys: Collection[str]) -> tuple[str, ...]:
    """Blocks a forward pass must return to compute the cache keys `keys`."""
    return tuple(dict.fromkeys(split_key(k)[0] for k in keys if k not in BASE_OUTPUTS))


def output_values(keys: Collection[str], out: ModelOutput) -> dict[str, np.ndarray]:
    """The arrays (float32, CPU) of the cache keys `keys` for one batch's outputs."""
    values = {}
    if "logits" in keys:
        values.update(logits=out.logits, features=out.features)
    values.update(summarise_blocks(out.blocks, [k for k in keys if k not in BASE_OUTPUTS]))
    return {k: v.detach().float().cpu().numpy() for k, v in values.items()}


class EntryWriter:
    """Streams batches of outputs into an entry's temporary memory-mapped files; `commit`
    renames them into place (atomic per file, labels and meta last), `abort` removes them."""

    def __init__(self, entry: CacheEntry, keys: list[str], labels: torch.Tensor,
                 dataset: str) -> None:
        check_may_write(entry.path)
        self.entry, self.keys, self.labels, self.dataset = entry, keys, labels, dataset
        self.tag = temp_tag()
        remove_stale_temps(entry.path)
        remove_stale_temps(entry.path / "blocks")
        self.maps: dict[str, np.memmap] = {}

    @property
    def taps(self) -> tuple[str, ...]:
        """Blocks the forward pass must return for the keys being written."""
        return key_taps(self.keys)

    def write(self, start: int, out: ModelOutput) -> None:
        self.write_values(start, output_values(self.keys, out))

    def write_values(self, start: int, values: dict[str, np.ndarray]) -> None:
        """Rows start.. of each key (as `output_values` returns them, from any process)."""
        for key, value in values.items():
            if key not in self.maps:
                path = self.entry.file(key)
                path.parent.mkdir(parents=True, exist_ok=True)
                self.maps[key] = np.lib.format.open_memmap(
                    str(path) + self.tag, mode="w+", dtype=np.float32,
                    shape=(self.entry.n, *value.shape[1:]))
            self.maps[key][start:start + len(value)] = value

    def commit(self, seconds: float, device: str) -> None:
        for key, mm in self.maps.items():
            mm.flush()
            os.replace(str(self.entry.file(key)) + self.tag, self.entry.file(key))
        self.maps.clear()
        if "logits" in self.keys:
            tmp = str(self.entry.file("labels")) + self.tag + ".npy"
            np.save(tmp, self.labels.cpu().numpy())
            os.replace(tmp, self.entry.file("labels"))
            write_json(self.entry.path / "meta.json",
                       {"version": CACHE_VERSION, "dataset": self.dataset, "n": self.entry.n,
                        "forward_seconds": seconds, "device": device})

    def abort(self) -> None:
        for key in self.maps:
            Path(str(self.entry.file(key)) + self.tag).unlink(missing_ok=True)
        self.maps.clear()


class OutputCache:
    """The run's cache folder. `entry` finds an entry; `writer` streams the missing keys of one;
    `get` is the whole no-gradient path (run the model only for what the entry lacks)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.remove_stale_temps()

    def remove_stale_temps(self) -> list[Path]:
        """Delete what killed writers left anywhere in the cache (see `EntryWriter`); a few
        directory listings, so it runs whenever the cache is opened."""
        removed = remove_stale_temps(self.root)
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.is_dir():
                    removed += remove_stale_temps(entry) + remove_stale_temps(entry / "blocks")
                    removed += remove_stale_temps(entry / "derived")
        return removed

    def entry(self, key: str, n: int = -1) -> CacheEntry:
        return CacheEntry(self.root / key, n)

    def get(self, model: Classifier, weights: str, data: ImageSet, transform: InputTransform,
            keys: Collection[str] = (), device: torch.device | str = "cpu",
            batch_size: int = 256, code: str | None = None) -> tuple[Outputs, bool]:
        """Outputs for `data` with the requested block-summary keys; True when it ran the model."""
        code = code_digest(model) if code is None else code
        entry = self.entry(cache_key(weights, data, transform, code), len(data))
        missing = entry.missing(keys)
        if missing:
            writer = EntryWriter(entry, missing, data.labels, data.name)
            seconds = forward_into(model, data, transform, writer, device, batch_size)
            writer.commit(seconds, str(device))
        return entry.load(keys), bool(missing)


def check_summary_keys(keys: Iterable[str]) -> None:
    unknown = [k for k in keys if k not in BASE_OUTPUTS and split_key(k)[1] not in BLOCK_SUMMARIES]
    if unknown:
        raise ValueError(f"unknown cached outputs {unknown}; summaries: {list(BLOCK_SUMMARIES)}")


@torch.no_grad()
def forward_into(model: Classifier, data: ImageSet, transform: InputTransform,
                 writer: EntryWriter, device: torch.device | str, batch_size: int,
                 progress: Callable[[int], None] | None = None) -> float:
    """One no-gradient pass over `data` writing the writer's keys; returns its wall time."""
    check_summary_keys(writer.keys)
    model.eval().to(device)
    tic = time.perf_counter()
    try:
        for start in range(0, len(data), batch_size):
            x = data.images[start:start + batch_size].to(device, non_blocking=True)
            writer.write(start, model.forward_all(transform(x), taps=writer.taps))
            if progress is not None:
                progress(len(x))
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
    except BaseException:
        writer.abort()
        raise
    return time.perf_counter() - tic


@torch.no_grad()
def forward_sharded(model: Classifier, data: ImageSet, transform: InputTransform,
                    keys: list[str], entry: CacheEntry, device: torch.device | str,
                    batch_size: int, world: World,
                    progress: Callable[[int], None] | None = None) -> float:
    """`forward_into` split across the ranks of a torchrun job. Rank r runs its contiguous shard
    of `data` batch by batch; each round's outputs (variable-size: the last shards may be short
    or empty) are gathered on rank 0, which alone writes them at their rows and commits the
    entry once. Every rank calls it with the same arguments; returns the wall time."""
    check_summary_keys(keys)
    model.eval().to(device)
    writer = EntryWriter(entry, keys, data.labels, data.name) if world.main else None
    lo, hi = world.shard(len(data))
    largest = math.ceil(len(data) / world.size)  # rank 0's shard
    rounds = math.ceil(largest / batch_size)
    taps, tic = key_taps(keys), time.perf_counter()
    try:
        for i in range(rounds):
            a, b = min(lo + i * batch_size, hi), min(lo + (i + 1) * batch_size, hi)
            values = {}
            if a < b:
                x = data.images[a:b].to(device, non_blocking=True)
                values = output_values(keys, model.forward_all(transform(x), taps=taps))
            got = gather_to_main((a, b - a, values))
            if writer is not None and got is not None:
                for start, _, vals in got:
                    writer.write_values(start, vals)
                if progress is not None:
                    progress(sum(rows for _, rows, _ in got))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    seconds = time.perf_counter() - tic
    if writer is not None:
        writer.commit(seconds, str(device))
    return seconds
