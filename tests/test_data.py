from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from frugalvision.data import ImageFolderDataset, build_bundled, build_transforms, load_bundled, load_image
from frugalvision.errors import DataError


def _make_folder(root, classes=("cat", "dog"), n=3, mode="RGB"):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new(mode, (10, 12), color=i * 40).save(root / c / f"{i}.png")
    return root


def test_folder_dataset_labels_and_transform(tmp_path):
    root = _make_folder(tmp_path / "d")
    (root / "dog" / "notes.txt").write_text("ignored")
    ds = ImageFolderDataset(root, transform=build_transforms(8, train=False))
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 1
    assert ds.targets == [0, 0, 0, 1, 1, 1]


def test_corrupt_image_is_named(tmp_path):
    root = _make_folder(tmp_path / "d")
    bad = root / "cat" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    with pytest.raises(DataError, match=r"cat/1\.png.*on_error='skip'"):  # found up front, not mid-epoch
        ImageFolderDataset(root)
    ds = ImageFolderDataset(root, verify=False)  # unchecked: found when read, still named
    with pytest.raises(DataError, match=r"cat/1\.png"):
        ds[1]
    ds = ImageFolderDataset(root, on_error="skip")
    assert len(ds) == 5 and [p.name for p, _ in ds.skipped] == ["1.png"]


def test_image_check_cache_follows_the_file(tmp_path, monkeypatch):
    from frugalvision.data import images

    monkeypatch.setenv("FRUGALVISION_CACHE", str(tmp_path / "cache"))
    root = _make_folder(tmp_path / "d")
    calls = []
    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    ImageFolderDataset(root)
    first = len(calls)
    ImageFolderDataset(root)  # every verdict cached: nothing decoded
    assert first == 6 and len(calls) == first
    bad = root / "cat" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # changed file (size and mtime): checked again
    with pytest.raises(DataError, match=r"cat/1\.png"):
        ImageFolderDataset(root)
    assert len(calls) == first + 1


def test_not_an_image_is_named(tmp_path):
    root = _make_folder(tmp_path / "d")
    (root / "dog" / "x.jpg").write_text("this is text")
    with pytest.raises(DataError, match=r"x\.jpg.*corrupt or not an image"):
        ImageFolderDataset(root)
    ds = ImageFolderDataset(root, verify=False)
    idx = [p.name for p, _ in ds.samples].index("x.jpg")
    with pytest.raises(DataError, match=r"x\.jpg.*corrupt or not an image"):
        ds[idx]


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "flat")
    root = _make_folder(tmp_path / "d")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty holds no images"):
        ImageFolderDataset(root)
    with pytest.raises(DataError, match="lacks class folder"):
        ImageFolderDataset(_make_folder(tmp_path / "e"), classes=["cat", "dog", "cow"])


def test_channel_handling(tmp_path):
    gray = tmp_path / "g.png"
    Image.new("L", (5, 5), 100).save(gray)
    assert load_image(gray).mode == "RGB" and np.asarray(load_image(gray))[0, 0].tolist() == [100, 100, 100]
    with pytest.raises(DataError, match=r"g\.png has 1 channel.*3 are expected"):
        load_image(gray, convert=False)
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (5, 5)).save(rgba)
    with pytest.raises(DataError, match="4 channel"):
        load_image(rgba, convert=False)
    assert load_image(rgba).mode == "RGB"
    deep = tmp_path / "d.tif"
    Image.fromarray(np.zeros((5, 5), np.float32)).save(deep)
    with pytest.raises(DataError, match=r"d\.tif has mode F"):
        load_image(deep)
    rgb = tmp_path / "c.png"
    Image.new("RGB", (5, 5)).save(rgb)
    assert load_image(rgb, channels=1).mode == "L"
    with pytest.raises(DataError, match="3 channel"):
        load_image(rgb, channels=1, convert=False)


def test_wrong_channels_in_strict_dataset(tmp_path):
    root = _make_folder(tmp_path / "d")
    Image.new("L", (10, 12)).save(root / "cat" / "gray.png")
    with pytest.raises(DataError, match=r"gray\.png has 1 channel"):
        ImageFolderDataset(root, convert=False)
    ds = ImageFolderDataset(root, convert=False, verify=False)
    idx = [p.name for p, _ in ds.samples].index("gray.png")
    with pytest.raises(DataError, match=r"gray\.png has 1 channel"):
        ds[idx]


def test_bundled_textures_deterministic_disjoint_and_cached(tmp_path):
    folder = build_bundled("textures", root=tmp_path)
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    assert build_bundled("textures", root=tmp_path) == folder  # cached: not rebuilt
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime
    train = load_bundled("textures", "train", root=tmp_path)
    test = load_bundled("textures", "test", root=tmp_path)
    assert len(train.classes) == 17 and train.classes == test.classes
    assert len(train) == 17 * 80 and len(test) == 17 * 40
    # a rebuild from scratch gives byte-identical images
    again = build_bundled("textures", root=tmp_path / "again")
    a, b = folder / "test" / "brick" / "0003.png", again / "test" / "brick" / "0003.png"
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    # no test crop equals any train crop of the same class (they come from disjoint bands)
    tr = {np.asarray(Image.open(p)).tobytes() for p, y in train.samples if train.classes[y] == "grass"}
    te = [np.asarray(Image.open(p)).tobytes() for p, y in test.samples if test.classes[y] == "grass"]
    assert not tr.intersection(te)


@pytest.mark.parametrize("name, n_classes", [("digits", 10), ("faces", 2)])
def test_bundled_small_sets(name, n_classes, tmp_path):
    sizes = {s: len(load_bundled(name, s, root=tmp_path)) for s in ("train", "val", "test")}
    ds = load_bundled(name, "train", root=tmp_path, transform=build_transforms(32, train=True))
    assert len(ds.classes) == n_classes
    assert sizes["train"] > sizes["val"] > 0 and sizes["test"] > 0
    x, _ = ds[0]
    assert x.shape == (3, 32, 32)


def test_unknown_bundled_name_and_split(tmp_path):
    with pytest.raises(DataError, match="unknown bundled dataset"):
        build_bundled("imagenet", root=tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        load_bundled("faces", "dev", root=tmp_path)
