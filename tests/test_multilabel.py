"""Beyond single-label folders: list-file datasets, multi-label training and evaluation, imbalance.

A generated multi-label set (coloured squares, one to three per image, their colours the labels)
trains to a mAP far above chance; the mAP of train.log (and the one that chose best.pt) is
scikit-learn's on the probabilities the run computed; the thresholds stored in best.pt are each
class's best-F1 cut of best.pt's probabilities on the val split; metrice.py and predict.py use
them; every multi-label metric equals scikit-learn's; a text list (with spaces and its separator
in paths) and the same images as class folders train identical weights, and a text list's bad
rows are reported by line; the balanced sampler is what the training loop draws from.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (MULTILABEL_COLOURS, TINY_CLASSES, assert_ok, class_image, describe, load_ckpt, make_class_folders, records,
                      run_inprocess, run_script, train_args)

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


def test_training_map_is_sklearns_average_precision(multilabel: dict) -> None:
    """train.log's map and test_map of every epoch, and the value that chose best.pt, are the mean of
    scikit-learn's average_precision over the classes present, on the probabilities the run scored."""
    from sklearn.metrics import average_precision_score

    assert_ok(multilabel["proc"])
    scored = [r for r in records(multilabel["records"])[0] if "metrics" in r]
    assert len(scored) == 2 * 6 + 2  # each epoch's training and validation, then best.pt on val (thresholds) and test
    log = list(csv.DictReader((multilabel["run"] / "train.log").open()))
    for k, epoch_sums in enumerate(scored[:-2]):
        y, p = np.array(epoch_sums["targets"], dtype=bool), np.array(epoch_sums["probs"])
        assert len(y) == (96 if k % 2 == 0 else 32)
        expected = np.mean([average_precision_score(y[:, c], p[:, c]) for c in np.flatnonzero(y.any(axis=0))])
        assert float(log[k // 2]["map" if k % 2 == 0 else "test_map"]) == pytest.approx(expected, abs=1e-12), k
    best = load_ckpt(multilabel["run"] / "best.pt")
    chosen = max(range(6), key=lambda e: float(log[e]["test_map"]))
    assert best["epoch"] == chosen + 1 and best["best"]["value"] == pytest.approx(float(log[chosen]["test_map"]), abs=1e-12)


def best_f1_cut(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold t (one of the probabilities) whose decisions p >= t have scikit-learn's best F1;
    the highest such t on a tie; 0.5 for a class without positives."""
    from sklearn.metrics import f1_score

    if not y.any():
        return 0.5
    scores = {float(t): f1_score(y, p >= t, zero_division=0) for t in np.unique(p)}
    best = max(scores.values())
    return max(t for t, f in scores.items() if f == best)


def test_thresholds_are_each_class_best_f1_cut_on_the_val_split(multilabel: dict) -> None:
    """best.pt's thresholds, worked out here from best.pt's probabilities on the val split images."""
    from utils.data.decode import load_image
    from utils.infer.backends import load_backend, predict_probs, preprocess_images

    assert_ok(multilabel["proc"])
    backend = load_backend(multilabel["run"] / "best.pt", "torch", "cpu")
    truth = true_labels(multilabel["lists"]["val"])
    files = sorted(truth)
    probs = np.asarray(predict_probs(backend, preprocess_images(backend.meta, [load_image(f) for f in files])))
    names = list(backend.meta.class_names)
    y = np.array([[n in truth[f] for n in names] for f in files])
    expected = [best_f1_cut(y[:, c], probs[:, c]) for c in range(len(names))]
    stored = load_ckpt(multilabel["run"] / "best.pt")["thresholds"]
    assert stored == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) > 1


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
def test_text_list_with_its_separator_in_paths_trains_as_the_folders(tmp_path: Path, tiny_data: Path) -> None:
    """A text list with --list_sep ',' whose paths hold spaces and commas (a folder 'my data, v2')
    trains the same weights as the class folders it lists."""
    from utils.data.sources import scan_split

    (tmp_path / "my data, v2").symlink_to(tiny_data, target_is_directory=True)
    lists = {}
    for split in ("train", "val"):
        image_set = scan_split(tiny_data / split)
        lists[split] = tmp_path / f"{split}.txt"
        lists[split].write_text("".join(f"my data, v2/{Path(p).relative_to(tiny_data).as_posix()},{image_set.class_names[t]}\n"
                                        for p, t in image_set.samples))
    common = ["--epoch", "1", "--test_path", tmp_path / "none"]
    folder = run_script("main.py", *train_args(tiny_data, tmp_path / "folder", *common))
    listed = run_script("main.py", *train_args(None, tmp_path / "list", "--train_path", lists["train"],
                                               "--val_path", lists["val"], "--list_sep", ",", *common))
    for proc in (folder, listed):
        assert_ok(proc)
    assert "skipped" not in listed.stderr, listed.stderr
    a, b = load_ckpt(tmp_path / "folder" / "last.pt"), load_ckpt(tmp_path / "list" / "last.pt")
    assert a["class_names"] == b["class_names"] == TINY_CLASSES
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []
    assert (tmp_path / "folder" / "train.log").read_text().splitlines()[1] == \
        (tmp_path / "list" / "train.log").read_text().splitlines()[1]


def test_text_list_paths_with_spaces_and_the_line_of_each_bad_row(tmp_path: Path) -> None:
    """`path label` lines split at the last whitespace (a path may hold spaces); comments and blank
    lines count in the line numbers of the rows reported."""
    from utils.data.lists import scan_list

    folder = tmp_path / "my images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        class_image(i, rng).save(folder / f"photo {i}.png")
    (tmp_path / "l.txt").write_text("\n".join([
        "# a photo shoot",                  # line 1
        "",                                 # 2
        "my images/photo 0.png red",        # 3
        "my images/photo 1.png \t  green",  # 4: tab and spaces before the label
        "my images/missing one.png red",    # 5
        "my images/photo 2.png purple",     # 6
        "unlabelled.png",                   # 7
        "my images/photo 0.png red",        # 8
    ]) + "\n")
    image_set = scan_list(tmp_path / "l.txt", class_names=TINY_CLASSES)
    assert image_set.samples == [(str(folder / "photo 0.png"), 2), (str(folder / "photo 1.png"), 1)]
    by_line = {int(re.search(r" line (\d+)$", where).group(1)): reason
               for where, reason in (r.split(": ", 1) for _, r in image_set.skipped)}
    assert sorted(by_line) == [5, 6, 7, 8], image_set.skipped
    assert by_line[5] == f"file not found: {folder / 'missing one.png'}" and by_line[6].startswith("unknown label 'purple'")
    assert by_line[7] == "no label" and by_line[8] == "the same image as line 3 (a duplicate row)"


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


def test_balanced_sampler_is_what_the_training_loop_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main.py --sampler balanced on 18/3/3 images: the images the training loop loaded, in order, are
    the balanced sampler's draws (with replacement, by inverse class frequency), so the two small
    classes come far more often than their 3 of 24."""
    from utils.data.loaders import EpochSampler, ImageDataset
    from utils.data.sources import scan_split
    from utils.train.setup import balanced_weights

    data = tmp_path / "data"
    colours = {c: i for i, c in enumerate(TINY_CLASSES)}
    make_class_folders(data / "train", dict(zip(TINY_CLASSES, (18, 3, 3))), seed=0, colour_of=colours)
    make_class_folders(data / "val", dict(zip(TINY_CLASSES, (2, 2, 2))), seed=1, colour_of=colours)
    drawn, get_item = [], ImageDataset.__getitem__

    def recorded(self: ImageDataset, key: object) -> object:
        if self.seed is not None:  # the training set
            drawn.append(key)
        return get_item(self, key)

    monkeypatch.setattr(ImageDataset, "__getitem__", recorded)
    proc = run_inprocess("main.py", *train_args(data, tmp_path / "run", "--sampler", "balanced", "--epoch", "2",
                                                "--test_path", tmp_path / "none"))
    assert_ok(proc)
    train_set = scan_split(data / "train")
    sampler = EpochSampler(24, True, seed=0, weights=balanced_weights(train_set))
    expected = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        expected += list(sampler)
    assert drawn == expected
    counts = np.bincount([train_set.samples[i][1] for _, i in drawn], minlength=3)
    assert counts.sum() == 48 and counts[0] < 24 and min(counts[1], counts[2]) > 9, counts  # shuffled: 36, 6, 6


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
