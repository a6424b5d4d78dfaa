"""Every model runs a forward pass at its input size and exposes features and block outputs; the
He CIFAR ResNets use parameter-free option-A shortcuts and load the akamaster checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oodbench.models import MODELS, build_classifier
from oodbench.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, read_foreign_checkpoint
from oodbench.models.resnet import PadShortcut

REPO = Path(__file__).resolve().parent.parent
CIFAR_SIZE = 32


def data_root() -> Path | None:
    for p in (os.environ.get("OODBENCH_DATA"), REPO.parent / "shared" / "data"):
        if p and Path(p).is_dir():
            return Path(p)
    return None


# Every model once; the log-softmax variant (the same code path in every ResNet) on the cheap ones.
CASES = [(n, "relu") for n in MODELS.names()] + [
    (n, "logsoftmax") for n in ("resnet20", "smallcnn8", "smallcnn28")]


@pytest.mark.parametrize(("name", "activation"), CASES)
def test_forward_at_input_size(name: str, activation: str) -> None:
    spec = MODELS.get(name)
    size = spec.image_sizes[0] if spec.image_sizes else CIFAR_SIZE
    channels = 1 if spec.image_sizes else 3
    torch.manual_seed(0)
    model = build_classifier(name, torch.nn.Linear, 10, channels, size, activation).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        out = model.forward_all(x, taps=model.block_names)
        logits = model(x)
    assert out.logits.shape == (2, 10) and torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits, logits)
    assert out.features.shape == (2, model.backbone.feature_dim)
    assert set(out.blocks) == set(model.block_names)
    for block in out.blocks.values():
        assert block.dim() == 4 and block.shape[0] == 2
    if activation == "logsoftmax":  # block outputs are per-position channel log-probabilities
        for block in out.blocks.values():
            torch.testing.assert_close(block.exp().sum(1), torch.ones_like(block[:, 0]))


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


@pytest.mark.parametrize(("depth", "params"), [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6),
                                               (56, 0.85e6)])
def test_he_resnet_sizes_match_the_paper(depth: int, params: float) -> None:
    model = build_classifier(f"resnet{depth}", torch.nn.Linear, 10, 3, 32)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.02
    assert not any("shortcut" in k for k in model.state_dict())  # option A: no parameters


def test_densenet_bc_100_and_wrn_28_10_sizes() -> None:
    dn = build_classifier("densenet100", torch.nn.Linear, 10, 3, 32)
    assert dn.backbone.feature_dim == 342
    assert abs(sum(p.numel() for p in dn.parameters()) - 0.77e6) < 0.02e6
    assert MODELS.get("wrn28-10").summary.startswith("WideResNet-28-10")


def test_unknown_checkpoint_format_is_a_clear_error(tmp_path: Path) -> None:
    from oodbench.errors import OodbenchError

    path = tmp_path / "x.pt"
    torch.save({"state_dict": {"weird.weight": torch.zeros(1)}}, path)
    with pytest.raises(OodbenchError, match="known format"):
        read_foreign_checkpoint(path)


def test_pretrained_resnet20_loads_and_classifies_cifar10_jpeg() -> None:
    root = data_root()
    ckpts = sorted((root / "models" / "akamaster-resnet-cifar10").glob("resnet20-*.th")) \
        if root else []
    if not ckpts:
        pytest.skip("no akamaster ResNet-20 checkpoint (set OODBENCH_DATA or ../shared/data)")
    fmt, state, meta = read_foreign_checkpoint(ckpts[0])
    assert fmt == "akamaster" and meta["best_prec1"] > 90
    model = build_classifier("resnet20", torch.nn.Linear, 10, 3, 32)
    model.load_state_dict(state, strict=True)
    model.eval()
    test = root / "cifar10-jpeg" / "test"
    if not test.is_dir():
        pytest.skip("no cifar10-jpeg test split")
    import numpy as np
    from PIL import Image

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
    images, labels = [], []
    for label, c in enumerate(classes):
        for f in sorted((test / c).glob("*.jpg"))[:20]:
            images.append(np.asarray(Image.open(f).convert("RGB")))
            labels.append(label)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1)
    with torch.no_grad():
        acc = (model(x).argmax(1) == torch.tensor(labels)).float().mean().item()
    assert acc > 0.7  # ≈ 81 % on the whole JPEG test set; 200 images here
