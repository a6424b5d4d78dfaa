"""Per-sample summaries of block outputs (N×C×H×W → N×k), shared by the output cache (which
stores them) and the detectors (which read them). A layer below both, so detectors never import
the cache, and the cache never imports a detector.

A cached output is named by a key: "logits", "features", or "<block>.<summary>" (e.g.
"block2.mean"). Detectors declare the keys they read (`Detector.required_outputs`), and the
cache computes exactly those, so a detector that reads block means never pays for the
channel-softmax statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

# Column order of the "softmax" summary: "<position aggregate>-<per-position statistic>".
SOFTMAX_STATS = tuple(f"{agg}-{stat}" for stat in ("msp", "misp", "asp")
                      for agg in ("max", "min", "mean"))


def channel_softmax_stats(b: torch.Tensor) -> torch.Tensor:
    """The nine intermediate-layer softmax statistics of a block output N×C×H×W → N×9.

    Softmax over channels at each position; per position its max (MSP), min (MiSP) and mean
    (ASP); each aggregated over positions by max, min and mean (columns: `SOFTMAX_STATS`).
    ASP is 1/C at every position by construction (a softmax sums to 1), so its three columns
    carry no information; they are stored only so the full table of the thesis is available.
    """
    p = torch.log_softmax(b.float().flatten(2), dim=1).exp()  # N×C×HW
    per_position = (p.max(dim=1).values, p.min(dim=1).values, p.mean(dim=1))  # each N×HW
    return torch.stack([agg for s in per_position
                        for agg in (s.max(dim=1).values, s.min(dim=1).values, s.mean(dim=1))],
                       dim=1)


def spatial_mean(b: torch.Tensor) -> torch.Tensor:
    """Spatial mean pooling N×C×H×W → N×C (the Mahalanobis layer features)."""
    return b.mean(dim=(2, 3))


# Register more here; a detector names the ones it reads as "<block>.<summary>" keys.
BLOCK_SUMMARIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": spatial_mean,
    "softmax": channel_softmax_stats,
}

# Cached outputs that are not block summaries (always stored together with the labels).
BASE_OUTPUTS = ("logits", "features")


def block_key(block: str, summary: str) -> str:
    return f"{block}.{summary}"


def split_key(key: str) -> tuple[str, str]:
    """"block2.mean" → ("block2", "mean")."""
    block, _, summary = key.rpartition(".")
    return block, summary


def summarise_blocks(blocks: dict[str, torch.Tensor],
                     keys: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The requested "<block>.<summary>" keys (default: every summary of every block) of the
    given block outputs (used by the cache and by detectors that forward synthetic inputs
    themselves, e.g. FGSM stand-in OOD samples)."""
    if keys is None:
        keys = [block_key(b, s) for b in blocks for s in BLOCK_SUMMARIES]
    out = {}
    for key in keys:
        block, summary = split_key(key)
        if block in blocks:
            out[key] = BLOCK_SUMMARIES[summary](blocks[block])
    return out
