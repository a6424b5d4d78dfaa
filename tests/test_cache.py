import numpy as np
import pytest
import torch

from oodbench.cache import OutputCache, cache_key, code_digest, model_digest
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
        return original(x, taps=taps)

    model.forward_all = counting
    return model, data, InputTransform.for_model(DIGITS_INFO), OutputCache(tmp_path / "c"), calls


def test_second_request_runs_no_forward_pass(setup):
    model, data, tf, cache, calls = setup
    w = model_digest(model)
    first, computed = cache.get(model, w, data, tf, batch_size=100)
    n_first = calls["n"]
    assert computed and n_first == 6  # 540 samples in batches of 100
    second, computed = cache.get(model, w, data, tf, batch_size=100)
    assert not computed and calls["n"] == n_first
    assert torch.equal(first.logits, second.logits)
    with torch.no_grad():
        direct = model(tf(data.images[:10]))
    assert torch.allclose(second.logits[:10], direct, atol=1e-5)
    assert torch.equal(second.labels, data.labels)


def test_blocks_are_added_in_one_pass_without_recomputing_logits(setup):
    model, data, tf, cache, calls = setup
    w = model_digest(model)
    cache.get(model, w, data, tf, batch_size=540)
    out, computed = cache.get(model, w, data, tf, keys=("block1.mean", "block3.mean"),
                              batch_size=540)
    assert calls["n"] == 2 and computed
    assert out.blocks["block3.mean"].shape == (540, 128)
    _, computed = cache.get(model, w, data, tf, keys=("block3.mean",), batch_size=540)
    assert calls["n"] == 2 and not computed
    with torch.no_grad():
        direct = model.forward_all(tf(data.images[:5]), taps=("block3",)).blocks["block3"]
    torch.testing.assert_close(out.blocks["block3.mean"][:5], direct.mean(dim=(2, 3)),
                               atol=1e-5, rtol=1e-5)


def test_only_the_requested_summaries_are_computed(setup):
    """A detector that reads block means never pays for the channel-softmax statistics."""
    model, data, tf, cache, calls = setup
    w = model_digest(model)
    cache.get(model, w, data, tf, keys=("block2.mean",), batch_size=540)
    entry = cache.entry(cache_key(w, data, tf, code_digest(model)))
    stored = sorted(p.name for p in (entry.path / "blocks").iterdir())
    assert stored == ["block2.mean.npy"]
    taps = []
    original = model.forward_all

    def recording(x, taps_=(), **kw):
        taps.append(tuple(kw.get("taps", taps_)))
        return original(x, **kw) if "taps" in kw else original(x, taps_)

    model.forward_all = recording
    cache.get(model, w, data, tf, keys=("block2.mean", "block1.softmax"), batch_size=540)
    assert taps == [("block1",)]  # one pass, tapping only the block still missing
    assert sorted(p.name for p in (entry.path / "blocks").iterdir()) == [
        "block1.softmax.npy", "block2.mean.npy"]


def test_a_truncated_entry_is_an_error_naming_the_fix(setup):
    from oodbench.errors import OodbenchError

    model, data, tf, cache, _ = setup
    w = model_digest(model)
    cache.get(model, w, data, tf, batch_size=540)
    entry = cache.entry(cache_key(w, data, tf, code_digest(model)))
    logits = entry.path / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:-400])
    with pytest.raises(OodbenchError) as e:
        cache.get(model, w, data, tf, batch_size=540)
    assert "delete the folder" in e.value.hint and str(entry.path) in e.value.hint


def test_key_covers_weights_data_and_transform(setup):
    model, data, tf, _, _ = setup
    w = model_digest(model)
    base = cache_key(w, data, tf, code_digest(model))
    assert cache_key(w, data, tf, "other code") != base
    with torch.no_grad():
        model.head.bias[0] += 1e-3
    assert cache_key(model_digest(model), data, tf, code_digest(model)) != base
    other = data.subset(torch.arange(len(data) - 1))
    assert cache_key(w, other, tf, code_digest(model)) != base
    assert cache_key(w, data, tf.adapted(16, 1), code_digest(model)) != base
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
        return original(x, taps=taps)

    model.forward_all = failing
    with pytest.raises(KeyboardInterrupt):
        cache.get(model, w, data, tf, batch_size=100)
    entry = cache.entry(cache_key(w, data, tf, code_digest(model))).path
    assert not list(entry.glob("*.npy")) and not (entry / "meta.json").exists()
    assert not list(entry.glob("*.tmp*"))
    model.forward_all = original
    out, computed = cache.get(model, w, data, tf, batch_size=100)
    assert computed and np.isfinite(out.logits.numpy()).all()


KILLED_WRITER = """
import sys, time, torch
from pathlib import Path
from oodbench.cache import CacheEntry, EntryWriter
from oodbench.models import ModelOutput

entry = CacheEntry(Path(sys.argv[1]), 100)
writer = EntryWriter(entry, ["logits", "features", "b1.mean"], torch.zeros(100), "x")
writer.write(0, ModelOutput(torch.ones(50, 10), torch.ones(50, 4),
                            {"b1": torch.ones(50, 3, 2, 2)}))
print("mid-pass", flush=True)
time.sleep(120)
"""


def test_temporaries_of_a_killed_forward_pass_are_removed_live_ones_kept(setup, tmp_path):
    """A real writer killed with SIGKILL mid-pass; reopening the cache removes its files and
    leaves those of a live writer (this process) alone."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from oodbench.cache import CacheEntry, EntryWriter

    model, data, tf, _, _ = setup
    root = tmp_path / "killed-cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root / "k")], env=env,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "mid-pass"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    left = sorted(p.name for p in root.rglob("*") if p.is_file())
    assert left == sorted(f"{n}.npy.tmp-{child.pid}-" + left[0].rsplit("-", 1)[1]
                          for n in ("b1.mean", "features", "logits"))
    live = EntryWriter(CacheEntry(root / "live", 4), ["logits"], torch.zeros(4), "x")
    live_file = root / "live" / f"logits.npy{live.tag}"
    live_file.parent.mkdir(parents=True)
    live_file.write_bytes(b"being written")

    cache = OutputCache(root)
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == [live_file.name]
    out, computed = cache.get(model, model_digest(model), data, tf, batch_size=540)
    assert computed and out.logits.shape == (540, 10)


def test_a_derived_output_is_stored_once_and_keyed_by_everything_it_depends_on(tmp_path):
    from oodbench.cache import CacheEntry
    from oodbench.errors import OodbenchError

    entry = CacheEntry(tmp_path / "entry", 3)
    made = []

    def compute() -> torch.Tensor:
        made.append(1)
        return torch.arange(6, dtype=torch.float32).reshape(3, 2) / 7

    first, new, took = entry.derived("knn.topk", {"K": 2, "fit": "train-a"}, [__file__], compute)
    again, new_again, took_again = entry.derived("knn.topk", {"K": 2, "fit": "train-a"},
                                                 [__file__], compute)
    assert new and not new_again and len(made) == 1
    assert took_again == took > 0  # the compute time is kept, not the time of reading it
    assert torch.equal(first, again) and again.dtype == torch.float32  # exact round trip
    for params, code in [({"K": 2, "fit": "train-b"}, [__file__]),  # another bank
                         ({"K": 3, "fit": "train-a"}, [__file__]),  # another K
                         ({"K": 2, "fit": "train-a"}, [__file__, np.__file__])]:  # other code
        assert entry.derived("knn.topk", params, code, compute)[1]
    assert len(made) == 4 and len(list((tmp_path / "entry" / "derived").glob("*.npy"))) == 4
    short = CacheEntry(tmp_path / "entry", 5)  # a file of another length is refused
    with pytest.raises(OodbenchError, match="holds 3 rows, expected 5"):
        short.derived("knn.topk", {"K": 2, "fit": "train-a"}, [__file__], compute)
