"""Intermediate-layer softmax scores (the MiSP thesis), post hoc on any model's block outputs.

For a block output C×H×W: softmax over channels at each position; per position its max (MSP),
min (MiSP) and mean (ASP); aggregated over positions by max, min and mean. The nine statistics
are computed in the one cached forward pass (`oodbench.cache.channel_softmax_stats`); detectors
here only read them. The ASP columns are not detectors: the mean of a softmax over C channels is
1/C at every position, for every input, so it cannot separate anything.

Orientation (higher = more in-distribution): MSP statistics as they are (peaked channel
distributions = confident); MiSP statistics negated (a peaked distribution has a tiny minimum).

`intermediate-misp` is the thesis score: min over positions of MiSP at one layer. Its default
layer is the model's last block (the one feeding the pooled features); the thesis's per-model
best layer could not be checked here, so pass `layer=` to choose another.
"""

from __future__ import annotations

import numpy as np

from oodbench.detectors.base import (
    DETECTORS,
    NO_BLOCKS_HINT,
    Detector,
    DetectorInput,
    HParam,
)
from oodbench.errors import OodbenchError
from oodbench.summaries import SOFTMAX_STATS, block_key


def resolve_layer(layer: str, block_names: tuple[str, ...], what: str) -> str:
    """`layer` checked against the model's blocks; "last" = the last block."""
    if not block_names:
        raise OodbenchError(f"{what} needs block outputs, and this model exposes none",
                            NO_BLOCKS_HINT)
    if layer == "last":
        return block_names[-1]
    if layer not in block_names:
        raise OodbenchError(f"no block {layer!r} in this model", f"choose from {list(block_names)}")
    return layer


class _ChannelSoftmaxScore(Detector):
    needs = frozenset({"blocks"})
    hparams = {"layer": HParam("last", str, doc="a block name of the model, or last")}
    column = ""  # one of SOFTMAX_STATS
    sign = 1.0

    def _layer(self, block_names: tuple[str, ...]) -> str:
        return resolve_layer(str(self.params["layer"]), block_names,
                             self.summary or self.registered_name())

    def required_outputs(self, block_names: tuple[str, ...]) -> frozenset[str]:
        return frozenset({block_key(self._layer(block_names), "softmax")})

    def score(self, data: DetectorInput) -> np.ndarray:
        # the model's block order; else the cache's dict order (the pipeline keeps it)
        names = data.block_names or tuple(
            k.rsplit(".", 1)[0] for k in data.blocks if k.endswith(".softmax"))
        stats = data.blocks[block_key(self._layer(names), "softmax")]
        return self.sign * stats[:, SOFTMAX_STATS.index(self.column)].double().numpy()


@DETECTORS.register("intermediate-msp-max", paper="intermediate-layer softmax (MiSP thesis)")
class IntermediateMspMax(_ChannelSoftmaxScore):
    """Max over positions of the channel-softmax max."""

    column, sign = "max-msp", 1.0
    summary = "max over positions of the channel-softmax max (a block; layer=)"


@DETECTORS.register("intermediate-msp-min", paper="intermediate-layer softmax (MiSP thesis)")
class IntermediateMspMin(_ChannelSoftmaxScore):
    """Min over positions of the channel-softmax max."""

    column, sign = "min-msp", 1.0
    summary = "min over positions of the channel-softmax max (a block; layer=)"


@DETECTORS.register("intermediate-msp-mean", paper="intermediate-layer softmax (MiSP thesis)")
class IntermediateMspMean(_ChannelSoftmaxScore):
    """Mean over positions of the channel-softmax max."""

    column, sign = "mean-msp", 1.0
    summary = "mean over positions of the channel-softmax max (a block; layer=)"


@DETECTORS.register("intermediate-misp-max", paper="intermediate-layer softmax (MiSP thesis)")
class IntermediateMispMax(_ChannelSoftmaxScore):
    """Minus the max over positions of the channel-softmax min."""

    column, sign = "max-misp", -1.0
    summary = "minus the max over positions of the channel-softmax min (a block; layer=)"


@DETECTORS.register("intermediate-misp-mean", paper="intermediate-layer softmax (MiSP thesis)")
class IntermediateMispMean(_ChannelSoftmaxScore):
    """Minus the mean over positions of the channel-softmax min."""

    column, sign = "mean-misp", -1.0
    summary = "minus the mean over positions of the channel-softmax min (a block; layer=)"


@DETECTORS.register("intermediate-misp", paper="intermediate-layer softmax (MiSP thesis)")
class IntermediateMisp(_ChannelSoftmaxScore):
    """The MiSP thesis score: minus the min over positions of the channel-softmax min."""

    column, sign = "min-misp", -1.0
    summary = "minus the min over positions of the channel-softmax min (MiSP thesis; layer=)"
