"""Shared machinery of the detectors that run the model themselves: the batched forward with
gradients (`batched_forward`, the standalone twin of the pipeline's shared forward), input
gradients that keep the graph for the next detector, signed input steps in normalised space,
FGSM stand-in OOD samples, subsets, and the selection of hyperparameters on validation data.

Input steps follow the ODIN / Mahalanobis code: the step is taken on the NORMALISED input, and the
sign of the gradient is divided per channel by the normalisation std, so that ε is a step of ε
in [0, 1] pixel units on every channel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from oodbench.detectors.base import DetectorInput
from oodbench.errors import OodbenchError
from oodbench.summaries import summarise_blocks

if TYPE_CHECKING:
    from oodbench.models.base import ModelOutput

GRAD_BATCH = 128  # samples per batched backward pass
FGSM_EPSILON = 0.05  # FGSM step in [0, 1] pixel units (Lee et al. 2018's adversarial validation)
SELECTION_SEED = 0


def require_model(data: DetectorInput, detector: str) -> None:
    if data.model is None or (data.images is None and data.inputs is None):
        raise RuntimeError(f"{detector} needs the model and the images of {data.name!r}; "
                           "the pipeline passes them to detectors that declare 'grad'")


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and parameters without gradients, so a backward pass computes only the input
    gradient (about one forward pass of work, not two)."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def channel_std(data: DetectorInput, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(data.transform.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)


def input_batches(data: DetectorInput, batch_size: int = GRAD_BATCH
                  ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Normalised float input batches on the detector's device (from uint8 images through the
    set's transform, or from the precomputed inputs of a synthetic set)."""
    n = len(data)
    device = data.device or torch.device("cpu")
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        if data.inputs is not None:
            yield sl, data.inputs[sl].to(device)
        else:
            yield sl, data.transform(data.images.images[sl].to(device))


def batched_forward(data: DetectorInput, taps: tuple[str, ...], batch_size: int,
                    fn: Callable[[torch.Tensor, ModelOutput], np.ndarray]) -> np.ndarray:
    """fn(x, out) for every batch, concatenated: x the normalised batch as a leaf that requires
    grad, out = model.forward_all(x, taps) with its graph alive (parameters frozen, eval mode).
    The standalone twin of the pipeline's shared forward, so both give the same numbers."""
    model = data.model
    parts = []
    with frozen(model), torch.enable_grad():
        for _, x in input_batches(data, batch_size):
            x = x.detach().requires_grad_(True)
            parts.append(np.asarray(fn(x, model.forward_all(x, taps=taps))))
    return np.concatenate(parts)


def input_grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∇ₓ loss, keeping the graph: other detectors may differentiate the same shared forward."""
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g


def input_gradient(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
                   ) -> torch.Tensor:
    """∇ₓ of loss_fn(x) (a scalar), for a whole batch in one backward pass."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(x), x)
    return g


def signed_step(data: DetectorInput, x: torch.Tensor, grad: torch.Tensor, epsilon: float
                ) -> torch.Tensor:
    """x − ε · sign(grad) / std: a step that lowers the loss whose gradient is `grad`."""
    return x.detach() - epsilon * grad.sign() / channel_std(data, x)


def take(data: DetectorInput, index: torch.Tensor, name: str | None = None) -> DetectorInput:
    """The samples `index` of a set (cached outputs, images and labels alike)."""
    idx = index.long()
    return replace(
        data, name=name or data.name,
        logits=None if data.logits is None else data.logits[idx],
        labels=data.labels[idx.to(data.labels.device)],
        features=None if data.features is None else data.features[idx],
        blocks={k: v[idx] for k, v in data.blocks.items()},
        images=None if data.images is None else data.images.subset(idx.to(
            data.images.images.device)),
        inputs=None if data.inputs is None else data.inputs[idx],
        derived={k: v[idx] for k, v in data.derived.items()})


def subsample(data: DetectorInput, n: int) -> DetectorInput:
    """At most n samples, drawn with a fixed seed (selection runs on a bounded budget)."""
    if len(data) <= n:
        return data
    g = torch.Generator().manual_seed(SELECTION_SEED)
    return take(data, torch.randperm(len(data), generator=g)[:n].sort().values)


@torch.no_grad()
def forward_outputs(data: DetectorInput, taps: tuple[str, ...] = (),
                    batch_size: int = 512) -> DetectorInput:
    """`data` with logits, features and block summaries computed from its inputs (for synthetic
    sets that have no cache entry)."""
    model = data.model
    logits, feats, blocks = [], [], {}
    for _, x in input_batches(data, batch_size):
        out = model.forward_all(x, taps=taps)
        logits.append(out.logits.float().cpu())
        feats.append(out.features.float().cpu())
        for k, v in summarise_blocks(out.blocks).items():
            blocks.setdefault(k, []).append(v.float().cpu())
    return replace(data, logits=torch.cat(logits), features=torch.cat(feats),
                   blocks={k: torch.cat(v) for k, v in blocks.items()})


def fgsm_standin(val: DetectorInput, taps: tuple[str, ...] = (),
                 epsilon: float = FGSM_EPSILON, batch_size: int = GRAD_BATCH) -> DetectorInput:
    """FGSM-perturbed copies of in-distribution validation samples: x + ε·sign(∇ₓ CE(f(x), y))/std
    (true labels), clipped to the valid pixel range. The stand-in for OOD data in selection,
    as in Lee et al. (2018); no OOD sample is used."""
    require_model(val, "FGSM")
    model = val.model
    advs = []
    with frozen(model):
        for sl, x in input_batches(val, batch_size):
            y = val.labels[sl].to(x.device)
            g = input_gradient(lambda z, y=y: F.cross_entropy(model(z), y, reduction="sum"), x)
            adv = signed_step(val, x, -g, epsilon)  # minus a step down = a step up the loss
            std = channel_std(val, x)
            mean = torch.tensor(val.transform.mean, device=x.device, dtype=x.dtype)
            mean = mean.view(1, -1, 1, 1)
            adv = torch.maximum(torch.minimum(adv, (1 - mean) / std), (0 - mean) / std)
            advs.append(adv.cpu())
    synthetic = replace(val, name=f"fgsm({val.name})", inputs=torch.cat(advs), images=None,
                        labels=torch.full((len(val),), -1, dtype=torch.long), logits=None,
                        features=None, blocks={}, derived={})
    return forward_outputs(synthetic, taps)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from oodbench.metrics import ood_metrics

    return float(ood_metrics(pos, neg)["auroc"])


def choose(candidates: dict[Any, tuple[np.ndarray, np.ndarray | None]], mode: str
           ) -> tuple[Any, dict[str, float]]:
    """Pick the best candidate: mean in-distribution score ("id"), or AUROC of validation vs the
    stand-in / OOD validation samples ("fgsm", "ood"). Non-finite candidates are skipped."""
    table: dict[str, float] = {}
    for key, (pos, neg) in candidates.items():
        if not np.isfinite(pos).all() or (neg is not None and not np.isfinite(neg).all()):
            table[str(key)] = float("nan")
            continue
        table[str(key)] = float(pos.mean()) if mode == "id" else auroc(pos, neg)
    finite = {k: v for k, v in table.items() if np.isfinite(v)}
    if not finite:
        raise OodbenchError("every hyperparameter candidate gave non-finite scores",
                            "check the model's outputs on the validation split")
    best = max(finite, key=lambda k: finite[k])
    key = next(k for k in candidates if str(k) == best)
    return key, table


def negatives(mode: str, val: DetectorInput, ood_val: DetectorInput | None,
              taps: tuple[str, ...] = ()) -> DetectorInput | None:
    """The samples treated as OOD during selection: none ("id"), FGSM copies of the validation
    samples ("fgsm"), or the user's OOD validation set ("ood", only when asked explicitly)."""
    if mode == "fgsm":
        return fgsm_standin(val, taps)
    if mode == "ood":
        if ood_val is None:
            raise OodbenchError("selection 'ood' needs an OOD validation set",
                                "pass `--ood-validation DATASET`, or use --selection fgsm / id")
        return ood_val
    return None
