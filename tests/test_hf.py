"""`hf:PATH` splits (utils.data.hf): a dataset saved with save_to_disk and Parquet files read as a split
by main.py, metrice.py and audit.py, against the same images as class folders."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import torch
import yaml

from conftest import TINY_CLASSES, assert_ok, assert_user_error, built_trainer, run_inprocess, train_args
from utils.core.log import UserError
from utils.core.options import Options
from utils.core.task import MULTILABEL
from utils.data.decode import image_source
from utils.data.sources import SourceOptions, scan_split, source_options

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
    # a column that exists but holds no images: what it holds, and the columns that could
    with pytest.raises(UserError, match="column 'label' holds int64, not images; image columns: image "):
        scan_split(f"hf:{hf_data}/ints.parquet", reading=SourceOptions(image_column="label"))
    # the suggested split of a DatasetDict / Hub folder: train for the train set, else the first
    for path in (f"hf:{hf_data}/saved", f"hf:{hf_data}/hub"):
        with pytest.raises(UserError, match=r"e\.g\. hf:.*/train\)?$"):
            scan_split(path, what="train set")
        with pytest.raises(UserError, match=r"e\.g\. hf:.*/test\)?$"):
            scan_split(path, what="val set")


def test_hf_val_class_the_model_lacks_stops_in_one_line(hf_data: Path, tmp_path: Path) -> None:
    """Integer labels with one past the model's classes stop the scan, as folders and shards do,
    instead of skipping that row with a line of its own."""
    table = pq.read_table(hf_data / "ints.parquet")
    labels = table.column("label").to_pylist()
    labels[4] = len(TINY_CLASSES)  # a class the model lacks
    pq.write_table(table.set_column(1, "label", pa.array(labels)), tmp_path / "extra.parquet")
    with pytest.raises(UserError) as err:
        scan_split(f"hf:{tmp_path}/extra.parquet", class_names=TINY_CLASSES, what="val set")
    assert str(err.value).startswith(f"val set hf:{tmp_path}/extra.parquet has class '3' (row 4) that the model does "
                                     f"not know (its classes: {', '.join(TINY_CLASSES)})"), err.value


def test_main_and_metrice_read_hf_splits_as_the_folders(tiny_data: Path, hf_data: Path, trained_run: Any, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """main.py on the Hub's Parquet files (columns named by the flags, kept in args.yaml) trains on the
    folders' images and labels with their mean/std; metrice.py scores an hf: test split exactly as the
    folder test split."""
    hub = f"hf:{hf_data}/hub"
    run = tmp_path / "run"
    trainer = built_trainer(monkeypatch, *train_args(None, run, "--train_path", f"{hub}/train", "--val_path", f"{hub}/val",
                                                     "--test_path", f"{hub}/test", "--image_column", "img",
                                                     "--label_column", "colour"))
    data = trainer.data
    assert sorted(hf_rows(data.train_set)) == sorted(folder_rows(tiny_data, "train"))
    assert sorted(hf_rows(data.val_set)) == sorted(folder_rows(tiny_data, "val"))
    theirs = torch.load(trained_run.path / "best.pt", map_location="cpu", weights_only=True)  # trained on the folders
    assert data.class_names == theirs["class_names"] == TINY_CLASSES
    assert list(data.spec.mean) == pytest.approx(theirs["mean"], abs=1e-6)
    assert list(data.spec.std) == pytest.approx(theirs["std"], abs=1e-6)
    recorded = yaml.safe_load((run / "args.yaml").read_text())
    assert (recorded["image_column"], recorded["label_column"]) == ("img", "colour")
    # metrice.py and the others take the run's columns when their flags are not given
    reading = source_options(Options({"image_column": None, "label_column": "colour2", "list_sep": None}), recorded)
    assert reading == SourceOptions(list_sep=None, image_column="img", label_column="colour2")

    def scored(*split: Any) -> dict[str, Any]:
        out = run_inprocess("metrice.py", "--save_path", trained_run.path, "--task", "test", "--device", "cpu",
                            "--workers", 0, *split)
        assert_ok(out)
        folder = Path(next(ln for ln in out.stdout.splitlines() if ln.startswith("results: ")).split(": ", 1)[1])
        return json.loads((folder / "results.json").read_text())["metrics"]

    assert scored("--test_path", f"{hub}/test", "--image_column", "img", "--label_column", "colour") == scored(
        "--test_path", tiny_data / "test")


def test_audit_reads_hf_splits(tiny_data: Path, hf_data: Path, tmp_path: Path) -> None:
    """The same images as Parquet train and val (one through a Hub folder, one through a glob) leak as
    the same images in two folders do; read in a worker process (--workers 1)."""
    import csv
    import shutil

    shutil.copytree(tiny_data / "train", tmp_path / "copy")
    runs = {"folders": ["--train_path", tiny_data / "train", "--val_path", tmp_path / "copy"],
            "hf": ["--train_path", f"hf:{hf_data}/hub/train", "--val_path", f"hf:{hf_data}/hub/data/train-*.parquet",
                   "--image_column", "img", "--label_column", "colour"]}
    found = {}
    for name, flags in runs.items():
        proc = run_inprocess("audit.py", *flags, "--save_path", tmp_path / name, "--workers", 1)
        assert_ok(proc)
        assert "48 images" in proc.stdout and "24 group(s) of copies" in proc.stdout, proc.stdout
        rows = csv.DictReader((tmp_path / name / "findings.csv").open())
        found[name] = sorted((r["kind"], r["split_a"], r["split_b"], r["label_a"], r["label_b"], r["distance"]) for r in rows)
    assert found["hf"] == found["folders"] and sum(r[0] == "leak" for r in found["hf"]) == 24


def test_hf_mistakes_through_the_command_line(hf_data: Path, tmp_path: Path) -> None:
    hub = f"hf:{hf_data}/hub"
    common = train_args(None, tmp_path / "run", "--val_path", f"{hub}/val")
    assert_user_error(run_inprocess("main.py", *common, "--train_path", f"{hub}/train", "--label_column", "colour"),
                      "no image column 'image'", "img, colour", "--image_column")
    assert_user_error(run_inprocess("main.py", *common, "--train_path", f"{hub}/train", "--image_column", "img"),
                      "no label column 'label'", "img, colour", "--label_column")
    assert_user_error(run_inprocess("main.py", *common, "--train_path", f"hf:{tmp_path}/absent"), "--train_path", "not found")
