"""Converting published pretrained checkpoints into oodbench `Classifier` state dicts.

A `CheckpointFormat` recognises a foreign checkpoint, renames its keys onto
`Classifier(backbone, head)` and says which input normalisation the weights were trained with
(which the imported run must then use instead of the dataset's own).

Known formats:
- `akamaster`: Yerlan Idelbayev's CIFAR-10 ResNet-20/32/44/56 (`pytorch_resnet_cifar10`): a dict
  with `state_dict` (keys prefixed `module.`; `linear.*` is the classifier) and `best_prec1`;
  inputs normalised with the ImageNet mean/std.
- `state-dict`: a registered model's plain `Classifier.state_dict()` (keys `backbone.*`,
  `head.*`), saved as is, wrapped as `{"state_dict": ...}` / `{"model": ...}` /
  `{"model_state_dict": ...}`, and/or with `module.` prefixes (DataParallel); every key under
  `backbone.` / `head.` (other dicts of tensors stay "not a known format"); inputs normalised
  as the benchmark's dataset (how oodbench trains them). Any registered model (`models` empty).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oodbench.errors import OodbenchError
from oodbench.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CheckpointFormat:
    detect: Callable[[dict[str, Any]], bool]
    convert: Callable[[dict[str, Any]], dict[str, torch.Tensor]]
    mean: tuple[float, ...] | None  # None: the benchmark dataset's own normalisation
    std: tuple[float, ...] | None
    models: tuple[str, ...]  # empty: any registered model
    summary: str


def _checkpoint_format(convert: Callable[[dict[str, Any]], dict[str, torch.Tensor]], *,
                       detect: Callable[[dict[str, Any]], bool],
                       mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                       models: tuple[str, ...], summary: str
                       ) -> CheckpointFormat:
    """The registry entry of a decorated `convert` function."""
    return CheckpointFormat(detect, convert, mean, std, models, summary)


# `@CHECKPOINT_FORMATS.register(name, detect=..., mean=..., std=..., models=..., summary=...)`
# on the format's convert function.
CHECKPOINT_FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format",
                                                          entry=_checkpoint_format)


def _akamaster_detect(raw: dict[str, Any]) -> bool:
    sd = raw.get("state_dict")
    return isinstance(sd, dict) and "module.linear.weight" in sd and "module.conv1.weight" in sd


@CHECKPOINT_FORMATS.register(
    "akamaster", detect=_akamaster_detect, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    models=("resnet20", "resnet32", "resnet44", "resnet56"),
    summary="akamaster/pytorch_resnet_cifar10 ResNet-20/32/44/56 (CIFAR-10, ImageNet "
    "normalisation)")
def _akamaster_convert(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in raw["state_dict"].items():
        name = key.removeprefix("module.")
        if name.startswith("linear."):
            out["head." + name.removeprefix("linear.")] = value
        else:
            out["backbone." + name] = value
    # Saved before BatchNorm tracked its batch count; the count is unused with a fixed momentum.
    for key in list(out):
        if key.endswith(".running_mean"):
            out.setdefault(key.removesuffix("running_mean") + "num_batches_tracked",
                           torch.tensor(0, dtype=torch.long))
    return out


STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict")


def _tensors(obj: Any) -> dict[str, torch.Tensor] | None:
    """`obj` when it is a non-empty dict of tensors with string keys, else None."""
    if isinstance(obj, dict) and obj and all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return obj
    return None


def _plain_state(raw: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The state dict of an oodbench `Classifier` in `raw` (every key under `backbone.` or
    `head.`, after any `module.` prefix), else None: other dicts of tensors stay unknown."""
    found = _tensors(raw)
    for key in STATE_DICT_WRAPPERS:
        found = found or _tensors(raw.get(key))
    if found is None:
        return None
    names = [k.removeprefix("module.") for k in found]
    return found if all(n.startswith(("backbone.", "head.")) for n in names) else None


@CHECKPOINT_FORMATS.register(
    "state-dict", detect=lambda raw: _plain_state(raw) is not None, mean=None, std=None,
    models=(), summary="a registered model's plain state_dict (optionally under "
    "\"state_dict\" / \"model\", keys optionally prefixed `module.`), input normalised as "
    "the benchmark's dataset")
def _state_dict_convert(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    state = _plain_state(raw)
    assert state is not None
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def read_foreign_checkpoint(path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(format name, converted state dict, metadata) of a checkpoint file of a known format."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise OodbenchError(f"checkpoint {path} does not exist", "give an existing file") from None
    except Exception as e:
        raise _unreadable(path, e) from None
    if not isinstance(raw, dict):
        raw = {}
    for name, fmt in CHECKPOINT_FORMATS.items():
        if fmt.detect(raw):
            meta = {k: float(v) for k, v in raw.items()
                    if k != "state_dict" and isinstance(v, (int, float))
                    and not isinstance(v, bool)}
            return name, fmt.convert(raw), meta
    raise OodbenchError(f"{path} is not a checkpoint of a known format",
                        f"known formats: {', '.join(CHECKPOINT_FORMATS.names())}")


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive (PyTorch 1.6 on)
PICKLE_MAGIC = b"\x80"  # a pickle's protocol opcode: torch.save's legacy format


def accepted_formats() -> str:
    return "; ".join(f"{name}: {fmt.summary}" for name, fmt in CHECKPOINT_FORMATS.items())


def _unreadable(path: Path, error: Exception) -> OodbenchError:
    """Why `torch.load` failed on `path`, in words: not a PyTorch file at all, one holding
    objects a weights-only load refuses, or a damaged one."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as e:
        return OodbenchError(f"cannot read checkpoint {path}: {e}", "give a readable file")
    formats = f"a file written by torch.save holding one of: {accepted_formats()}"
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        return OodbenchError(f"{path} is not a PyTorch checkpoint (neither the zip archive nor "
                             "the legacy pickle that torch.save writes)", f"give {formats}")
    text = str(error).strip()
    first = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
    if "weights only" in first.lower():
        return OodbenchError(
            f"{path} holds Python objects other than tensors, numbers, strings and plain "
            "containers, which are not unpickled here (loading them can run arbitrary code)",
            "load it in Python yourself and save the weights alone: "
            "torch.save(model.state_dict(), NEW.pt), then import NEW.pt")
    return OodbenchError(f"{path} looks like a PyTorch checkpoint but cannot be read, damaged or "
                         f"truncated (torch.load: {first})",
                         f"copy the file again, or give {formats}")
