"""The scan cache (utils.data.scan_cache.ScanCache): a second scan of an unchanged folder opens no image and
lists no folder, yet sees every change -- added, removed, rewritten and re-linked files; the train
set's mean/std it keeps are computed again when an image is replaced, even by one of the same size."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

import utils.data.folders
import utils.data.scan_cache
from conftest import make_class_folders
from utils.data.folders import scan_folder
from utils.data.scan_cache import ScanCache


def age(root: Path, seconds: float = 3600) -> None:
    """Date every folder under `root` back, as a dataset left alone for a while is (a folder
    changed in the last seconds is listed afresh on every scan)."""
    past = time.time() - seconds
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(folder, (past, past))


@pytest.fixture
def dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYTORCH_CLASSIFIER_CACHE", str(tmp_path / "cache"))
    root = make_class_folders(tmp_path / "train", {"cat": 4, "dog": 3}, size=8)
    (root / "dog" / "more").mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "dog" / "more" / "deep.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    age(root)
    return root


def no_file_system_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, opening an image header or listing a folder fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"the cached scan read the disk: {args}")

    monkeypatch.setattr(utils.data.folders, "check_image_header", refuse)
    monkeypatch.setattr(utils.data.scan_cache, "check_image_header", refuse)
    monkeypatch.setattr(utils.data.folders, "_list_folder", refuse)


def as_names(image_set) -> list[tuple[str, int]]:
    return [(Path(p).relative_to(image_set.root).as_posix(), t) for p, t in image_set.samples]


def test_second_scan_opens_no_image_and_lists_no_folder(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = scan_folder(dataset)
    assert as_names(first) == [("cat/img0.png", 0), ("cat/img1.png", 0), ("cat/img2.png", 0), ("cat/img3.png", 0),
                               ("dog/img0.png", 1), ("dog/img1.png", 1), ("dog/img2.png", 1), ("dog/more/deep.png", 1)]
    cache = ScanCache(dataset)
    assert set(cache.dirs) == {str(dataset / "cat"), str(dataset / "dog"), str(dataset / "dog" / "more")}
    assert len(cache.files) == 8  # each image's header check (the .txt file is told by its name)
    no_file_system_reads(monkeypatch)
    second = scan_folder(dataset)
    assert second.samples == first.samples and second.skipped == first.skipped
    assert second.signature == first.signature and second.class_names == ["cat", "dog"]


def test_every_change_is_seen(dataset: Path) -> None:
    scan_folder(dataset)
    Image.new("RGB", (8, 8), "blue").save(dataset / "cat" / "img9.png")  # added: the folder's time changes
    (dataset / "dog" / "img1.png").unlink()  # removed
    (dataset / "dog" / "img2.png").write_bytes(b"this is not a png")  # rewritten in place: the folder is unchanged
    os.utime(dataset / "dog", (time.time() - 3600,) * 2)  # as if long ago: only the file's own size and time tell
    Image.new("RGB", (8, 8), "green").save(dataset / "dog" / "more" / "deep.png", format="PNG")  # same name, new image
    image_set = scan_folder(dataset)
    assert as_names(image_set) == [("cat/img0.png", 0), ("cat/img1.png", 0), ("cat/img2.png", 0), ("cat/img3.png", 0),
                                   ("cat/img9.png", 0), ("dog/img0.png", 1), ("dog/more/deep.png", 1)]
    reasons = dict(image_set.skipped)
    assert "not an image" in reasons[str(dataset / "dog" / "img2.png")]
    assert "not an image file (.txt)" in reasons[str(dataset / "cat" / "notes.txt")]


def test_recent_and_linked_folders_are_listed_afresh(dataset: Path, tmp_path: Path) -> None:
    fresh = dataset / "cat" / "today"  # changed seconds ago: its time stamp may not tell the next change
    fresh.mkdir()
    Image.new("RGB", (8, 8)).save(fresh / "a.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "x.png")
    Image.new("RGB", (8, 8)).save(elsewhere / "y.png")
    os.symlink(elsewhere / "x.png", dataset / "dog" / "linked.png")
    age(dataset / "dog")
    os.utime(dataset, (time.time() - 3600,) * 2)
    scan_folder(dataset)
    cache = ScanCache(dataset)
    assert str(fresh) not in cache.dirs and str(dataset / "dog") not in cache.dirs
    assert str(dataset / "cat") not in cache.dirs  # it just gained the folder 'today'
    assert str(dataset / "dog" / "more") in cache.dirs
    link = dataset / "dog" / "linked.png"
    link.unlink()  # pointed elsewhere, the folder's time set back: only a fresh listing sees it
    os.symlink(tmp_path / "missing.png", link)
    os.utime(dataset / "dog", (time.time() - 3600,) * 2)
    reasons = dict(scan_folder(dataset).skipped)
    assert reasons[str(link)] == "broken link or not a regular file"


def test_cache_off_and_unreadable_cache(dataset: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    expected = scan_folder(dataset).samples
    cache = ScanCache(dataset)
    cache.path.write_text("{ not json")  # damaged: scanned afresh and rewritten
    assert scan_folder(dataset).samples == expected
    assert ScanCache(dataset).dirs
    monkeypatch.setenv("PYTORCH_CLASSIFIER_CACHE", "off")
    assert scan_folder(dataset).samples == expected
    assert not (Path("off") / "scan").exists()


def test_mean_std_is_computed_again_when_an_image_is_replaced_by_one_of_the_same_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached mean/std is used while the images are unchanged; an image replaced under the same
    name by another of exactly the same size (a BMP of the same dimensions) is seen by its time, and
    the mean/std becomes that of the new images."""
    import numpy as np

    import utils.train.setup
    from utils.data.loaders import compute_mean_std
    from utils.data.sources import scan_split
    from utils.train.setup import train_mean_std

    monkeypatch.setenv("PYTORCH_CLASSIFIER_CACHE", str(tmp_path / "cache"))
    root = make_class_folders(tmp_path / "train", {"cat": 3, "dog": 3}, size=8, ext=".bmp")
    age(root)
    first = train_mean_std(scan_split(root), 8, 3, 0)
    computed = utils.train.setup.compute_mean_std

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("computed again, though no image changed")

    monkeypatch.setattr(utils.train.setup, "compute_mean_std", refuse)
    assert train_mean_std(scan_split(root), 8, 3, 0) == first  # from the cache
    monkeypatch.setattr(utils.train.setup, "compute_mean_std", computed)
    image = root / "dog" / "img1.bmp"
    size, mtime_ns = image.stat().st_size, image.stat().st_mtime_ns
    Image.fromarray(np.full((8, 8, 3), 250, dtype=np.uint8)).save(image)  # replaced: same name, same size
    os.utime(image, ns=(mtime_ns + 10**9, mtime_ns + 10**9))  # a second later, whatever the file system's clock grain
    assert image.stat().st_size == size
    image_set = scan_split(root)
    again = train_mean_std(image_set, 8, 3, 0)
    assert again == compute_mean_std(image_set.samples, 8, 3, seed=0) and again != first
