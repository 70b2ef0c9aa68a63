"""Property tests: processing.py and the training data scan over generated folder trees.

Trees mix nested folders, links to files and to folders (loops included), hidden entries, odd
names, empty folders and non-image files. Whatever the tree: nothing outside the output changes,
each real image is counted once, the three splits are disjoint and hold every readable image,
and a failure is one line, never a traceback.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import snapshot
from utils.core.log import run_cli

NAMES = st.sampled_from(["a", "b b", "ünï", "10", "2", "x.y", "Ω", "-dash", "__init__", ".hid", "n#1"])


@st.composite
def trees(draw: st.DrawFn) -> list[tuple[str, tuple[str, ...], str]]:
    """A recipe: (kind, path parts, link target) entries under a dataset root."""
    classes = draw(st.lists(NAMES.filter(lambda n: not n.startswith((".", "__"))), min_size=1, max_size=3, unique=True))
    entries: list[tuple[str, tuple[str, ...], str]] = []
    for cls in classes:
        for _ in range(draw(st.integers(0, 4))):
            sub = tuple(draw(st.lists(NAMES, max_size=2)))
            name = draw(NAMES) + draw(st.sampled_from([".png", ".JPG", ".bmp"]))
            entries.append(("image", (cls, *sub, name), ""))
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["text", "empty_dir", "link_file", "link_file", "link_dir_loop", "link_dir_up",
                                         "link_class"]))
            entries.append((kind, (cls, *tuple(draw(st.lists(NAMES, max_size=1))), draw(NAMES)), draw(st.sampled_from(classes))))
    if draw(st.booleans()):
        entries.append(("image", (".hidden_class", "h.png"), ""))
    return entries


def build(root: Path, recipe: list[tuple[str, tuple[str, ...], str]]) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for kind, parts, target in recipe:
        path = root.joinpath(*parts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                continue
            if kind == "image":
                Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(path, format="PNG")
            elif kind == "text":
                path.with_suffix(".txt").write_text("notes")
            elif kind == "empty_dir":
                path.mkdir()
            elif kind == "link_file":
                images = sorted(p for p in (root / target).rglob("*") if p.is_file() and not p.is_symlink()
                                and not any(part.startswith((".", "__")) for part in p.relative_to(root).parts))
                if images:
                    path.with_suffix(".png").symlink_to(images[0])
            elif kind == "link_dir_loop":
                path.symlink_to(path.parent, target_is_directory=True)
            elif kind == "link_dir_up":
                path.symlink_to(root, target_is_directory=True)
            elif kind == "link_class":
                path.symlink_to(root / target, target_is_directory=True)
        except (FileExistsError, NotADirectoryError):
            continue  # a name the recipe used twice as a file and as a folder


def real_images(root: Path) -> set[tuple[int, int]]:
    """The oracle: every real (not linked) image file under a visible class folder, by identity."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not follow links
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        if rel == Path("."):
            continue
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink() and not name.startswith((".", "__")) and path.suffix.lower() in (".png", ".jpg", ".bmp"):
                st_ = path.stat()
                out.add((st_.st_dev, st_.st_ino))
    return out


def identity(path: Path) -> tuple[int, int]:
    st_ = path.resolve().stat()
    return st_.st_dev, st_.st_ino


@pytest.mark.timeout(300, method="thread")  # a scan that loops forever: hypothesis would retry a signalled failure
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(recipe=trees(), val=st.sampled_from([0.0, 0.2, 0.4]), test=st.sampled_from([0.0, 0.25]))
def test_processing_over_generated_trees(tmp_path: Path, capsys: pytest.CaptureFixture, recipe: list, val: float,
                                         test: float) -> None:
    import processing
    from utils.core.log import UserError
    from utils.data.sources import scan_split

    work = tmp_path / "case"
    shutil.rmtree(work, ignore_errors=True)
    source, output = work / "raw", work / "out"
    build(source, recipe)
    before = snapshot(work)
    expected = real_images(source)

    capsys.readouterr()
    code = run_cli(processing.main, processing.parse_args,
                   ["--data_path", str(source), "--output_path", str(output), "--val_size", str(val), "--test_size", str(test)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    after = snapshot(work)
    outside = {k: v for k, v in after.items() if not k.startswith("out")}
    assert outside == before, "processing.py changed something outside its output"
    event("split written" if code == 0 else "refused in one line")
    if code != 0:
        assert code == 2 and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, err
        return
    split_ids: dict[str, list[tuple[int, int]]] = {}
    for split in ("train", "val", "test"):
        files = [p for p in (output / split).rglob("*") if p.is_file()] if (output / split).exists() else []
        split_ids[split] = [identity(p) if p.is_symlink() else _source_identity(p, output / split, source) for p in files]
    every = split_ids["train"] + split_ids["val"] + split_ids["test"]
    assert len(every) == len(set(every)), "an image is in two splits, or twice in one"
    assert set(every) == expected, "the splits do not hold exactly the readable images"

    try:  # the training scan of the same tree: each real image once, under one class
        image_set = scan_split(source)
    except UserError:
        return
    ids = [identity(Path(p)) for p, _ in image_set.samples]
    assert len(ids) == len(set(ids)) and set(ids) == expected
    # each folder is entered once: the scan reports no more files (kept or skipped) than the tree has
    # file entries -- a folder walked twice reports each of its files again, as "linked twice"
    entries = sum(len(files) for _, _, files in os.walk(source)) + sum(
        1 for p in source.rglob("*") if p.is_symlink() and p.is_file())
    reported = len(image_set.samples) + sum(1 for p, _ in image_set.skipped if not Path(p).is_dir())
    assert reported <= entries, f"{reported} files reported for {entries} file entries: a folder was walked twice"


def _source_identity(copy: Path, split_root: Path, source: Path) -> tuple[int, int]:
    """A copied image's source file (same relative path under the source)."""
    return identity(source / copy.relative_to(split_root))
