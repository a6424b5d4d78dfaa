"""Any `nn.Module` classifier as an oodbench model: features and block outputs through hooks.

`HookedClassifier(model)` gives a network that only returns logits (a torchvision or timm model,
your own) the interface oodbench's scoring reads: `forward_all(x, taps) -> ModelOutput(logits,
features, blocks)`, `head` and `block_names`. Nothing in the wrapped model changes: forward hooks
are registered for one pass and removed after it.

- Penultimate features: by default the INPUT of the last `nn.Linear` in `model.modules()` order
  (that Linear is then the `head` whose W, b detectors such as ViM or NCI read), or, with
  `feature_layer="name"`, the OUTPUT of that module, flattened to N×D (e.g. `"avgpool"` of a
  torchvision ResNet).
- Block outputs: the outputs of the modules named in `block_layers` (each must be N×C×H×W).

`check(x)` runs one small batch and refuses what the hooks cannot honour: a hooked Linear that
does not produce the logits, features that are not per-sample, blocks that are not 4-D. With an
explicit `feature_layer`, the last Linear stays the head only when `head(features)` reproduces
the logits on that batch; otherwise `head` is None-like (an `nn.Identity`), so detectors that
need W, b report "n/a" instead of using a wrong layer.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from oodbench.errors import OodbenchError
from oodbench.models.base import ModelOutput

SHOWN_CANDIDATES = 12


def _candidates(model: nn.Module, near: str | None = None) -> str:
    """Module names worth suggesting: close matches of `near`, else the last few modules (the
    penultimate layer is near the end)."""
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(near, names, n=SHOWN_CANDIDATES) if near else []
    shown = close or names[-SHOWN_CANDIDATES:]
    more = ("" if close or len(names) <= SHOWN_CANDIDATES
            else f" (last {len(shown)} of {len(names)})")
    return ", ".join(shown) + more


def last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    return found


class HookedClassifier(nn.Module):
    """`model` (returning logits N×C) with its features and blocks read by forward hooks."""

    def __init__(self, model: nn.Module, feature_layer: str | None = None,
                 block_layers: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        modules = dict(model.named_modules())
        for name in [*([feature_layer] if feature_layer else []), *block_layers]:
            if name not in modules or not name:
                raise OodbenchError(f"{type(model).__name__} has no module named {name!r}",
                                    f"name one of its modules: {_candidates(model, name)}")
        linear = last_linear(model)
        if feature_layer is None and linear is None:
            raise OodbenchError(
                f"cannot find the penultimate features of {type(model).__name__}: it has no "
                "nn.Linear layer (its input is the default feature layer)",
                f"pass feature_layer= a module whose output is the feature vector, one of: "
                f"{_candidates(model)}")
        self.feature_layer = feature_layer or (linear[0] if linear else "")
        self.features_are_input = feature_layer is None
        self.head_name = linear[0] if linear else None
        # Not registered as a submodule: it is already inside `model` (one copy of its weights).
        self.__dict__["head"] = linear[1] if linear else nn.Identity()
        self.block_names: tuple[str, ...] = tuple(dict.fromkeys(block_layers))
        self.checked = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @contextmanager
    def _hooks(self, taps: Collection[str], seen: dict[str, Any]):
        modules = dict(self.model.named_modules())
        handles = []

        def keep_input(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen["features"] = args[0]

        def keep_output(key: str):
            def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
                seen[key] = out
            return hook

        feature = modules[self.feature_layer]
        handles.append(feature.register_forward_pre_hook(keep_input) if self.features_are_input
                       else feature.register_forward_hook(keep_output("features")))
        for t in taps:
            handles.append(modules[t].register_forward_hook(keep_output("block:" + t)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def forward_all(self, x: torch.Tensor, taps: Collection[str] = (),
                    aux: Collection[str] = ()) -> ModelOutput:
        unknown = [t for t in taps if t not in self.block_names]
        if unknown:
            raise OodbenchError(f"no block output(s) {unknown} were asked for",
                                f"add them to block_layers (now {list(self.block_names)})")
        if aux:
            raise OodbenchError(f"auxiliary outputs {list(aux)} need an oodbench model",
                                "score detectors that read logits, features or blocks")
        seen: dict[str, Any] = {}
        with self._hooks(taps, seen):
            logits = self.model(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise OodbenchError(
                f"{type(self.model).__name__} returned "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)}, "
                "not logits N×C", "wrap the model so that forward(x) returns the logits tensor")
        if "features" not in seen:
            raise OodbenchError(f"module {self.feature_layer!r} did not run in the forward pass",
                                f"pass feature_layer= one that does: {_candidates(self.model)}")
        features = seen["features"]
        if not isinstance(features, torch.Tensor) or features.shape[0] != x.shape[0]:
            raise OodbenchError(f"module {self.feature_layer!r} does not give one feature "
                                "vector per image", f"pass feature_layer= another module: "
                                f"{_candidates(self.model, self.feature_layer)}")
        blocks = {t: seen["block:" + t] for t in taps}
        for t, b in blocks.items():
            if not isinstance(b, torch.Tensor) or b.dim() != 4:
                shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise OodbenchError(f"block layer {t!r} outputs {shape}, not N×C×H×W",
                                    "name convolutional stages in block_layers")
        if not self.checked:
            self._check(logits, features)
        return ModelOutput(logits, features.flatten(1), blocks)

    @torch.no_grad()
    def _check(self, logits: torch.Tensor, features: torch.Tensor) -> None:
        """The first batch: does the head, applied to the features, give the logits?"""
        self.checked = True
        head, f = self.head, features.detach().flatten(1)
        if isinstance(head, nn.Linear) and f.shape[1] == head.in_features and torch.allclose(
                head(f), logits.detach(), rtol=1e-4, atol=1e-4):
            return
        if self.features_are_input:
            raise OodbenchError(
                f"the last nn.Linear of {type(self.model).__name__} ({self.head_name!r}) does "
                "not produce the logits, so its input is not the penultimate feature vector",
                f"pass feature_layer= the module whose output is the features, one of: "
                f"{_candidates(self.model)}")
        self.__dict__["head"] = nn.Identity()  # features given explicitly; W, b unknown
        self.head_name = None

    def check(self, x: torch.Tensor) -> ModelOutput:
        """One no-grad pass over a small batch, checking what the hooks read (see module doc)."""
        self.checked = False
        with torch.no_grad():
            return self.forward_all(x, taps=self.block_names)
