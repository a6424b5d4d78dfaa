"""What the registries hold, as tables: every detector with its paper, needs, fit, defaults and
grid, and which detector applies to which loss. `oodbench list detectors` prints it, and the
README's detector table is this module's Markdown (a test keeps them equal), so the docs are
generated from each detector's own record, never kept by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from oodbench.detectors import DETECTORS, Detector
from oodbench.losses import LOSSES


def head_kind(loss: str) -> str:
    """"linear" when the loss's head is a linear layer (logits = f Wᵀ + b), else "prototype"
    (IsoMax, IsoMax+, DisMax: logits from distances to learned prototypes)."""
    head = LOSSES.get(loss).head
    return "linear" if isinstance(head, type) and issubclass(head, nn.Linear) else "prototype"


def applicability(cls: type[Detector], loss: str) -> str:
    """"✓", "n/a" (the detector refuses this head) or "adapted" (a documented adaptation)."""
    if "head" not in cls.needs or head_kind(loss) == "linear":
        return "✓"
    rule = cls.applies_to_prototype_heads
    if rule is False:
        return "n/a"
    return "adapted" if isinstance(rule, str) else "✓"


def family(cls: type[Detector]) -> str:
    return cls.__module__.rsplit(".", 1)[-1].replace("_", " ")


def _value(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class DetectorRow:
    name: str
    family: str
    summary: str
    paper: str
    needs: str
    fit: str
    defaults: str
    grid: str
    applies: dict[str, str]


def detector_rows() -> list[DetectorRow]:
    hidden = {"selection", "search_samples", "batch_size"}
    rows = []
    for name, cls in DETECTORS.items():
        defaults = ", ".join(f"{k}={_value(h.default)}" for k, h in cls.hparams.items()
                             if k not in hidden and not isinstance(h.default, list))
        grid = "; ".join(f"{k} ∈ {{{', '.join(map(_value, v))}}}" for k, v in cls.grid.items())
        rows.append(DetectorRow(
            name, family(cls), cls.summary, cls.paper, ", ".join(sorted(cls.needs)),
            "in-dist train" if cls.requires_fit else "—", defaults or "—", grid or "—",
            {loss: applicability(cls, loss) for loss in LOSSES.names()}))
    return rows


def applies_summary(applies: dict[str, str]) -> str:
    """One cell for a terminal: "all", or which losses the detector refuses / adapts to (a
    column per loss does not fit 80 columns, the width of CI logs)."""
    parts = [f"{mark} on {', '.join(loss for loss, m in applies.items() if m == mark)}"
             for mark in ("n/a", "adapted") if mark in applies.values()]
    return "; ".join(parts) or "all"


def detector_markdown() -> str:
    """The README's detector table (name, family, paper, needs, fitted on, defaults, grid, and
    one column per loss)."""
    losses = LOSSES.names()
    head = ["detector", "family", "paper", "needs", "fitted on", "defaults", "grid", *losses]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in detector_rows():
        cells = [f"`{r.name}`", r.family, r.paper, r.needs, r.fit, r.defaults, r.grid,
                 *(r.applies[loss] for loss in losses)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
