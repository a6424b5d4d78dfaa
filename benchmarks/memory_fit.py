"""Peak resident memory while fitting train statistics on 10k, 25k and 50k memory-mapped
samples (as the cache serves them), each fit in a fresh process: `mahalanobis` (streaming class
means + one scatter matrix), `mahalanobis++`, `vim`, `react` (a fixed-size sample of
activations) and `knn` (whose train bank is N×D by nature). Flat = the fit's peak does not grow
with N beyond what the detector must keep.

    PYTHONPATH=. python benchmarks/memory_fit.py [--dim 512]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SIZES = (10_000, 25_000, 50_000)
DETECTORS = ("mahalanobis", "mahalanobis++", "vim", "react", "knn")
CLASSES = 10


def make_files(folder: Path, n: int, dim: int) -> None:
    """features.npy (N×D float32), logits.npy, labels.npy, written in chunks."""
    rng = np.random.default_rng(0)
    feats = np.lib.format.open_memmap(folder / "features.npy", "w+", np.float32, (n, dim))
    for i in range(0, n, 5000):
        feats[i:i + 5000] = rng.normal(size=(min(5000, n - i), dim)).astype(np.float32)
    feats.flush()
    del feats
    np.save(folder / "labels.npy", rng.integers(0, CLASSES, n))
    w = rng.normal(size=(CLASSES, dim)).astype(np.float32)
    np.save(folder / "head.npy", w)


def rss_anon_mib() -> float:
    """Anonymous resident memory (allocations; not the file-backed pages of the memory-mapped
    features, which the kernel can drop at any time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: total peak


class PeakSampler:
    """Samples `rss_anon_mib` every 5 ms on a thread; `peak` is the highest value seen."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = rss_anon_mib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_anon_mib())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mib())


def child(folder: Path, name: str) -> None:
    """Runs in its own process: open the memory-mapped arrays, fit, print the growth of the
    anonymous (allocated) resident memory during the fit."""
    import torch

    from oodbench.detectors import DetectorInput, create

    feats = torch.from_numpy(np.load(folder / "features.npy", mmap_mode="r"))
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    w = torch.from_numpy(np.load(folder / "head.npy")).double()
    b = torch.zeros(CLASSES, dtype=torch.float64)
    logits = None
    if name == "vim":  # ViM reads the train logits: computed in chunks, as the cache holds them
        logits = torch.cat([(feats[i:i + 4096].double() @ w.T).float()
                            for i in range(0, len(feats), 4096)])
    det = create(name)
    before = rss_anon_mib()
    with PeakSampler() as peak:
        det.fit(DetectorInput("train", logits, labels, feats, head=(w, b)))
    print(f"{peak.peak - before:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "DETECTOR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(Path(a.child[0]), a.child[1])
    rows = {d: [] for d in DETECTORS}
    with tempfile.TemporaryDirectory() as tmp:
        for n in SIZES:
            folder = Path(tmp) / str(n)
            folder.mkdir()
            make_files(folder, n, a.dim)
            for d in DETECTORS:
                out = subprocess.run([sys.executable, __file__, "--child", str(folder), d],
                                     capture_output=True, text=True, check=True)
                rows[d].append(float(out.stdout.strip().splitlines()[-1]))
    print(f"peak growth of allocated (anonymous) resident memory during the fit (MiB), "
          f"D = {a.dim}, memory-mapped float32 features; the "
          f"features themselves are {', '.join(f'{n * a.dim * 4 / 2**20:.0f}' for n in SIZES)} "
          "MiB")
    print(f"  {'detector':14s} " + " ".join(f"{n:>8,}" for n in SIZES))
    for d, vals in rows.items():
        print(f"  {d:14s} " + " ".join(f"{v:8.1f}" for v in vals))


if __name__ == "__main__":
    main()
