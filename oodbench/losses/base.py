"""A loss is a pair of modules, usable from plain PyTorch:

    head = spec.head(num_features, num_classes)   # replaces nn.Linear
    criterion = spec.criterion()                   # replaces nn.CrossEntropyLoss
    inputs, targets = criterion.preprocess(inputs, targets)   # identity unless the loss augments
    loss = criterion(head(backbone(inputs)), targets)

Losses that need more than the logits (the log-softmax ResNet's entropy term needs every block
activation) declare what they need in `criterion.aux` and implement `training_loss`:

    out = classifier.forward_all(inputs, aux=criterion.aux)   # logits + auxiliary quantities
    loss = criterion.training_loss(out, targets)

The trainer always uses this second form; for losses without auxiliary needs it equals the first.

Losses trained with auxiliary outliers (Outlier Exposure, energy regularisation) set
`needs_outliers`: the trainer then appends a batch of the benchmark's `outliers` set to every
in-distribution batch, with target `OUTLIER_TARGET` (-1) on those rows, so plain PyTorch use is

    x = torch.cat([inputs, outlier_inputs]); y = torch.cat([targets, torch.full((k,), -1)])
    loss = criterion(head(backbone(x)), y)
`LOSSES` maps a name to its `LossSpec`; adding a loss is one module whose criterion class is
decorated `@LOSSES.register("name", head=..., summary=...)`.

Loss options (`loss_options` in a benchmark, `-o KEY=VALUE` on the command line) are the keyword
arguments of the criterion's `__init__`: its annotations are their types and `option_ranges`
their allowed ranges. Every construction of a criterion checks them first, so `-o alpha=abc` or
`-o nosuch=1` is an `OodbenchError` naming the loss, the option, the expected type / range and
the valid options, raised before a run folder is written (the command builds the criterion while
checking the run's config). A float option accepts ints and decimal strings ("1e-3", which YAML
1.1 reads as text); a bool option only real booleans.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import UnionType
from typing import TYPE_CHECKING, Any, ClassVar, Union, get_args, get_origin, get_type_hints

import torch
from torch import nn

from oodbench.errors import OodbenchError
from oodbench.registry import Registry

if TYPE_CHECKING:
    from oodbench.models.base import ModelOutput


@dataclass(frozen=True)
class OptionRange:
    """Allowed values of a numeric loss option: `low` <= v (< v if `low_open`) <= `high`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def holds(self, v: float) -> bool:
        return ((self.low is None or (v > self.low if self.low_open else v >= self.low))
                and (self.high is None or v <= self.high))

    def __str__(self) -> str:
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = "" if self.high is None else f"<= {self.high:g}"
        return " and ".join(t for t in (low, high) if t)


NON_NEGATIVE, POSITIVE = OptionRange(0.0), OptionRange(0.0, low_open=True)
OUTLIER_TARGET = -1  # the target of an auxiliary-outlier row (losses with `needs_outliers`)
_DECIMAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_TYPE_WORDS = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


class Criterion(nn.Module):
    """Base class for criteria: `preprocess` is the identity unless a loss augments batches.

    A subclass's `__init__` keyword arguments are its loss options; they are checked (types from
    the annotations, ranges from `option_ranges`) before the subclass's `__init__` runs."""

    aux: tuple[str, ...] = ()  # auxiliary model outputs `training_loss` needs (ModelOutput.aux)
    max_grad_norm: float | None = None  # gradient-norm clipping the loss needs to train stably
    needs_outliers: bool = False  # trains on appended auxiliary-outlier rows (OUTLIER_TARGET)
    option_ranges: ClassVar[dict[str, OptionRange]] = {}
    loss_names: ClassVar[tuple[str, ...]] = ()  # the registered names using this class

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__ or cls.__init__ is nn.Module.__init__:
            init = cls.__init__  # its own, or (no options) nn.Module's

            @functools.wraps(init)
            def checked_init(self: Criterion, *args: Any, **options: Any) -> None:
                init(self, **check_options(cls, args, options))

            cls.__init__ = checked_init  # type: ignore[method-assign]

    def preprocess(self, inputs: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs, targets

    def training_loss(self, output: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
        """The loss the trainer minimises; by default the criterion of the logits."""
        return self(output.logits, targets)


def option_types(cls: type[Criterion]) -> dict[str, tuple[Any, bool, Any]]:
    """Each option of a criterion class: (type, whether None is allowed, default)."""
    init = inspect.unwrap(cls.__init__)
    if init is nn.Module.__init__ or init is object.__init__:
        return {}
    hints = get_type_hints(init)
    out = {}
    for name, p in inspect.signature(init).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        tp, optional = hints.get(name, Any), False
        if get_origin(tp) in (Union, UnionType):
            optional = type(None) in get_args(tp)
            tp = next((a for a in get_args(tp) if a is not type(None)), Any)
        out[name] = (tp, optional, p.default)
    return out


def _loss_label(cls: type[Criterion]) -> str:
    names = sorted(cls.__dict__.get("loss_names", ())) or [cls.__name__]
    return "loss " + " / ".join(repr(n) for n in names)


def _shown_default(default: Any) -> str:
    return str(default).lower() if isinstance(default, bool) or default is None else str(default)


def describe_options(cls: type[Criterion]) -> str:
    """'alpha (a number >= 0, default 1.0), fpr (true or false, default true)' or 'none'."""
    parts = []
    for name, (tp, optional, default) in sorted(option_types(cls).items()):
        what = _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))
        rng = cls.option_ranges.get(name)
        what += f" {rng}" if rng else ""
        what += " or null" if optional else ""
        parts.append(f"{name} ({what}, default {_shown_default(default)})")
    return ", ".join(parts) or "none"


def _coerce_option(cls: type[Criterion], name: str, value: Any) -> Any:
    """One option value checked against its declared type and range."""
    tp, optional, default = option_types(cls)[name]
    ok, v = False, value
    if value is None:
        ok = optional
    elif tp is float:
        if isinstance(v, str) and _DECIMAL.match(v.strip()):
            v = float(v)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        v = float(v) if ok else v
    elif tp is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif tp in (bool, str):
        ok = isinstance(v, tp)
    else:
        ok = True
    rng = cls.option_ranges.get(name)
    expected = _TYPE_WORDS.get(tp, str(tp)) + (f" {rng}" if rng else "") + (
        " or null" if optional else "")
    if ok and rng is not None and v is not None and not rng.holds(v):
        ok = False
    if not ok:
        raise OodbenchError(
            f"{_loss_label(cls)}: option {name!r} must be {expected}, got {value!r}",
            f"use e.g. `-o {name}={_shown_default(default)}` (or the benchmark's loss_options); "
            f"options of this loss: {describe_options(cls)}")
    return v


def check_options(cls: type[Criterion], args: tuple[Any, ...] = (),
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options of a criterion class (positional `args` in `__init__` order, then keyword
    `options`) checked and converted; an OodbenchError for an unknown one or a bad value."""
    declared = option_types(cls)
    named = dict(zip(declared, args, strict=False))
    if len(args) > len(declared):
        raise OodbenchError(f"{_loss_label(cls)} takes {len(declared)} option(s), "
                            f"got {len(args)} positional values",
                            f"options of this loss: {describe_options(cls)}")
    for name, value in (options or {}).items():
        if name not in declared:
            raise OodbenchError(f"{_loss_label(cls)} has no option {name!r}",
                                f"options of this loss: {describe_options(cls)}")
        if name in named:
            raise OodbenchError(f"{_loss_label(cls)}: option {name!r} given twice")
        named[name] = value
    return {name: _coerce_option(cls, name, value) for name, value in named.items()}


@dataclass(frozen=True)
class LossSpec:
    """`block_activation` names the backbone variant the loss is defined with: "relu" (any
    model) or "logsoftmax" (the ReLU after each residual addition replaced by a channel
    log-softmax; only models that list it in `ModelSpec.block_activations`)."""

    head: Callable[[int, int], nn.Module]
    criterion: type[Criterion]
    summary: str
    block_activation: str = "relu"

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options checked and converted without building the criterion (for checking a
        benchmark's `loss_options` up front)."""
        return check_options(self.criterion, (), options)

    def describe_options(self) -> str:
        return describe_options(self.criterion)


def _loss_spec(criterion: type[Criterion], *, head: Callable[[int, int], nn.Module],
               summary: str, block_activation: str = "relu", loss_name: str = "") -> LossSpec:
    """The registry entry of a decorated criterion class (which learns its registered names,
    for its option errors)."""
    criterion.loss_names = (*criterion.__dict__.get("loss_names", ()), loss_name)
    return LossSpec(head, criterion, summary, block_activation)


class LossRegistry(Registry[LossSpec]):
    """The registry that tells each criterion class the names it is registered under."""

    def register(self, name: str, **metadata: Any) -> Callable[[Any], Any]:
        return super().register(name, loss_name=name, **metadata)


LOSSES: LossRegistry = LossRegistry("loss", entry=_loss_spec)
