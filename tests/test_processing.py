"""processing.py: stratified, exact, seeded, disjoint splits that never change the source folder."""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import processing
from conftest import (add_junk_files, assert_ok, assert_user_error, class_image, files_under, make_class_folders, run_many,
                      snapshot)
from utils.core.log import run_cli
from utils.data.split import split_counts

# class folder -> images (dog has one more in a sub-folder); expected (train, val, test) at 6:2:2
COUNTS = {"cat": 10, "dog": 7, "10": 5, "2": 3}
EXPECTED = {"cat": (6, 2, 2), "dog": (4, 2, 2), "10": (3, 1, 1), "2": (1, 1, 1)}
NATURAL_ORDER = ["2", "10", "cat", "dog"]
SPLITS = ("train", "val", "test")


def make_raw(root: Path) -> tuple[Path, dict[str, str]]:
    """A raw dataset with the skip-worthy files in cat/ and a hidden folder; returns (root, junk)."""
    make_class_folders(root, COUNTS)
    (root / "dog" / "sub").mkdir()
    class_image(1, np.random.default_rng(5)).save(root / "dog" / "sub" / "extra.png")
    junk = add_junk_files(root / "cat")
    (root / "cat" / ".thumbs").mkdir()
    class_image(0, np.random.default_rng(6)).save(root / "cat" / ".thumbs" / "t.png")
    return root, junk


def images_in(split_root: Path) -> dict[str, list[str]]:
    """{class folder: [paths relative to the class folder]} of one split folder."""
    if not split_root.exists():
        return {}
    return {d.name: sorted(str(p.relative_to(d)) for p in files_under(d)) for d in split_root.iterdir() if d.is_dir()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("processing")
    raw, junk = make_raw(root / "raw")
    before = snapshot(raw)
    jobs = {
        "split": ["--data_path", raw, "--output_path", root / "out", "--seed", "0"],
        "digits": ["--sample", "digits", "--data_path", root / "digits", "--output_path", root / "digits_split"],
    }
    procs = run_many([{"script": "processing.py", "args": args, "timeout": 300} for args in jobs.values()])
    return {"root": root, "raw": raw, "junk": junk, "before": before, "after": snapshot(raw), "out": root / "out",
            **dict(zip(jobs, procs))}


def run_in_process(*argv: object) -> subprocess.CompletedProcess:
    """processing.py's entry point (run_cli) in this process: exit code and captured output.

    The refusals are checked this way to save a Python start-up each; the same run_cli wraps the script.
    """
    root_logger = logging.getLogger()
    saved = (root_logger.handlers[:], root_logger.level)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_cli(processing.main, processing.parse_args, [str(a) for a in argv])
    finally:
        root_logger.handlers[:], root_logger.level = saved  # run_cli points logging at the captured stderr
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def test_split_counts_are_per_class_6_2_2(split_runs: dict) -> None:
    assert_ok(split_runs["split"])
    out = split_runs["out"]
    for name, expected in EXPECTED.items():
        got = tuple(len(images_in(out / s).get(name, [])) for s in SPLITS)
        assert got == expected, f"class {name}: {got} != {expected}"


def test_splits_are_disjoint_and_hold_every_readable_image(split_runs: dict) -> None:
    raw, out = split_runs["raw"], split_runs["out"]
    seen: dict[tuple[str, str], str] = {}
    for split in SPLITS:
        for name, rels in images_in(out / split).items():
            for rel in rels:
                assert (name, rel) not in seen, f"{name}/{rel} is in {seen[(name, rel)]} and {split}"
                seen[(name, rel)] = split
                assert digest(out / split / name / rel) == digest(raw / name / rel)  # a true copy
                assert not (out / split / name / rel).is_symlink()
    readable = {(name, rel) for name in COUNTS for rel in images_in(raw).get(name, [])
                if not any(part.startswith(".") for part in Path(rel).parts) and rel not in split_runs["junk"]}
    assert set(seen) == readable
    assert ("dog", "sub/extra.png") in seen  # sub-folders of a class are kept


def test_label_file_in_natural_order(split_runs: dict) -> None:
    assert (split_runs["out"] / "label.txt").read_text(encoding="utf-8").splitlines() == NATURAL_ORDER


def test_skipped_files_are_reported_with_reasons(split_runs: dict) -> None:
    proc = split_runs["split"]
    report = proc.stderr + proc.stdout
    for name, reason in split_runs["junk"].items():
        lines = [ln for ln in report.splitlines() if name in ln]
        assert lines, f"{name} not reported"
        assert reason in lines[0], lines[0]
    assert any(".thumbs" in ln and "hidden folder" in ln for ln in report.splitlines())
    assert "5 file(s) skipped" in proc.stdout


def test_source_folder_untouched(split_runs: dict) -> None:
    assert split_runs["after"] == split_runs["before"]


def test_refuses_non_empty_output_without_force(tmp_path: Path) -> None:
    raw = make_class_folders(tmp_path / "raw", {"a": 3, "b": 3})
    busy = tmp_path / "busy"
    (busy / "train").mkdir(parents=True)
    (busy / "train" / "keep.txt").write_text("someone's data\n")
    assert_user_error(run_in_process("--data_path", raw, "--output_path", busy), "--force")
    assert [p.name for p in files_under(busy)] == ["keep.txt"]


def test_refuses_output_inside_source(tmp_path: Path) -> None:
    raw = make_class_folders(tmp_path / "raw", {"a": 3, "b": 3})
    before = snapshot(raw)
    assert_user_error(run_in_process("--data_path", raw, "--output_path", raw / "a" / "split"), "overlaps the source")
    assert snapshot(raw) == before


def test_empty_class_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    raw = make_class_folders(tmp_path / "raw", {"full": 3})
    (raw / "hollow").mkdir()
    assert_user_error(run_in_process("--data_path", raw, "--output_path", tmp_path / "out"), "hollow")
    assert not (tmp_path / "out").exists()


def test_sample_digits(split_runs: dict) -> None:
    proc = split_runs["digits"]
    assert_ok(proc)
    digits = split_runs["root"] / "digits"
    folders = sorted((p for p in digits.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [p.name for p in folders] == [str(i) for i in range(10)]
    pngs = list(digits.rglob("*.png"))
    assert len(pngs) == 1797
    with Image.open(pngs[0]) as img:
        assert img.size == (8, 8) and img.mode == "L"
    split = split_runs["root"] / "digits_split"
    assert sum(len(files_under(split / s)) for s in SPLITS) == 1797
    assert (split / "label.txt").read_text().splitlines() == [str(i) for i in range(10)]


# ------------------------------------------------------------------------------ in-process
def split_with(source: Path, output: Path, *extra: str) -> dict[str, dict[str, list[str]]]:
    processing.main(processing.parse_args(["--data_path", str(source), "--output_path", str(output), *extra]))
    return {s: images_in(output / s) for s in SPLITS}


@pytest.fixture(scope="module")
def raw_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("raw2") / "raw", {"a": 12, "b": 9})


def test_same_seed_same_split_other_seed_other_split(raw_copy: Path, tmp_path: Path) -> None:
    first = split_with(raw_copy, tmp_path / "s0", "--seed", "3")
    again = split_with(raw_copy, tmp_path / "s0b", "--seed", "3")
    other = split_with(raw_copy, tmp_path / "s1", "--seed", "4")
    assert first == again
    assert first != other
    for split in SPLITS:  # the counts do not depend on the seed
        assert {k: len(v) for k, v in first[split].items()} == {k: len(v) for k, v in other[split].items()}


def test_val_or_test_may_be_zero(raw_copy: Path, tmp_path: Path) -> None:
    no_val = split_with(raw_copy, tmp_path / "nv", "--val_size", "0", "--test_size", "0.3")
    assert no_val["val"] == {}
    assert {k: len(v) for k, v in no_val["test"].items()} == {"a": 4, "b": 3}  # round(12*0.3), round(9*0.3)
    train_only = split_with(raw_copy, tmp_path / "t", "--val_size", "0", "--test_size", "0")
    assert {k: len(v) for k, v in train_only["train"].items()} == {"a": 12, "b": 9}
    assert train_only["val"] == {} and train_only["test"] == {}


def test_link_makes_symlinks_into_the_source(raw_copy: Path, tmp_path: Path) -> None:
    before = snapshot(raw_copy)
    split_with(raw_copy, tmp_path / "linked", "--link")
    links = files_under(tmp_path / "linked")
    images = [p for p in links if p.name not in ("label.txt", processing.MANIFEST)]
    assert len(images) == 21
    for path in images:
        assert path.is_symlink()
        target = Path(os.readlink(path))
        assert target.is_absolute() and target.is_relative_to(raw_copy.resolve()) and target.is_file()
        assert target.name == path.name and target.parent.name == path.parent.name
    assert snapshot(raw_copy) == before


def test_force_replaces_an_earlier_split(raw_copy: Path, tmp_path: Path) -> None:
    split_with(raw_copy, tmp_path / "o", "--seed", "1")
    (tmp_path / "o" / "train" / "a" / "stale.png").write_bytes(b"old")
    from utils.core.log import UserError

    with pytest.raises(UserError, match="--force"):
        split_with(raw_copy, tmp_path / "o", "--seed", "2")
    # --force replaces only what processing.py wrote: a file the user put there stops it
    with pytest.raises(UserError, match="did not write"):
        split_with(raw_copy, tmp_path / "o", "--seed", "2", "--force")
    assert (tmp_path / "o" / "train" / "a" / "stale.png").read_bytes() == b"old"
    (tmp_path / "o" / "train" / "a" / "stale.png").unlink()
    result = split_with(raw_copy, tmp_path / "o", "--seed", "2", "--force")
    assert result == split_with(raw_copy, tmp_path / "o2", "--seed", "2")


def test_split_counts_rule() -> None:
    assert split_counts(10, 0.2, 0.2) == (6, 2, 2)
    assert split_counts(7, 0.2, 0.2) == (5, 1, 1)
    assert split_counts(2, 0.2, 0.2) == (2, 0, 0)
    assert split_counts(1, 0.4, 0.4) == (1, 0, 0)  # always one training image
    assert split_counts(10, 0.0, 0.5) == (5, 0, 5)


# ----------------------------------------------------------------- copies kept in one split
def old_per_image_split(images: dict[str, list[Path]], val: float, test: float, seed: int) -> dict[str, dict[str, list[Path]]]:
    """The split of earlier versions, image by image (the reference of --allow_duplicates_across_splits)."""
    import random

    out: dict[str, dict[str, list[Path]]] = {s: {} for s in SPLITS}
    for name, paths in images.items():
        order = sorted(paths, key=lambda p: [(0, int(t), "") if t.isdigit() else (1, 0, t.casefold())
                                             for t in __import__("re").split(r"(\d+)", str(p)) if t])
        random.Random(f"{seed}:{name}").shuffle(order)
        n_train, n_val, _ = split_counts(len(order), val, test)
        out["train"][name], out["val"][name], out["test"][name] = (order[:n_train], order[n_train:n_train + n_val],
                                                                   order[n_train + n_val:])
    return out


@pytest.fixture(scope="module")
def with_copies(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """a/: 20 distinct images and 9 byte copies of a00 (a group of 10); b/: 15 distinct, 3 near copies of
    b00 (JPEG, half size, cropped: a group of 4) and a copy of a05 (a group across classes)."""
    from benchmarks.audit_speed import planted_copy, synthetic_image

    raw = tmp_path_factory.mktemp("copies") / "raw"
    (raw / "a").mkdir(parents=True)
    (raw / "b").mkdir()
    for k in range(20):
        synthetic_image(200 + k).save(raw / "a" / f"a{k:02d}.png")
    for k in range(15):
        synthetic_image(300 + k).save(raw / "b" / f"b{k:02d}.png")
    for k in range(1, 10):
        (raw / "a" / f"a_copy{k}.png").write_bytes((raw / "a" / "a00.png").read_bytes())
    with Image.open(raw / "b" / "b00.png") as img:
        for how, name in (("jpeg60", "b_jpeg.jpg"), ("half", "b_half.png"), ("crop5", "b_crop.png")):
            planted_copy(img.convert("RGB"), how).save(raw / "b" / name)
    (raw / "b" / "b_from_a.png").write_bytes((raw / "a" / "a05.png").read_bytes())
    groups = [{"a00.png"} | {f"a_copy{k}.png" for k in range(1, 10)}, {"b00.png", "b_jpeg.jpg", "b_half.png", "b_crop.png"},
              {"a05.png", "b_from_a.png"}]
    return {"raw": raw, "groups": groups}


def split_of_each(output: Path) -> dict[str, str]:
    """file name -> the split it was copied into."""
    return {p.name: split for split in SPLITS for p in (output / split).rglob("*") if p.is_file()}


def test_each_group_of_copies_lands_in_one_split(with_copies: dict, tmp_path: Path) -> None:
    proc = run_in_process("--data_path", with_copies["raw"], "--output_path", tmp_path / "out", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    where = split_of_each(tmp_path / "out")
    assert len(where) == 48
    for group in with_copies["groups"]:
        assert len({where[name] for name in group}) == 1, {name: where[name] for name in group}
    assert "kept 3 group(s) of exact or near copies each in one split (16 images)" in proc.stdout
    warning = [ln for ln in proc.stderr.splitlines() if "different classes" in ln]
    assert len(warning) == 1 and "1 group(s)" in warning[0] and "a05.png" in warning[0] and "b_from_a.png" in warning[0]
    # exact per class: a group counts toward the class of its first image (b_from_a toward a)
    homed = {"a": [n for n in where if n.startswith("a")] + ["b_from_a.png"],
             "b": [n for n in where if n.startswith("b") and n != "b_from_a.png"]}
    for name, files in homed.items():
        got = tuple(sum(where[f] == s for f in files) for s in SPLITS)
        assert got == split_counts(len(files), 0.2, 0.2), (name, got)


def test_allow_duplicates_across_splits_is_the_per_image_split(with_copies: dict, tmp_path: Path) -> None:
    raw = with_copies["raw"]
    proc = run_in_process("--data_path", raw, "--output_path", tmp_path / "out", "--allow_duplicates_across_splits")
    assert proc.returncode == 0 and "kept" not in proc.stdout, proc.stdout
    where = split_of_each(tmp_path / "out")
    assert len({where[name] for name in with_copies["groups"][0]}) > 1  # the 10 identical copies spread
    images = {f: sorted(p for p in (raw / f).iterdir()) for f in ("a", "b")}
    reference = old_per_image_split(images, 0.2, 0.2, 0)
    assert where == {p.name: s for s in SPLITS for paths in reference[s].values() for p in paths}


def test_split_places_groups_whole_with_exact_counts() -> None:
    from utils.data.split import split_dataset

    images = {"c": [Path(f"c/{i}.png") for i in range(100)], "d": [Path(f"d/{i}.png") for i in range(10)]}
    pairs = [images["c"][i:i + 2] for i in range(0, 60, 2)]  # 30 groups of two, 40 single images
    big = [images["d"][:8]]  # larger than val's and test's room (2 each) and train's (6)
    for seed in range(3):
        split = split_dataset(images, 0.2, 0.2, seed, pairs + big)
        assert tuple(len(split[s]["c"]) for s in SPLITS) == (60, 20, 20)
        homes = [next(s for s in SPLITS if group[0] in split[s]["c"]) for group in pairs]
        assert all(group[1] in split[home]["c"] for group, home in zip(pairs, homes))
        assert {"val", "test"} <= set(homes)  # copies are not all pushed into train
        assert tuple(len(split[s]["d"]) for s in SPLITS) == (8, 2, 0)  # over by the difference; val filled before test
        assert split == split_dataset(images, 0.2, 0.2, seed, pairs + big)  # seeded
    cross = {"e": [Path(f"e/{i}.png") for i in range(10)], "f": [Path(f"f/{i}.png") for i in range(10)]}
    homes = set()
    for seed in range(8):  # a group of e/0 and f/0 counts toward e, its first image's class: e has 11 images, f 9
        split = split_dataset(cross, 0.2, 0.2, seed, [[cross["e"][0], cross["f"][0]]])
        home = next(s for s in SPLITS if cross["f"][0] in split[s]["f"])
        homes.add(home)
        assert cross["e"][0] in split[home]["e"]
        assert tuple(len(split[s]["e"]) + (s == home) for s in SPLITS) == split_counts(11, 0.2, 0.2)
        assert tuple(len(split[s]["f"]) - (s == home) for s in SPLITS) == split_counts(9, 0.2, 0.2)
    assert len(homes) > 1
    for seed in range(3):  # without groups: the per-image split of earlier versions, image for image
        assert split_dataset(images, 0.2, 0.25, seed) == old_per_image_split(images, 0.2, 0.25, seed)
