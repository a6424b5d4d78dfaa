import numpy as np
import pytest
import torch

from oodbench.cache import OutputCache, cache_key, model_digest
from oodbench.data import DATASETS, DataContext, InputTransform
from oodbench.data.embedded import DIGITS_INFO
from oodbench.losses import LOSSES
from oodbench.models import build_classifier


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("smallcnn8", LOSSES.get("softmax").head, 10, 1, 8).eval()
    data = DATASETS.get("digits").load("test", DataContext.resolve(tmp_path, tmp_path))
    calls = {"n": 0}
    original = model.forward_all

    def counting(x, taps=()):
        calls["n"] += 1
        return original(x, taps)

    model.forward_all = counting
    return model, data, InputTransform.for_model(DIGITS_INFO), OutputCache(tmp_path / "c"), calls


def test_second_request_runs_no_forward_pass(setup):
    model, data, tf, cache, calls = setup
    w = model_digest(model)
    first = cache.get(model, w, data, tf, batch_size=100)
    n_first = calls["n"]
    assert first.computed and n_first == 6  # 540 samples in batches of 100
    second = cache.get(model, w, data, tf, batch_size=100)
    assert not second.computed and calls["n"] == n_first
    assert torch.equal(first.logits, second.logits)
    with torch.no_grad():
        direct = model(tf(data.images[:10]))
    assert torch.allclose(second.logits[:10], direct, atol=1e-5)
    assert torch.equal(second.labels, data.labels)


def test_blocks_are_added_in_one_pass_without_recomputing_logits(setup):
    model, data, tf, cache, calls = setup
    w = model_digest(model)
    cache.get(model, w, data, tf, batch_size=540)
    out = cache.get(model, w, data, tf, blocks=("block1", "block3"), batch_size=540)
    assert calls["n"] == 2 and out.computed
    assert out.blocks["block3.mean"].shape == (540, 128)
    cache.get(model, w, data, tf, blocks=("block3",), batch_size=540)
    assert calls["n"] == 2


def test_key_covers_weights_data_and_transform(setup):
    model, data, tf, _, _ = setup
    w = model_digest(model)
    base = cache_key(w, data, tf)
    with torch.no_grad():
        model.head.bias[0] += 1e-3
    assert cache_key(model_digest(model), data, tf) != base
    other = data.subset(torch.arange(len(data) - 1))
    assert cache_key(w, other, tf) != base
    assert cache_key(w, data, tf.adapted(16, 1)) != base
    # BatchNorm running statistics are weights too.
    model.backbone.stages[0][0][1].running_mean += 1
    assert model_digest(model) != w


def test_interrupted_forward_leaves_no_entry(setup, monkeypatch):
    model, data, tf, cache, calls = setup
    w = model_digest(model)
    original = model.forward_all

    def failing(x, taps=()):
        if calls["n"] >= 2:
            raise KeyboardInterrupt
        return original(x, taps)

    model.forward_all = failing
    with pytest.raises(KeyboardInterrupt):
        cache.get(model, w, data, tf, batch_size=100)
    entry = cache.entry(cache_key(w, data, tf))
    assert not list(entry.glob("*.npy")) and not (entry / "meta.json").exists()
    assert not list(entry.glob("*.tmp*"))
    model.forward_all = original
    out = cache.get(model, w, data, tf, batch_size=100)
    assert out.computed and np.isfinite(out.logits.numpy()).all()
