import numpy as np
import pytest
import torch

from oodbench.data import DATASETS, DataContext, InputTransform, augment
from oodbench.data.embedded import DIGITS_INFO


@pytest.fixture
def ctx(tmp_path):
    return DataContext.resolve(tmp_path / "data", tmp_path / "cache")


def test_digits_splits_are_disjoint_fixed_and_cover_all(ctx):
    src = DATASETS.get("digits")
    parts = {s: src.load(s, ctx) for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 1797
    rows = [set(map(bytes, p.images.reshape(len(p), -1).numpy())) for p in parts.values()]
    # sklearn digits holds a few exact duplicate images; splits may share those, nothing more.
    assert len(rows[0] & rows[2]) < 5 and len(rows[1] & rows[2]) < 5
    assert torch.equal(src.load("test", ctx).images, parts["test"].images)  # deterministic
    for p in parts.values():
        counts = np.bincount(p.labels.numpy(), minlength=10)
        assert counts.min() > 0.8 * counts.mean()  # stratified
        assert p.images.dtype == torch.uint8 and p.shape == (1, 8, 8)


def test_ood_sets_match_the_in_distribution_shape_and_range(ctx):
    patches = DATASETS.get("patches").load("test", ctx)
    assert patches.shape == (1, 8, 8) and (patches.labels == -1).all()
    per_patch_max = patches.images.reshape(len(patches), -1).max(dim=1).values
    assert (per_patch_max[per_patch_max > 0] == 255).all()  # stretched to the digits' range
    rgb = DIGITS_INFO.__class__(3, 32, 10, mean=(0.5,) * 3, std=(0.5,) * 3)
    noise = DATASETS.get("gaussian").load("test", ctx, like=rgb)
    assert noise.shape == (3, 32, 32)


def test_unknown_split_names_valid_ones(ctx):
    with pytest.raises(Exception, match="use one of: test"):
        DATASETS.get("patches").load("train", ctx)


def test_select_classes_relabels_in_order(ctx):
    test = DATASETS.get("digits").load("test", ctx)
    sub = test.select_classes([5, 7])
    assert set(sub.labels.tolist()) == {0, 1}
    assert len(sub) == int(((test.labels == 5) | (test.labels == 7)).sum())
    assert sub.info.num_classes == 2 and sub.info.class_names == ("5", "7")


def test_batched_crop_equals_per_sample_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    out = augment(x, crop_padding=2, generator=torch.Generator().manual_seed(0))
    dy = torch.randint(0, 5, (6,), generator=g)
    dx = torch.randint(0, 5, (6,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        expect = padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 7]
        assert torch.equal(out[i], expect)


def test_flip_mirrors_about_half_the_batch():
    x = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4).repeat(200, 1, 1, 1)
    out = augment(x, flip=True, generator=torch.Generator().manual_seed(1))
    flipped = (out[:, 0, 0, 0] == 3)
    assert torch.equal(out[flipped], x[flipped].flip(3))
    assert torch.equal(out[~flipped], x[~flipped])
    assert 60 < int(flipped.sum()) < 140


def test_transform_normalises_and_adapts_explicitly():
    t = InputTransform((0.5,), (0.25,))
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.allclose(t(x), torch.tensor([[[[-2.0, 2.0]]]]))
    rgb = InputTransform((0.5,) * 3, (0.5,) * 3).adapted(size=4, channels=3)
    y = rgb(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8))
    assert y.shape == (2, 3, 4, 4) and torch.allclose(y, torch.ones_like(y))
    assert t.key() != rgb.key()
