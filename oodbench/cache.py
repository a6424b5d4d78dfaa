"""Content-keyed cache of forward outputs: one forward pass per (weights, data, transform).

    <run>/cache/<key>/logits.npy, features.npy, labels.npy, blocks/<block>.<summary>.npy, meta.json

`key` = sha256(model weights and buffers, dataset pixels and labels, input transform), so a cache
entry can never be stale: retraining, changing the data or the transform changes the key.
Arrays are written batch by batch into memory-mapped files (memory does not grow with the
dataset), under temporary names renamed into place only when complete; they are read back
memory-mapped. Block outputs are stored as per-sample summaries (see `BLOCK_SUMMARIES`), never
as full C×H×W maps. A request for blocks that an entry lacks computes only what is missing, in
one pass.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from oodbench.data import ImageSet, InputTransform
from oodbench.io import read_json, write_json
from oodbench.models import Classifier
from oodbench.summaries import BLOCK_SUMMARIES

CACHE_VERSION = "1"

def model_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(weights: str, data: ImageSet, transform: InputTransform) -> str:
    h = hashlib.sha256()
    for part in (CACHE_VERSION, weights, data.fingerprint(), transform.key()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


@dataclass
class Outputs:
    """Cached outputs of one dataset, as CPU tensors over memory-mapped arrays."""

    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)
    forward_seconds: float = 0.0  # wall time of the forward pass that produced the entry
    computed: bool = False  # True when this call ran the forward pass (cache miss)


def _load(path: Path) -> torch.Tensor:
    # copy-on-write map: tensors may be modified in memory, the file never is
    return torch.from_numpy(np.load(path, mmap_mode="c"))


class OutputCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def get(self, model: Classifier, weights: str, data: ImageSet, transform: InputTransform,
            blocks: tuple[str, ...] = (), device: torch.device | str = "cpu",
            batch_size: int = 512, progress: Callable[[int], None] | None = None) -> Outputs:
        """Outputs for `data`, running the model only for what the cache lacks."""
        d = self.entry(cache_key(weights, data, transform))
        meta_path = d / "meta.json"
        have = meta_path.exists()
        missing_blocks = [b for b in blocks
                          if not all((d / "blocks" / f"{b}.{s}.npy").exists()
                                     for s in BLOCK_SUMMARIES)]
        computed = False
        if not have or missing_blocks:
            seconds = self._compute(d, model, data, transform, tuple(missing_blocks),
                                    with_logits=not have, device=device,
                                    batch_size=batch_size, progress=progress)
            if not have:
                write_json(meta_path, {"version": CACHE_VERSION, "dataset": data.name,
                                       "n": len(data), "forward_seconds": seconds,
                                       "device": str(device), "created": time.time()})
            computed = True
        meta = read_json(meta_path)
        out = Outputs(_load(d / "logits.npy"), _load(d / "features.npy"), _load(d / "labels.npy"),
                      forward_seconds=float(meta["forward_seconds"]), computed=computed)
        for b in blocks:
            for s in BLOCK_SUMMARIES:
                out.blocks[f"{b}.{s}"] = _load(d / "blocks" / f"{b}.{s}.npy")
        return out

    @torch.no_grad()
    def _compute(self, d: Path, model: Classifier, data: ImageSet, transform: InputTransform,
                 blocks: tuple[str, ...], with_logits: bool, device: torch.device | str,
                 batch_size: int, progress: Callable[[int], None] | None) -> float:
        d.mkdir(parents=True, exist_ok=True)
        (d / "blocks").mkdir(exist_ok=True)
        model.eval().to(device)
        writers: dict[Path, np.memmap] = {}
        tag = f".tmp-{os.getpid()}"

        def write(path: Path, start: int, value: torch.Tensor) -> None:
            if path not in writers:
                writers[path] = np.lib.format.open_memmap(
                    str(path) + tag, mode="w+", dtype=np.float32,
                    shape=(len(data), *value.shape[1:]))
            writers[path][start:start + len(value)] = value.float().cpu().numpy()

        start_time = time.perf_counter()
        try:
            for start in range(0, len(data), batch_size):
                x = data.images[start:start + batch_size].to(device, non_blocking=True)
                out = model.forward_all(transform(x), taps=blocks)
                if with_logits:
                    write(d / "logits.npy", start, out.logits)
                    write(d / "features.npy", start, out.features)
                for b, value in out.blocks.items():
                    for s, fn in BLOCK_SUMMARIES.items():
                        write(d / "blocks" / f"{b}.{s}.npy", start, fn(value))
                if progress:
                    progress(len(x))
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start_time
            for path, mm in writers.items():
                mm.flush()
                del mm
                os.replace(str(path) + tag, path)
            writers.clear()
            if with_logits:
                np.save(str(d / "labels.npy") + tag + ".npy", data.labels.cpu().numpy())
                os.replace(str(d / "labels.npy") + tag + ".npy", d / "labels.npy")
        finally:
            for path in writers:
                Path(str(path) + tag).unlink(missing_ok=True)
        return seconds
