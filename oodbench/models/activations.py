"""Block activations: ReLU, or the log-softmax ResNet's channel log-softmax.

`ChannelLogSoftmax` can record, per forward pass, the summed per-position entropy of its channel
distribution (an N-vector); `Classifier.forward_all(x, aux=(ACTIVATION_ENTROPY,))` switches the
recording on for one pass and returns the sum over all such activations in `ModelOutput.aux`.
Recording is off otherwise, so plain forward passes cost nothing extra.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from oodbench.errors import OodbenchError

ACTIVATION_ENTROPY = "activation_entropy"
BLOCK_ACTIVATIONS = ("relu", "logsoftmax")


class ChannelLogSoftmax(nn.Module):
    """log-softmax over dim 1 (channels) of N×C×H×W; optionally records the entropy sum."""

    def __init__(self) -> None:
        super().__init__()
        self.recorded: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.log_softmax(x, dim=1)
        if self.recorded is not None:
            # H = −Σ p log p with p = exp(z): finite even where p underflows to 0.
            self.recorded.append(-(z.float().exp() * z.float()).sum(dim=1).flatten(1).sum(1))
        return z


def make_activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=False)
    if kind == "logsoftmax":
        return ChannelLogSoftmax()
    raise OodbenchError(f"unknown block activation {kind!r}", f"use one of {BLOCK_ACTIVATIONS}")


@contextmanager
def recording_entropy(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every ChannelLogSoftmax in `module` appends its entropy to the list."""
    acts = [m for m in module.modules() if isinstance(m, ChannelLogSoftmax)]
    if not acts:
        raise OodbenchError(f"{type(module).__name__} has no log-softmax activations, so it has "
                            "no activation entropy",
                            "build the model with block_activation='logsoftmax' "
                            "(the logsoftmax-resnet loss does)")
    recorded: list[torch.Tensor] = []
    for m in acts:
        m.recorded = recorded
    try:
        yield recorded
    finally:
        for m in acts:
            m.recorded = None
