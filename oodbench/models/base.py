"""A classifier = backbone (features + named block outputs) + head (from the loss).

`forward(x)` returns logits, so a `Classifier` drops into any PyTorch loop. `forward_all` returns
logits, penultimate features and any requested block outputs from the SAME pass, which is what
lets one forward pass serve every gradient-free detector.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from oodbench.errors import OodbenchError
from oodbench.models.activations import ACTIVATION_ENTROPY, recording_entropy
from oodbench.registry import Registry


@dataclass
class ModelOutput:
    """`aux` holds per-sample auxiliary quantities asked for by name (see `AUX_OUTPUTS`)."""

    logits: torch.Tensor
    features: torch.Tensor
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


AUX_OUTPUTS = (ACTIVATION_ENTROPY,)


class Backbone(nn.Module):
    """Feature extractor. Subclasses set `feature_dim` and `block_names`, and implement
    `forward_features(x, taps)` returning (penultimate features N×D, {block name: N×C×H×W})."""

    feature_dim: int
    block_names: tuple[str, ...] = ()

    def forward_features(self, x: torch.Tensor, taps: Collection[str] = ()
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def he_init(self) -> None:
        """He (Kaiming) normal initialisation of every convolution, as the ResNet, WRN and
        DenseNet papers use (fan-out, ReLU gain)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def check_taps(self, taps: Collection[str]) -> None:
        unknown = [t for t in taps if t not in self.block_names]
        if unknown:
            raise OodbenchError(
                f"{type(self).__name__} has no block output(s) {unknown}",
                f"choose from {list(self.block_names)}",
            )


class Classifier(nn.Module):
    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def block_names(self) -> tuple[str, ...]:
        return self.backbone.block_names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, _ = self.backbone.forward_features(x)
        return self.head(features)

    def forward_all(self, x: torch.Tensor, taps: Collection[str] = (),
                    aux: Collection[str] = ()) -> ModelOutput:
        """Logits, features, the requested block outputs and auxiliary outputs, in one pass."""
        self.backbone.check_taps(taps)
        unknown = [a for a in aux if a not in AUX_OUTPUTS]
        if unknown:
            raise OodbenchError(f"unknown auxiliary output(s) {unknown}",
                                f"choose from {list(AUX_OUTPUTS)}")
        if ACTIVATION_ENTROPY in aux:
            with recording_entropy(self.backbone) as entropies:
                features, blocks = self.backbone.forward_features(x, taps)
            extra = {ACTIVATION_ENTROPY: torch.stack(entropies).sum(0)}
        else:
            features, blocks = self.backbone.forward_features(x, taps)
            extra = {}
        return ModelOutput(self.head(features), features, blocks, extra)


@dataclass(frozen=True)
class ModelSpec:
    """A registered backbone factory: `build(in_channels, image_size) -> Backbone`, or
    `build(in_channels, image_size, block_activation=...)` for the variants it lists in
    `block_activations` (the log-softmax ResNet replaces the ReLU after residual additions)."""

    build: Callable[..., Backbone]
    summary: str
    image_sizes: tuple[int, ...] = ()  # sizes it is designed for; empty = any
    block_activations: tuple[str, ...] = ("relu",)


def check_block_activation(model: str, block_activation: str, loss: str | None = None) -> None:
    """A clear error when a loss needs a backbone variant that `model` does not have."""
    spec = MODELS.get(model)
    if block_activation not in spec.block_activations:
        able = [n for n, s in MODELS.items() if block_activation in s.block_activations]
        who = f"loss {loss!r}" if loss else f"block activation {block_activation!r}"
        raise OodbenchError(
            f"{who} needs a model with a {block_activation} block variant; {model!r} has none",
            f"use one of these models: {', '.join(able)}")


# `@MODELS.register(name, summary=..., image_sizes=..., block_activations=...)` on a backbone
# factory stores `ModelSpec(factory, summary=..., ...)`.
MODELS: Registry[ModelSpec] = Registry("model", entry=ModelSpec)


def build_classifier(model: str, head_factory: Callable[[int, int], nn.Module], num_classes: int,
                     in_channels: int, image_size: int, block_activation: str = "relu"
                     ) -> Classifier:
    """Backbone by name, with the loss's head on top (the head replaces `nn.Linear`)."""
    spec = MODELS.get(model)
    check_block_activation(model, block_activation)
    if spec.image_sizes and image_size not in spec.image_sizes:
        raise OodbenchError(
            f"model {model!r} is built for {list(spec.image_sizes)}-pixel inputs, got {image_size}",
            "pick a model for this input size (see `oodbench list models`)",
        )
    if block_activation == "relu":
        backbone = spec.build(in_channels, image_size)
    else:
        backbone = spec.build(in_channels, image_size, block_activation=block_activation)
    return Classifier(backbone, head_factory(backbone.feature_dim, num_classes))
