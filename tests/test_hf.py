"""`hf:PATH` splits (utils.data.hf): a dataset saved with save_to_disk and Parquet files read as a split
by main.py, metrice.py and audit.py, against the same images as class folders."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY_CLASSES, assert_ok, assert_user_error, run_inprocess, train_args
from utils.core.log import UserError
from utils.core.task import MULTILABEL
from utils.data.decode import image_source
from utils.data.sources import SourceOptions, scan_split

datasets = pytest.importorskip("datasets", reason="hf: splits need the datasets package (requirements/extras.txt)")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SPLITS = ("train", "val", "test")
SAVED_ORDER = ["red", "green", "blue"]  # a ClassLabel's own order, not the natural one


def folder_rows(tiny_data: Path, split: str) -> list[tuple[bytes, str]]:
    image_set = scan_split(tiny_data / split)
    return [(Path(p).read_bytes(), image_set.class_names[t]) for p, t in image_set.samples]


@pytest.fixture(scope="session")
def hf_data(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_data's images as (1) a DatasetDict saved to disk (an Image column 'picture', ClassLabel
    'label' in SAVED_ORDER), (2) the Hub's Parquet layout (hub/data/SPLIT-0000k-of-00002.parquet,
    row groups of 5, columns 'img' {bytes, path} and 'colour' strings), (3) one Parquet file of
    integer labels, (4) one of lists of labels."""
    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.ClassLabel(names=SAVED_ORDER)})
    saved = {}
    for split in SPLITS:
        rows = folder_rows(tiny_data, split)
        saved[split] = datasets.Dataset.from_dict(
            {"picture": [{"bytes": b, "path": None} for b, _ in rows], "label": [SAVED_ORDER.index(n) for _, n in rows]},
            features=features)
        half = len(rows) // 2
        for k, part in enumerate((rows[:half], rows[half:])):
            table = pa.table({"img": [{"bytes": b, "path": None} for b, _ in part], "colour": [n for _, n in part]})
            (root / "hub" / "data").mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / "hub" / "data" / f"{split}-{k:05d}-of-00002.parquet", row_group_size=5)
    datasets.DatasetDict(saved).save_to_disk(str(root / "saved"))
    rows = folder_rows(tiny_data, "test")
    pq.write_table(pa.table({"image": [b for b, _ in rows], "label": [TINY_CLASSES.index(n) for _, n in rows]}),
                   root / "ints.parquet")
    pq.write_table(pa.table({"image": [b for b, _ in rows], "label": [[n, "round"] if i % 2 else [n] for i, (_, n) in
                                                                      enumerate(rows)]}), root / "multi.parquet")
    return root


def hf_rows(image_set: Any) -> list[tuple[bytes, Any]]:
    """(image bytes, label names) of each sample, read through the loaders' path (image_source)."""
    names = image_set.class_names
    return [(image_source(p).read(), "|".join(names[i] for i in image_set.task.labels(t))) for p, t in image_set.samples]


def test_hf_splits_hold_the_folders_images_and_labels(tiny_data: Path, hf_data: Path) -> None:
    hub = SourceOptions(image_column="img", label_column="colour")
    for split in SPLITS:
        expected = sorted(folder_rows(tiny_data, split))
        saved = scan_split(f"hf:{hf_data}/saved/{split}")  # no 'image' column: its one Image column, 'picture'
        assert saved.class_names == SAVED_ORDER  # the ClassLabel's order
        assert sorted(hf_rows(saved)) == expected
        parquet = scan_split(f"hf:{hf_data}/hub/{split}", reading=hub)  # the Hub's split files of a folder
        assert parquet.class_names == TINY_CLASSES  # strings, naturally sorted
        assert sorted(hf_rows(parquet)) == expected and len(parquet.samples) == len(expected)
    globbed = scan_split(f"hf:{hf_data}/hub/data/test-*.parquet", reading=hub)  # a glob: the same rows
    assert sorted(hf_rows(globbed)) == sorted(hf_rows(parquet))
    # integer labels: their values as class names; with the model's names, by index
    ints = scan_split(f"hf:{hf_data}/ints.parquet")
    assert ints.class_names == ["0", "1", "2"]
    test = sorted(folder_rows(tiny_data, "test"))
    by_index = scan_split(f"hf:{hf_data}/ints.parquet", class_names=TINY_CLASSES)
    assert sorted(hf_rows(by_index)) == test
    # the model's class names map ClassLabel names by name, whatever the ClassLabel's order
    saved_test = scan_split(f"hf:{hf_data}/saved/test", class_names=TINY_CLASSES)
    assert saved_test.class_names == TINY_CLASSES and sorted(hf_rows(saved_test)) == test
    # a column of lists: a multi-label split
    multi = scan_split(f"hf:{hf_data}/multi.parquet")
    assert multi.task is MULTILABEL and multi.class_names == ["blue", "green", "red", "round"]
    assert sorted(hf_rows(multi)) == sorted((b, "|".join(sorted([n, "round"] if i % 2 else [n], key=str.casefold)))
                                            for i, (b, n) in enumerate(folder_rows(tiny_data, "test")))
    # the signature: stable for the same files, another for other files
    assert saved.signature == scan_split(f"hf:{hf_data}/saved/test").signature != by_index.signature


def test_hf_refusals_are_one_line(hf_data: Path) -> None:
    cases = [(f"hf:{hf_data}/saved", "DatasetDict", "test, train, val"),
             (f"hf:{hf_data}/hub", "several splits", "test, train, val"),
             (f"hf:{hf_data}/nothing", "not found")]
    for path, *needles in cases:
        with pytest.raises(UserError) as err:
            scan_split(path)
        assert all(n in str(err.value) for n in needles), err.value
    with pytest.raises(UserError, match="no image column 'image' .*img, colour.*--image_column"):
        scan_split(f"hf:{hf_data}/hub/train")
