"""Covariate-shift corruptions: each one against an independent computation of its CIFAR-10-C
formula, determinism, growth with severity, the `shift:` config section and `load_shifted`."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from oodbench.config import BenchmarkConfig, RunConfig, ShiftConfig, is_plain_name, load_benchmark
from oodbench.data import DataContext
from oodbench.data.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    check_corruption_names,
    check_severity,
    corrupt,
    noise_seed,
    shifted_name,
)
from oodbench.data.embedded import Digits
from oodbench.errors import OodbenchError

REPO = Path(__file__).resolve().parent.parent
DIGITS = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
CIFAR_C = {  # make_cifar_c.py's tables, severity 1..5
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}


def tiny(c: int = 3, h: int = 8, w: int = 8, n: int = 2, seed: int = 0) -> np.ndarray:
    """A small hand-made batch: a gradient, an edge and some texture, uint8 N×C×H×W."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255.0 / max(w - 1, 1)) * 0.6 + (yy >= h // 2) * 90.0
    img = base[None, None] + rng.normal(0, 20, (n, c, h, w))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def run(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    return corrupt(torch.from_numpy(x), name, severity, seed).numpy()


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)


def close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to a float32-vs-float64 rounding tie (at most 1 level, rarely)."""
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02, (diff.max(), (diff > 0).mean())


def test_registry_holds_the_cifar_c_tables():
    for name, levels in CIFAR_C.items():
        assert CORRUPTIONS.get(name).levels == pytest.approx(levels)
    assert set(CIFAR_C) <= set(CORRUPTIONS.names())


def test_gaussian_noise_is_x_plus_seeded_normal_noise():
    x = tiny()
    severity = 3
    g = torch.Generator().manual_seed(noise_seed("gaussian_noise", severity, 0))
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32).numpy().astype(np.float64)
    close(run(x, "gaussian_noise", severity), to_uint8(x / 255.0 + 0.08 * noise))


def test_gaussian_blur_is_scipys_gaussian_filter():
    from scipy.ndimage import gaussian_filter

    for h, sigma in ((8, 0.7), (32, 0.7), (64, 1.4)):  # σ in pixels up to 32, ×s/32 above
        x = tiny(h=h, w=h)
        want = gaussian_filter(x / 255.0, sigma=(0, 0, sigma, sigma), mode="nearest",
                               truncate=4.0)
        close(run(x, "gaussian_blur", 3), to_uint8(want))


def test_contrast_scales_around_each_images_channel_mean():
    x = tiny()
    f = x / 255.0
    mean = f.mean(axis=(2, 3), keepdims=True)
    close(run(x, "contrast", 2), to_uint8((f - mean) * 0.5 + mean))


def test_pixelate_is_block_means_then_nearest_upsampling():
    x = tiny(h=32, w=32)
    severity, m, s = 5, 20, 32  # int(32 · 0.65) = 20
    f = x.astype(np.float64)
    small = np.empty(x.shape[:2] + (m, m))
    lo = [int(np.floor(i * s / m)) for i in range(m)]
    hi = [int(np.ceil((i + 1) * s / m)) for i in range(m)]
    for i in range(m):
        for j in range(m):
            small[:, :, i, j] = f[:, :, lo[i]:hi[i], lo[j]:hi[j]].mean(axis=(2, 3))
    src = np.minimum(np.floor((np.arange(s) + 0.5) * m / s).astype(int), m - 1)
    want = np.rint(small[:, :, src][:, :, :, src]).astype(np.uint8)  # ties to even
    np.testing.assert_array_equal(run(x, "pixelate", severity), want)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_compression_equals_pil_at_the_documented_quality(channels):
    Image = pytest.importorskip("PIL.Image")
    x = tiny(c=channels, h=16, w=16)
    for severity, quality in zip(SEVERITIES, CIFAR_C["jpeg_compression"], strict=True):
        want = []
        for im in x:
            buf = io.BytesIO()
            Image.fromarray(im.transpose(1, 2, 0) if channels == 3 else im[0]).save(
                buf, "JPEG", quality=quality)
            dec = np.array(Image.open(buf))
            want.append(dec.transpose(2, 0, 1) if dec.ndim == 3 else dec[None])
        np.testing.assert_array_equal(run(x, "jpeg_compression", severity), np.stack(want))


@pytest.mark.parametrize("name", sorted(CIFAR_C))
def test_deterministic_uint8_same_shape(name):
    x = tiny(n=5)
    a, b = run(x, name, 4), run(x, name, 4)
    assert a.dtype == np.uint8 and a.shape == x.shape
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, x)


def test_noise_differs_by_seed_and_severity():
    x = tiny(n=3)
    noise = [run(x, "gaussian_noise", s, seed).astype(int) - x for s, seed in
             ((2, 0), (2, 1), (3, 0))]
    assert not np.array_equal(noise[0], noise[1])
    assert not np.array_equal(noise[0] * 0.08 / 0.06, noise[2])  # not a rescaled draw


def _digits_test() -> np.ndarray:
    return Digits().load("test", DataContext(Path("."), Path("."))).images.numpy()


@pytest.mark.parametrize("name", ["gaussian_noise", "gaussian_blur", "contrast",
                                  "jpeg_compression"])
def test_change_grows_with_severity_on_digits(name):
    x = _digits_test()
    change = [np.abs(run(x, name, s).astype(float) - x).mean() for s in SEVERITIES]
    assert change[0] > 0.5, change  # visible at severity 1 (8×8 images, σ not shrunk)
    assert all(a < b for a, b in zip(change[:-1], change[1:], strict=True)), change


def test_pixelate_keeps_fewer_distinct_rows_and_columns_with_severity():
    """Pixelate's pixel change does not grow with severity (grid misalignment, as in
    CIFAR-10-C); the resolution left does: at most int(s·f) distinct rows and columns."""
    x = tiny(c=3, h=32, w=32, n=4)
    sizes = []
    for s in SEVERITIES:
        y = run(x, "pixelate", s)
        cols = max(len({y[i, :, :, j].tobytes() for j in range(32)}) for i in range(len(y)))
        rows = max(len({y[i, :, j, :].tobytes() for j in range(32)}) for i in range(len(y)))
        assert max(rows, cols) <= int(32 * CIFAR_C["pixelate"][s - 1])
        sizes.append(max(rows, cols))
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1], sizes


def test_severity_and_names_are_checked():
    x = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    for bad in (0, 6, 2.0, True, "3"):
        with pytest.raises(OodbenchError, match="severity"):
            check_severity(bad)
    with pytest.raises(OodbenchError, match="corruption"):
        corrupt(x, "frost", 1)
    with pytest.raises(OodbenchError) as e:
        check_corruption_names(["contrast", "frost", "fogg"])
    assert "'frost', 'fogg'" in e.value.message and "gaussian_noise" in (e.value.hint or "")
    check_corruption_names(list(CIFAR_C))


def test_set_names_are_plain_file_names():
    for name in CORRUPTIONS.names():
        for s in SEVERITIES:
            assert is_plain_name(shifted_name(name, s))
    assert shifted_name("gaussian_noise", 3) == "shift-gaussian_noise-3"


# ---------------------------------------------------------------------------------------------
# The `shift:` section.


def bench(shift: object) -> BenchmarkConfig:
    raw = copy.deepcopy(DIGITS)
    raw["shift"] = shift
    return BenchmarkConfig.from_dict(raw, "b.yaml")


def test_shift_section_parses_round_trips_and_defaults():
    cfg = bench({"corruptions": ["contrast"]})
    assert cfg.shift == ShiftConfig(["contrast"], [1, 2, 3, 4, 5])
    assert BenchmarkConfig.from_dict(cfg.to_dict()).shift == cfg.shift
    assert bench(None).shift is None
    raw = copy.deepcopy(DIGITS)
    raw.pop("shift", None)
    assert BenchmarkConfig.from_dict(raw).shift is None


@pytest.mark.parametrize("shift, expected", [
    ({"corruptions": ["contrast"], "severities": [0, 2]}, "shift.severities[0]` must be in [1, 5]"),
    ({"corruptions": ["contrast"], "severities": [6]}, "must be in [1, 5]"),
    ({"corruptions": ["contrast"], "severities": [2.5]}, "must be an integer"),
    ({"corruptions": ["contrast"], "severities": 3}, "must be a list of integers"),
    ({"corruptions": "contrast"}, "must be a list of strings"),
    ({"corruptions": []}, "`shift.corruptions` is empty"),
    ({"corruptions": ["contrast"], "severities": []}, "`shift.severities` is empty"),
    ({"corruptions": ["contrast", "contrast"]}, "repeats"),
    ({"corruptions": ["contrast"], "severities": [1, 1]}, "repeats"),
    ({"corruptions": ["../x"]}, "is not a corruption name"),
    ({"severities": [1]}, "`shift.corruptions` is missing"),
    ({"corruptions": ["contrast"], "severity": [1]}, "`shift.severity` is not a known key"),
    ("contrast", "`shift` must be a mapping"),
])
def test_shift_section_errors_name_the_key(shift, expected):
    with pytest.raises(OodbenchError) as e:
        bench(shift)
    assert expected in e.value.message and e.value.message.startswith("b.yaml: ")


def test_shipped_benchmarks_name_registered_corruptions():
    for name in ("digits", "cifar10-jpeg"):
        shift = load_benchmark(name).shift
        assert shift is not None
        check_corruption_names(shift.corruptions)


def test_load_shifted_keeps_the_test_labels_and_the_model_transform(tmp_path):
    from oodbench.experiment import in_distribution_info, load_in_distribution, load_shifted

    cfg = RunConfig(load_benchmark("digits"), "softmax", 0)
    ctx = DataContext(tmp_path, tmp_path / "cache")
    test = load_in_distribution(cfg, "test", ctx)
    data, transform = load_shifted(cfg, "gaussian_noise", 2, ctx)
    assert data.name == "shift-gaussian_noise-2" and is_plain_name(data.name)
    assert torch.equal(data.labels, test.labels) and data.images.shape == test.images.shape
    assert torch.equal(data.images, corrupt(test.images, "gaussian_noise", 2))
    assert transform.key() == transform.for_model(in_distribution_info(cfg)).key()
    assert data.fingerprint() == load_shifted(cfg, "gaussian_noise", 2, ctx)[0].fingerprint()
    with pytest.raises(OodbenchError, match="frost"):
        load_shifted(cfg, "frost", 2, ctx)
