"""audit.py: planted copies, broken and odd images found (all of them, and nothing else), the
multi-index against brute force, report.html in headless Chromium, and one-line usage errors.

The planted dataset: distinct generated images (random shapes over textures and gradients, each its
own seed: genuinely different) in train/val/test class folders, and copies of some of them (byte
for byte, JPEG quality 60 of a PNG, half size, 5% cropped off each border, 20% brighter) across and
within splits and labels, plus a truncated JPEG, a tiny, a stretched, a flat and a grayscale image.
audit.py runs once on it through its command line (a subprocess, 2 processes hashing); the other
checks run in this process.
"""
from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.audit_speed import planted_copy, synthetic_image
from conftest import assert_ok, assert_user_error, make_truncated_jpeg, run_inprocess, run_script
from utils.data.duplicates import (HASH_DISTANCE, Fingerprint, UnionFind, choose_chunks, duplicate_groups, fingerprint,
                                   hamming_pairs, popcount)
from utils.data.quality import KINDS, inspect_images

# (file it is a copy of, the copy, how it is made); train's images are b00-b07 (cat) and b08-b15 (dog)
COPIES = [
    ("train/cat/b00.png", "val/cat/exact_copy.png", "bytes"),
    ("train/cat/b01.png", "test/cat/jpeg_copy.jpg", "jpeg60"),
    ("train/dog/b08.png", "train/dog/half_copy.png", "half"),
    ("train/cat/b03.png", "val/cat/crop_copy.png", "crop5"),
    ("train/dog/b09.png", "train/cat/bright_copy.png", "bright20"),
    ("train/cat/b05.png", "test/dog/label_copy.png", "bytes"),
    ("train/dog/b10.png", "val/dog/group_jpeg.jpg", "jpeg60"),
    ("train/dog/b10.png", "test/dog/group_half.png", "half"),
]
# the known answer: (kind, the images of the row)
EXPECTED = {
    ("leak", frozenset({"b00.png", "exact_copy.png"})),
    ("leak", frozenset({"b01.png", "jpeg_copy.jpg"})),
    ("leak", frozenset({"b03.png", "crop_copy.png"})),
    ("leak", frozenset({"b10.png", "group_jpeg.jpg"})),  # a group of 3: 2 rows, each against b10
    ("leak", frozenset({"b10.png", "group_half.png"})),
    ("conflict", frozenset({"b09.png", "bright_copy.png"})),  # same split, other label
    ("conflict", frozenset({"b05.png", "label_copy.png"})),  # other split and label: a conflict
    ("duplicate", frozenset({"b08.png", "half_copy.png"})),
    ("unreadable", frozenset({"truncated.jpg"})),
    ("tiny", frozenset({"tiny.png"})),
    ("aspect", frozenset({"wide.png"})),
    ("constant", frozenset({"flat.png"})),
    ("mode_mix", frozenset({"gray.png"})),
}


def write_planted(root: Path) -> Path:
    """The planted dataset (module docstring) under root: train/val/test/<cat|dog>/."""
    seed = 100
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for k in range(n):
                name = f"b{seed - 100:02d}.png" if split == "train" else f"{split}{seed}.png"
                synthetic_image(seed).save(folder / name)
                seed += 1
    for source, copy, how in COPIES:
        if how == "bytes":
            shutil.copyfile(root / source, root / copy)
        else:
            with Image.open(root / source) as img:
                planted_copy(img.convert("RGB"), how).save(root / copy)
    make_truncated_jpeg(root / "train" / "cat" / "truncated.jpg")
    synthetic_image(1).resize((20, 20)).save(root / "train" / "dog" / "tiny.png")
    synthetic_image(2).resize((200, 40)).save(root / "train" / "dog" / "wide.png")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "train" / "cat" / "flat.png")  # one red: flat, though RGB
    synthetic_image(3).convert("L").save(root / "val" / "cat" / "gray.png")
    return root


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("audit")
    data = write_planted(root / "data")
    proc = run_script("audit.py", "--data_path", data, "--save_path", root / "out", "--workers", 2)
    rows = list(csv.DictReader((root / "out" / "findings.csv").open(encoding="utf-8"))) if proc.returncode == 0 else []
    return {"root": root, "data": data, "out": root / "out", "proc": proc, "rows": rows}


def row_key(row: dict) -> tuple[str, frozenset]:
    return row["kind"], frozenset(Path(p).name for p in (row["path_a"], row["path_b"]) if p)


# ------------------------------------------------------------------------------- findings
def test_findings_are_the_planted_ones_all_and_only(audited: dict) -> None:
    assert_ok(audited["proc"])
    found = [row_key(r) for r in audited["rows"]]
    assert len(found) == len(set(found)), "a finding twice"
    missed, extra = EXPECTED - set(found), set(found) - EXPECTED
    assert not missed and not extra, f"missed {sorted(missed)}; not planted {sorted(extra)}"
    assert [r["kind"] for r in audited["rows"]] == sorted((r["kind"] for r in audited["rows"]), key=KINDS.index)


def test_pairs_carry_splits_labels_distances_and_groups(audited: dict) -> None:
    rows = {row_key(r): r for r in audited["rows"]}
    exact = rows["leak", frozenset({"b00.png", "exact_copy.png"})]
    assert (exact["split_a"], exact["split_b"], exact["distance"]) == ("train", "val", "0")
    assert "identical pixels" in exact["detail"]
    for names in ({"b01.png", "jpeg_copy.jpg"}, {"b03.png", "crop_copy.png"}):
        near = rows["leak", frozenset(names)]
        assert 0 <= int(near["distance"]) <= HASH_DISTANCE and "near copy" in near["detail"]
    across = rows["conflict", frozenset({"b05.png", "label_copy.png"})]
    assert {across["label_a"], across["label_b"]} == {"cat", "dog"} and "splits train and test" in across["detail"]
    same = rows["conflict", frozenset({"b09.png", "bright_copy.png"})]
    assert "both in train" in same["detail"]
    group = [r for k, r in rows.items() if "b10.png" in k[1]]  # 3 copies: 2 rows against one representative
    assert len(group) == 2 and {Path(r["path_a"]).name for r in group} == {"b10.png"} and len({r["group"] for r in group}) == 1
    single = rows["unreadable", frozenset({"truncated.jpg"})]
    assert single["path_b"] == single["split_b"] == single["distance"] == "" and "truncated" in single["detail"]
    assert "38 of 39 images are colour" in rows["mode_mix", frozenset({"gray.png"})]["detail"]
    assert "200x40 px, aspect 5.0" in rows["aspect", frozenset({"wide.png"})]["detail"]


def test_summary_table_and_the_report_path_are_printed(audited: dict) -> None:
    out = audited["proc"].stdout
    expected = {kind: sum(1 for k, _ in EXPECTED if k == kind) for kind in KINDS}
    for kind, count in expected.items():
        assert re.search(rf"\|\s*{kind}\s*\|\s*{count}\s*\|", out), (kind, count, out)
    assert f"report: {audited['out'] / 'report.html'}" in out and f"audit folder: {audited['out']}" in out


def test_an_existing_save_path_is_incremented(audited: dict) -> None:
    proc = run_inprocess("audit.py", "--data_path", audited["data"] / "test", "--save_path", audited["out"], "--workers", 0)
    assert_ok(proc)
    again = audited["root"] / "out2"
    assert f"audit folder: {again}" in proc.stdout and (again / "report.html").is_file()
    assert {row_key(r) for r in csv.DictReader((again / "findings.csv").open())} == set()  # one split: no leak
    assert (audited["out"] / "findings.csv").read_text().count("\n") == len(EXPECTED) + 1  # the first kept


def test_list_files_are_splits_too(audited: dict, tmp_path: Path) -> None:
    data = audited["data"]
    lists = {}
    for split in ("train", "val"):
        lists[split] = tmp_path / f"{split}.csv"
        rows = [f"{p.relative_to(data).as_posix()},{p.parent.name}" for p in sorted((data / split).rglob("*.png"))]
        lists[split].write_text("path,label\n" + "\n".join(f"{data.as_posix()}/{r}" for r in rows) + "\n")
    proc = run_inprocess("audit.py", "--train_path", lists["train"], "--val_path", lists["val"], "--save_path",
                         tmp_path / "out", "--workers", 0)
    assert_ok(proc)
    rows = list(csv.DictReader((tmp_path / "out" / "findings.csv").open()))
    leaks = {row_key(r) for r in rows if r["kind"] == "leak"}
    assert leaks == {("leak", frozenset({"b00.png", "exact_copy.png"})), ("leak", frozenset({"b03.png", "crop_copy.png"}))}
    assert all((r["split_a"], r["split_b"]) == ("train", "val") for r in rows if r["kind"] == "leak")


def test_the_report_caps_the_cards_of_a_kind(audited: dict, tmp_path: Path) -> None:
    proc = run_inprocess("audit.py", "--data_path", audited["data"], "--save_path", tmp_path / "capped", "--max_shown", 1,
                         "--workers", 0)
    assert_ok(proc)
    page = (tmp_path / "capped" / "report.html").read_text(encoding="utf-8")
    assert page.count('data-kind="leak"') == 1 and "and 4 more, see findings.csv" in page
    assert page.count('data-kind="conflict"') == 1 and "and 1 more, see findings.csv" in page
    assert page.count('data-kind="tiny"') == 1 and page.count("more, see findings.csv") == 2


# -------------------------------------------------------------------------------- the index
def _random_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)


def _brute_force(queries: np.ndarray, codes: np.ndarray, radius: int) -> set[tuple[int, int]]:
    d = popcount(queries[:, None] ^ codes[None, :])
    return set(zip(*(a.tolist() for a in np.nonzero(d <= radius))))


@pytest.mark.parametrize("radius", [0, 3, 8, 12, 17])
def test_index_finds_what_brute_force_finds(radius: int) -> None:
    rng = np.random.default_rng(radius)
    queries = _random_codes(rng, 300)
    near = queries[:100] ^ np.array([sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 20), replace=False))
                                     for _ in range(100)], dtype=np.uint64)  # pairs at every distance 0..19
    codes = np.concatenate([_random_codes(rng, 500), near])
    expected = _brute_force(queries, codes, radius)
    assert len(expected) >= 5 or radius == 0
    for chunks in (None, 3, 4, 5, 8):
        qi, ci, dist = hamming_pairs(queries, codes, radius, chunks=chunks)
        assert set(zip(qi.tolist(), ci.tolist())) == expected, chunks
        assert len(qi) == len(expected)  # each pair once, found in several chunks or not
        assert np.array_equal(dist, popcount(queries[qi] ^ codes[ci]))


def test_index_edges_the_threshold_and_repeated_hashes() -> None:
    rng = np.random.default_rng(7)
    query = _random_codes(rng, 1)
    bits = rng.permutation(64)
    at = query[0] ^ np.uint64(sum(1 << int(b) for b in bits[:12]))  # exactly 12 bits away
    past = query[0] ^ np.uint64(sum(1 << int(b) for b in bits[:13]))
    codes = np.array([at, past, query[0], query[0], query[0]], dtype=np.uint64)  # and the query itself, three times
    for chunks in (None, 3, 4, 6):
        qi, ci, dist = hamming_pairs(query, codes, 12, chunks=chunks)
        assert ci.tolist() == [0, 2, 3, 4] and dist.tolist() == [12, 0, 0, 0]
    qi, ci, _ = hamming_pairs(codes, codes, 0)  # identical hashes: every ordered pair among them
    assert {(int(a), int(b)) for a, b in zip(qi, ci)} == {(0, 0), (1, 1)} | {(a, b) for a in (2, 3, 4) for b in (2, 3, 4)}
    assert [len(a) for a in hamming_pairs(np.zeros(0, np.uint64), codes, 5)] == [0, 0, 0]
    assert 3 <= choose_chunks(100_000, 300_000, 12) <= 8


def test_groups_are_connected_sets_and_flat_images_match_only_exactly() -> None:
    sets = UnionFind(8)
    for a, b in ((0, 1), (2, 3), (1, 3), (6, 5)):  # (1, 3) joins two sets through members that are not roots
        sets.union(a, b)
    assert sets.groups() == [[0, 1, 2, 3], [5, 6]]
    base, other = synthetic_image(11), synthetic_image(12)
    dark, light = Image.new("RGB", (64, 64), (20, 20, 20)), Image.new("RGB", (64, 64), (235, 235, 235))
    prints: list[Fingerprint | None] = [fingerprint(im) for im in
                                        (base, other, planted_copy(base, "half"), dark, light, dark.copy())]
    assert prints[3].flat and prints[3].phash == prints[4].phash  # a flat image's hashes say nothing
    assert duplicate_groups(prints + [None]) == [[0, 2], [3, 5]]  # dark and light are not copies; None is no image


def test_processes_give_what_one_process_gives(audited: dict) -> None:
    items = [(str(p), "x", "y") for p in sorted((audited["data"] / "train").rglob("*.*"))]
    one, two = inspect_images(items, 0), inspect_images(items, 2)
    for a, b in zip(one, two, strict=True):
        fa, fb = a.fingerprint, b.fingerprint
        assert (a.path, a.width, a.height, a.mode, a.error, a.gray) == (b.path, b.width, b.height, b.mode, b.error, b.gray)
        assert (fa is None) == (fb is None)
        if fa is not None:
            assert (fa.sha256, fa.phash, fa.dhash, fa.std) == (fb.sha256, fb.phash, fb.dhash, fb.std)
            assert np.array_equal(fa.colour, fb.colour)


# ------------------------------------------------------------------------------ the browser
@pytest.mark.system_deps
def test_report_in_headless_chromium(audited: dict, tmp_path: Path) -> None:
    from serve_helpers import chromium, chromium_paths

    if chromium_paths() is None:
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium chromium-driver "
                    "(make test installs it when apt-get is available)")
    pytest.importorskip("selenium", reason="the browser test needs selenium (pip install -r requirements/dev.txt)")
    from selenium.webdriver.common.by import By

    report = audited["out"] / "report.html"
    page = report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), "the report links something outside"
    with chromium(tmp_path / "downloads", tmp_path / "profile") as driver:
        driver.get(report.as_uri())
        cards = driver.find_elements(By.CSS_SELECTOR, ".finding")
        kinds = [c.get_attribute("data-kind") for c in cards]
        assert sorted(kinds) == sorted(k for k, _ in EXPECTED)
        text = driver.find_element(By.TAG_NAME, "body").text
        for _, names in EXPECTED:
            for name in names:
                assert name in text, name
        assert "image file is truncated" in text  # the broken file's error
        pictures = driver.execute_script("return Array.from(document.images).map(i => [i.src.slice(0, 11), i.naturalWidth])")
        assert len(pictures) == 1 + 2 * 8 + 4  # histograms, 8 pairs, 4 single images that decode
        assert all(src == "data:image/" and width > 0 for src, width in pictures), pictures
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert not [u for u in loaded if not u.startswith("data:")], loaded
        header = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#counts thead th")]
        counts = {cells[0].text: [int(c.text) for c in cells[1:]] for row in driver.find_elements(By.CSS_SELECTOR, "#counts tbody tr")
                  if (cells := row.find_elements(By.TAG_NAME, "td"))}
        assert header == ["class", "train", "val", "test", "total"]
        # 8, 3, 3 bases; cat: + bright, truncated, flat | exact, crop, gray | jpeg; dog: + half, tiny, wide | group | 2
        assert counts == {"cat": [11, 6, 4, 21], "dog": [11, 4, 5, 20]}


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("case, needles", [
    ("nothing", ["nothing to audit", "--data_path"]),
    ("file", ["is a file, not a folder", "--train_path"]),
    ("missing", ["not found", "nowhere"]),
    ("both", ["--data_path or --train_path, not both"]),
    ("distance", ["--hash_distance must be from 0 to 32"]),
])
def test_usage_errors_are_one_line(case: str, needles: list[str], tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    save = tmp_path / "out"
    args = {"nothing": [], "file": ["--data_path", tmp_path / "a.png"], "missing": ["--data_path", tmp_path / "nowhere"],
            "both": ["--data_path", tmp_path, "--train_path", tmp_path], "distance": ["--data_path", tmp_path, "--hash_distance", 40]}
    assert_user_error(run_inprocess("audit.py", *args[case], "--save_path", save), *needles)
    assert not save.exists()
