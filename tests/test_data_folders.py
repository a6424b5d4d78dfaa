"""Hostile image folders: link loops, links out of the folder, files that are not images, and
relative `folder:` paths. Every failure is an OodbenchError naming the file and the fix."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from oodbench.data import DataContext, absolute_dataset_name, get_dataset
from oodbench.data.folders import _not_an_image, list_folder
from oodbench.errors import OodbenchError


def write_png(path: Path, size: int = 8, seed: int = 0, channels: int = 3) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, channels) if channels == 3 else (size, size)
    a = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(a).save(path)


def ctx_for(tmp_path: Path) -> DataContext:
    return DataContext(tmp_path / "data", tmp_path / "cache")


def test_walk_skips_link_loops_and_links_out_of_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_png(root / "a.png")
    write_png(root / "sub" / "b.png", seed=1)
    os.symlink(".", root / "loop")  # loop -> .
    os.symlink("..", root / "sub" / "up")  # a loop one level down
    os.symlink("/", root / "escape")  # escape -> /  (would walk /proc)
    os.symlink(root / "sub", root / "alias")  # a second way into sub/: walked once
    listing = list_folder(root)
    rel = [os.path.relpath(f, root) for f in listing.files]
    assert len(rel) == 2 and "a.png" in rel
    assert {os.path.realpath(f) for f in listing.files} == {str((root / "a.png").resolve()),
                                                            str((root / "sub/b.png").resolve())}
    assert list(listing.labels) == [-1, -1]


def test_links_are_not_classes_of_a_labelled_folder(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    write_png(root / "cat" / "0.png")
    write_png(root / "dog" / "0.png", seed=1)
    os.symlink(".", root / "loop")
    os.symlink("/", root / "escape")
    data = get_dataset(f"folder:{root}").load("test", ctx_for(tmp_path))
    assert data.info.class_names == ("cat", "dog")
    assert data.labels.tolist() == [0, 1]


def test_an_image_link_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "elsewhere" / "x.png")
    root = tmp_path / "set"
    write_png(root / "a.png")
    os.symlink(root / "a.png", root / "same.png")  # a link inside the folder is fine
    assert len(list_folder(root).files) == 2
    os.symlink(tmp_path / "elsewhere" / "x.png", root / "out.png")
    with pytest.raises(OodbenchError, match=r"out\.png is a link to .*elsewhere/x\.png, "
                                            r"outside the dataset folder") as e:
        list_folder(root)
    assert "copy the image into the folder" in e.value.hint


def test_a_linked_root_folder_is_walked(tmp_path: Path) -> None:
    write_png(tmp_path / "real" / "a.png")
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert len(list_folder(tmp_path / "link").files) == 1


@pytest.mark.parametrize("content, said", [
    (b"hello, I am text", "is not an image"),
    (b"", "is empty (0 bytes)"),
])
def test_a_non_image_png_names_the_file_and_says_delete_it(tmp_path: Path, content: bytes,
                                                          said: str) -> None:
    root = tmp_path / "set"
    write_png(root / "0000.png")
    (root / "0001.png").write_bytes(content)
    with pytest.raises(OodbenchError) as e:
        get_dataset(f"folder:{root}").load("test", ctx_for(tmp_path))
    assert str(root / "0001.png") in e.value.message and said in e.value.message
    assert e.value.hint.startswith(f"delete {root / '0001.png'}")
    assert "avif" not in str(e.value).lower()


def test_a_truncated_png_says_replace_it(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_png(root / "0000.png", size=32)
    bad = root / "0001.png"
    write_png(bad, size=32, seed=1)
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(OodbenchError, match=r"0001\.png: it is damaged or truncated") as e:
        get_dataset(f"folder:{root}").load("test", ctx_for(tmp_path))
    assert "intact copy" in e.value.hint and "avif" not in str(e.value).lower()


def test_only_a_real_avif_file_mentions_avif(tmp_path: Path) -> None:
    avif = tmp_path / "photo.png"  # AVIF content behind a .png name, Pillow without AVIF
    avif.write_bytes(b"\0\0\0\x1cftypavif" + b"\0" * 40)
    err = _not_an_image(str(avif))
    assert "is an AVIF image" in err.message and "convert it to PNG or JPEG" in err.hint
    text = tmp_path / "notes.png"
    text.write_text("just words")
    assert "AVIF" not in str(_not_an_image(str(text)))


def test_absolute_dataset_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a" / "imgs").mkdir(parents=True)
    assert absolute_dataset_name("folder:imgs", tmp_path / "a") == \
        f"folder:{(tmp_path / 'a' / 'imgs').resolve()}"
    monkeypatch.chdir(tmp_path / "a")
    assert absolute_dataset_name("folder:./x/../imgs") == \
        f"folder:{(tmp_path / 'a' / 'imgs').resolve()}"
    assert absolute_dataset_name(f"folder:{tmp_path}/a/imgs") == \
        f"folder:{(tmp_path / 'a' / 'imgs').resolve()}"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert absolute_dataset_name("folder:~/a/imgs") == \
        f"folder:{(tmp_path / 'a' / 'imgs').resolve()}"
    for other in ("mnist", "gaussian", "folder:"):
        assert absolute_dataset_name(other) == other


def test_a_relative_folder_read_from_two_directories(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug this prevents: `folder:imgs` stored as is reads different images from two
    working directories; stored absolute it reads the same ones."""
    for d, seed in (("one", 0), ("two", 1)):
        write_png(tmp_path / d / "imgs" / "0.png", seed=seed)
    monkeypatch.chdir(tmp_path / "one")
    stored = absolute_dataset_name("folder:imgs")
    first = get_dataset(stored).load("test", ctx_for(tmp_path)).images.clone()
    monkeypatch.chdir(tmp_path / "two")
    assert get_dataset(stored).load("test", ctx_for(tmp_path)).images.equal(first)
    assert not get_dataset("folder:imgs").load("test", ctx_for(tmp_path)).images.equal(first)
