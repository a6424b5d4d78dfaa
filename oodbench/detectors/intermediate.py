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

from oodbench.detectors.base import DETECTORS, Detector, DetectorInput
from oodbench.errors import OodbenchError
from oodbench.summaries import SOFTMAX_STATS


class _ChannelSoftmaxScore(Detector):
    needs = frozenset({"blocks"})
    hparams = {"layer": "last"}
    column = ""  # one of SOFTMAX_STATS
    sign = 1.0

    def score(self, data: DetectorInput) -> np.ndarray:
        layers = sorted({k.rsplit(".", 1)[0] for k in data.blocks if k.endswith(".softmax")})
        if not layers:
            raise OodbenchError(
                f"{self.summary or type(self).__name__} needs block outputs, and this model "
                "exposes none",
                "use a model with named blocks (smallcnn8, smallcnn28, resnet18...)")
        layer = str(self.params["layer"])
        if layer == "last":
            # blocks keep the model's order in the dict the pipeline builds
            layer = [k.rsplit(".", 1)[0] for k in data.blocks if k.endswith(".softmax")][-1]
        key = f"{layer}.softmax"
        if key not in data.blocks:
            raise OodbenchError(f"no block {layer!r} in this model", f"choose from {layers}")
        stats = data.blocks[key]
        return self.sign * stats[:, SOFTMAX_STATS.index(self.column)].double().numpy()


def _register(name: str, column: str, sign: float, summary: str) -> None:
    cls = type(name.title().replace("-", ""), (_ChannelSoftmaxScore,),
               {"column": column, "sign": sign, "summary": summary,
                "__doc__": f"{summary} (column {column!r} of the cached softmax statistics)."})
    DETECTORS.add(name, cls)


for _agg in ("max", "min", "mean"):
    _register(f"intermediate-msp-{_agg}", f"{_agg}-msp", 1.0,
              f"{_agg} over positions of the channel-softmax max (a block; layer=)")
for _agg in ("max", "mean"):
    _register(f"intermediate-misp-{_agg}", f"{_agg}-misp", -1.0,
              f"minus the {_agg} over positions of the channel-softmax min (a block; layer=)")
_register("intermediate-misp", "min-misp", -1.0,
          "minus the min over positions of the channel-softmax min (MiSP thesis; layer=)")
