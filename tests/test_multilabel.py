"""Beyond single-label folders: list-file datasets, multi-label training and evaluation, imbalance.

A generated multi-label set (coloured squares, one to three per image, their colours the labels)
trains to a mAP far above chance; the thresholds tuned on val are stored in best.pt and used by
metrice.py and predict.py; every multi-label metric equals scikit-learn's; a list file and the
same images as class folders train identical weights; balanced sampling draws classes equally.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MULTILABEL_COLOURS, TINY_CLASSES, assert_ok, describe, load_ckpt, run_inprocess, run_script, train_args

COLOURS = MULTILABEL_COLOURS


@pytest.fixture(scope="module")
def multilabel(multilabel_run: dict) -> dict:
    """conftest's multi-label run (shared with the serve tests)."""
    return multilabel_run


def true_labels(list_file: Path) -> dict[str, set[str]]:
    with list_file.open() as fh:
        return {str(list_file.parent / r["path"]): set(r["labels"].split("|")) for r in csv.DictReader(fh)}


def test_multilabel_training_learns_and_stores_thresholds(multilabel: dict) -> None:
    proc = multilabel["proc"]
    assert_ok(proc)
    log = list(csv.DictReader((multilabel["run"] / "train.log").open()))
    assert list(log[0])[:8] == ["epoch", "lr", "loss", "map", "f1", "test_loss", "test_map", "test_f1"]
    best = load_ckpt(multilabel["run"] / "best.pt")
    assert best["task"] == "multilabel" and best["best"]["metric"] == "map"
    assert best["args"]["loss"] == "BCEWithLogitsLoss"  # the default loss of a multilabel run
    # chance: each label is present in about half the images (1-3 of 4), so a random ranking scores ~0.5
    assert float(log[best["epoch"] - 1]["test_map"]) > 0.85, log
    thresholds = best["thresholds"]
    assert len(thresholds) == 4 and all(0 < t < 1 for t in thresholds) and len(set(thresholds)) > 1
    assert "thresholds tuned on the val split" in proc.stdout


def test_metrice_multilabel_metrics_equal_sklearn(multilabel: dict) -> None:
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, hamming_loss

    run = multilabel["run"]
    proc = run_inprocess("metrice.py", "--save_path", run, "--task", "test", "--device", "cpu", "--workers", "0")
    assert proc.returncode == 0, describe(proc)
    out = run / "test"
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    names = sorted(COLOURS)  # the class order: a natural sort of the labels
    truth = true_labels(multilabel["lists"]["test"])
    y = np.array([[n in truth[r["path"]] for n in names] for r in rows])
    probs = np.array([[float(r[f"p_{n}"]) for n in names] for r in rows])
    thresholds = np.array(load_ckpt(run / "best.pt")["thresholds"])
    decided = probs >= thresholds
    assert [r["predicted_labels"] for r in rows] == ["|".join(n for n, d in zip(names, row) if d) for row in decided]
    metrics = {r["metric"]: float(r["value"]) for r in csv.DictReader((out / "metrics.csv").open())}
    expected = {"map": np.mean([average_precision_score(y[:, c], probs[:, c]) for c in range(4)]),
                "macro_f1": f1_score(y, decided, average="macro", zero_division=0),
                "micro_f1": f1_score(y, decided, average="micro", zero_division=0),
                "exact_match": accuracy_score(y, decided), "hamming_loss": hamming_loss(y, decided)}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=2e-6), key
    per_class = list(csv.DictReader((out / "per_class.csv").open()))
    assert [float(r["threshold"]) for r in per_class] == pytest.approx(list(thresholds))
    assert [int(r["support"]) for r in per_class] == y.sum(axis=0).tolist()


def test_predict_lists_every_label_above_its_threshold(multilabel: dict) -> None:
    run = multilabel["run"]
    proc = run_inprocess("predict.py", "--source", multilabel["lists"]["test"], "--save_path", run, "--device", "cpu",
                         "--workers", "0")
    assert proc.returncode == 0, describe(proc)
    folder = sorted((run / "predict").iterdir())[-1]
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    assert len(rows) == 32
    thresholds = dict(zip(sorted(COLOURS), load_ckpt(run / "best.pt")["thresholds"]))
    for row in rows:
        probs = {row[f"top{j}_class"]: float(row[f"top{j}_prob"]) for j in range(1, 5)}
        labels = row["labels"].split("|") if row["labels"] else []
        assert labels == sorted(labels, key=lambda c: -probs[c])  # most probable first
        for name, p in probs.items():
            if abs(p - thresholds[name]) > 1e-5:  # (the CSV has 6 decimals)
                assert (name in labels) == (p >= thresholds[name]), (row, thresholds)
        assert [float(v) for v in row["label_probs"].split("|") if v] == [probs[c] for c in labels]
        assert row["uncertain"] == ("1" if not labels else "0")


# ------------------------------------------------------------------------------- list files
def test_list_file_and_folders_train_identical_weights(tmp_path: Path, tiny_data: Path) -> None:
    from utils.data.sources import scan_split

    lists = {}
    for split in ("train", "val"):
        image_set = scan_split(tiny_data / split)
        lists[split] = tmp_path / f"{split}.txt"
        lists[split].write_text("".join(f"{Path(p).relative_to(tiny_data).as_posix()}\t{image_set.class_names[t]}\n"
                                        for p, t in image_set.samples))
        lists[split] = lists[split].rename(tiny_data.parent / f"{tiny_data.name}_{split}.txt")  # beside the data
        text = lists[split].read_text().replace(f"{split}/", f"{tiny_data.name}/{split}/")
        lists[split].write_text(text)
    common = ["--epoch", "1", "--test_path", tmp_path / "none", "--list_sep", "\t"]
    folder = run_script("main.py", *train_args(tiny_data, tmp_path / "folder", *common))
    listed = run_script("main.py", *train_args(None, tmp_path / "list", "--train_path", lists["train"],
                                               "--val_path", lists["val"], *common))
    for proc in (folder, listed):
        assert_ok(proc)
    a, b = load_ckpt(tmp_path / "folder" / "last.pt"), load_ckpt(tmp_path / "list" / "last.pt")
    assert a["class_names"] == b["class_names"] == TINY_CLASSES
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []
    assert (tmp_path / "folder" / "train.log").read_text().splitlines()[1] == \
        (tmp_path / "list" / "train.log").read_text().splitlines()[1]


def test_list_problems_are_reported_with_line_numbers(tmp_path: Path, tiny_data: Path) -> None:
    from utils.data.lists import scan_list

    good = sorted((tiny_data / "train" / "red").glob("*.png"))[:5]
    lines = ["path,label", *[f"{p},red" for p in good[:3]], f"{good[0]},red", "missing.png,red", f"{good[3]},purple",
             f"{good[4]},"]
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    image_set = scan_list(tmp_path / "l.csv", class_names=TINY_CLASSES)
    assert len(image_set.samples) == 3
    reasons = [reason for _, reason in image_set.skipped]
    assert any("line 5: the same image as line 2" in r for r in reasons), reasons
    assert any("line 6: file not found" in r for r in reasons), reasons
    assert any("line 7: unknown label 'purple'" in r for r in reasons), reasons
    assert any("line 8: no label" in r for r in reasons), reasons
    numeric = tmp_path / "n.txt"  # numeric labels with a label file
    numeric.write_text(f"{good[0]} 2\n{good[1]} 0\n")
    (tmp_path / "label.txt").write_text("blue\ngreen\nred\n")
    image_set = scan_list(numeric, label_path=tmp_path / "label.txt")
    assert image_set.class_names == TINY_CLASSES and [t for _, t in image_set.samples] == [2, 0]


def test_processing_writes_lists_main_trains_on(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "out"
    proc = run_inprocess("processing.py", "--data_path", tiny_data / "train", "--output_path", out, "--write_lists",
                         "--val_size", "0.25", "--test_size", "0")
    assert proc.returncode == 0, describe(proc)
    assert sorted(p.name for p in out.iterdir()) == [".processing.json", "label.txt", "train.csv", "val.csv"]
    rows = {s: list(csv.DictReader((out / f"{s}.csv").open())) for s in ("train", "val")}
    assert len(rows["train"]) + len(rows["val"]) == 24 and len(rows["val"]) == 6
    assert not {r["path"] for r in rows["train"]} & {r["path"] for r in rows["val"]}
    assert all((out / r["path"]).is_file() and r["label"] == Path(r["path"]).parent.name for r in rows["train"])
    assert not (out / "train").exists()  # nothing copied


# --------------------------------------------------------------------------------- imbalance
def test_balanced_sampler_draws_classes_equally() -> None:
    from utils.core.task import MULTILABEL
    from utils.data.imageset import ImageSet
    from utils.data.loaders import EpochSampler
    from utils.train.setup import balanced_weights

    targets = [0] * 80 + [1] * 15 + [2] * 5
    image_set = ImageSet(Path("."), [(f"{i}.png", t) for i, t in enumerate(targets)], ["a", "b", "c"])
    weights = balanced_weights(image_set)
    # one label each, as a multilabel set: the same chances (the mean over an image's one label)
    assert balanced_weights(image_set.as_task(MULTILABEL)) == pytest.approx(weights)
    assert balanced_weights(ImageSet(Path("."), [("x", (0, 1)), ("y", (0,))], ["a", "b"], task=MULTILABEL)) == \
        pytest.approx([(1 / 2 + 1 / 1) / 2, 1 / 2])
    sampler = EpochSampler(len(targets), True, seed=3, weights=weights)
    counts = np.zeros(3)
    for epoch in range(30):
        sampler.set_epoch(epoch)
        for _, i in sampler:
            counts[targets[i]] += 1
    share = counts / counts.sum()
    assert np.allclose(share, 1 / 3, atol=0.04), share
    again = EpochSampler(len(targets), True, seed=3, weights=weights)  # the same draw after a resume
    again.set_epoch(7, skip=40)
    sampler.set_epoch(7)
    assert [i for _, i in again] == [i for _, i in sampler][40:]


def test_class_balance_modes_by_formula() -> None:
    from utils.core.task import MULTILABEL
    from utils.train.losses import class_balance_weights

    targets = [0] * 50 + [1] * 10
    n, counts = 60, np.array([50, 10])
    inverse = n / (2 * counts)
    assert class_balance_weights(targets, 3, "inverse").tolist() == pytest.approx([*inverse, 1.0])
    assert class_balance_weights(targets, 3, "sqrt").tolist() == pytest.approx([*np.sqrt(inverse), 1.0])
    beta = 0.99
    effective = (1 - beta) / (1 - beta ** counts)
    assert class_balance_weights(targets, 3, "effective", beta).tolist() == pytest.approx(
        [*(effective / effective.mean()), 1.0])
    multi = [(0,), (0, 1), (0,), (0,)]  # multi-label: positives' weights from negatives / positives
    assert class_balance_weights(multi, 2, "inverse", task=MULTILABEL).tolist() == pytest.approx([0.0 / 4, 3.0])


def test_metrice_f1_picks_best_pt_by_macro_f1(tmp_path: Path, tiny_data: Path) -> None:
    proc = run_script("main.py", *train_args(tiny_data, tmp_path / "f1", "--epoch", "2", "--metrice", "f1",
                                             "--sampler", "balanced", "--class_balance", "effective"))
    assert_ok(proc)
    best = load_ckpt(tmp_path / "f1" / "best.pt")
    assert best["best"]["metric"] == "f1" and best["args"]["sampler"] == "balanced"
    assert best["best"]["value"] == pytest.approx(best["metrics"]["val"]["f1"])
    wrong = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "map", "--metrice", "map"))
    assert wrong.returncode == 2 and "multilabel" in wrong.stderr
