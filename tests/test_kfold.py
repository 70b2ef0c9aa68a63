"""main.py --kfold K: stratified seeded folds, the out-of-fold probabilities, the summary, --resume,
what metrice.py, predict.py and export.py do with a --kfold run, and the refusals.

One K=3 run (1 epoch, resnet10t at 32 px, --metrice loss so that the best fold is not a tie) is
trained once for the module and read by every test; the resume test trains one more, stopped after
fold 1 by a SIGTERM at the first step of fold 2 and resumed, and one --kfold 2 run goes through
torchrun with 2 CPU processes.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

import numpy as np
import pytest
import yaml

from conftest import (REPO, SUBPROCESS_ENV, TINY_CLASSES, TINY_MODEL, assert_ok, assert_user_error, describe, load_ckpt,
                      make_split_dataset, run_inprocess, run_main_stopped_after, run_many, run_script, train_args,
                      write_multilabel_split)
from utils.core.log import UserError
from utils.core.run import RunFolder
from utils.data.decode import load_image
from utils.data.sources import scan_split
from utils.evaluate.metrics import overall_metrics
from utils.evaluate.oof import OofTable, read_oof
from utils.infer.backends import load_backend, predict_probs, preprocess_images
from utils.train.kfold import assign_folds, best_fold

K = 3
STEPS_PER_FOLD = 2  # 16 training images per fold, batch 8, 1 epoch


@dataclass
class KfoldRun:
    path: Path
    proc: CompletedProcess
    data: Path


def kfold_args(data: Path, save_path: Path, *extra: str) -> list[str]:
    return train_args(data, save_path, "--kfold", K, "--metrice", "loss", *extra)


@pytest.fixture(scope="module")
def kfold_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> KfoldRun:
    """A finished --kfold 3 run of tiny_data (24 training images, 8 per class; val and test splits)."""
    path = tmp_path_factory.mktemp("kfold") / "cv"
    proc = run_script("main.py", *kfold_args(tiny_data, path))
    assert_ok(proc)
    return KfoldRun(path, proc, tiny_data)


def record(run: Path) -> dict:
    return RunFolder(run).kfold_record()


def summary(run: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader((run / RunFolder.KFOLD_SUMMARY).open(encoding="utf-8")))
    return rows[0], rows[1:]


def fold_probs(fold_dir: Path, paths: list[str]) -> np.ndarray:
    """What a fold's best.pt predicts for image files, through the inference path."""
    backend = load_backend(fold_dir)
    images = [load_image(p, backend.meta.image_channel) for p in paths]
    return np.asarray(predict_probs(backend, preprocess_images(backend.meta, images)), dtype=np.float64)


def uncalibrated(oof: OofTable, run: Path) -> np.ndarray:
    """Out-of-fold probabilities at temperature 1: each fold's rows taken back through its best.pt's temperature."""
    from utils.core.task import MULTICLASS
    from utils.infer.calibration import at_temperature

    probs = np.array(oof.probs, dtype=np.float64)
    for fold in np.unique(oof.folds):
        temperature = load_ckpt(run / f"fold{fold}" / RunFolder.BEST).get("temperature")
        probs[oof.folds == fold] = at_temperature(probs[oof.folds == fold], MULTICLASS, temperature)
    return probs


# ------------------------------------------------------------------------------------ the folds
def test_folds_are_disjoint_cover_the_set_stratified_and_seeded() -> None:
    from sklearn.model_selection import StratifiedKFold

    counts = {"a": 10, "b": 7, "c": 5, "d": 13}
    targets = np.repeat(np.arange(len(counts)), list(counts.values()))
    np.random.default_rng(0).shuffle(targets)  # scan order need not be sorted by class
    folds = assign_folds(targets, list(counts), 4, seed=0)
    # one fold per image (disjoint), every fold used, the whole set covered
    assert folds.shape == targets.shape and set(folds.tolist()) == {1, 2, 3, 4}
    # stratified: each class's count in the folds differs by at most one
    for c in range(len(counts)):
        per_fold = np.bincount(folds[targets == c], minlength=5)[1:]
        assert per_fold.sum() == list(counts.values())[c] and per_fold.max() - per_fold.min() <= 1, (c, per_fold)
    # seeded: the same seed the same folds, another seed other folds; and exactly sklearn's folds
    assert np.array_equal(assign_folds(targets, list(counts), 4, seed=0), folds)
    assert not np.array_equal(assign_folds(targets, list(counts), 4, seed=1), folds)
    for fold, (_, held) in enumerate(StratifiedKFold(4, shuffle=True, random_state=0).split(targets, targets), start=1):
        assert np.array_equal(np.flatnonzero(folds == fold), np.sort(held))
    with pytest.raises(UserError) as err:  # a class with fewer images than folds: named, with its count
        assign_folds(targets, list(counts), 6, seed=0)
    assert "class 'c' has 5 training image(s)" in str(err.value) and "--kfold 5" in str(err.value)


def test_best_fold_is_the_best_held_out_metric_ties_to_the_lowest_fold() -> None:
    results = {1: {"held_out": {"acc": 0.8, "loss": 0.5}}, 2: {"held_out": {"acc": 0.9, "loss": 0.7}},
               3: {"held_out": {"acc": 0.9, "loss": 0.4}}}
    assert best_fold(results, "acc")["fold"] == 2  # highest acc; 2 and 3 tie: the lower
    assert best_fold(results, "loss")["fold"] == 3  # loss: the lowest
    assert best_fold({k: results[k] for k in (3, 1)}, "acc")["fold"] == 3


# ------------------------------------------------------------------------------------ the run
def test_oof_holds_every_training_image_once_with_its_folds_model(kfold_run: KfoldRun) -> None:
    run = kfold_run.path
    train = scan_split(kfold_run.data / "train", what="train set")
    oof = read_oof(run / RunFolder.OOF)
    rec = record(run)
    # every training image once, in training-set order, with its label and the fold that held it out
    assert oof.paths == [p for p, _ in train.samples]
    assert oof.labels.tolist() == [t for _, t in train.samples] and oof.class_names == TINY_CLASSES
    assert oof.folds.tolist() == [f for _, f in rec["images"]] and sorted(set(oof.folds.tolist())) == [1, 2, 3]
    assert np.allclose(oof.probs.sum(axis=1), 1, atol=1e-5)
    for fold in range(1, K + 1):
        rows = np.flatnonzero(oof.folds == fold)
        paths = [oof.paths[i] for i in rows]
        own = fold_probs(run / f"fold{fold}", paths)
        other = fold_probs(run / f"fold{fold % K + 1}", paths)
        assert np.allclose(oof.probs[rows], own, atol=1e-4), fold  # what that fold's best.pt predicts ...
        assert np.abs(oof.probs[rows] - other).max() > 1e-3, fold  # ... not another fold's model
        # the held-out accuracy of the summary is the accuracy of these rows
        assert rec["folds"][str(fold)]["held_out"]["acc"] == pytest.approx(
            float(np.mean(oof.probs[rows].argmax(axis=1) == oof.labels[rows])))
        fold_oof = read_oof(run / f"fold{fold}" / RunFolder.OOF)  # the fold's own file: the same rows
        assert fold_oof.paths == paths and np.allclose(fold_oof.probs, oof.probs[rows], atol=1e-7)


def test_each_fold_trains_on_the_other_folds_only(kfold_run: KfoldRun) -> None:
    from utils.core.schema import PreprocessSpec
    from utils.core.task import MULTICLASS
    from utils.train.setup import TrainData

    run, rec = kfold_run.path, record(kfold_run.path)
    n = rec["train_images"]
    held = {f: sum(1 for _, g in rec["images"] if g == f) for f in range(1, K + 1)}
    assert n == 24 and sum(held.values()) == n
    # what each fold's trainer trained on (its console line), in fold order: the other folds' images
    trained = [int(line.split("(")[1].split()[0]) for line in kfold_run.proc.stdout.splitlines()
               if line.startswith(f"training {TINY_MODEL} on cpu (")]
    assert trained == [n - held[f] for f in range(1, K + 1)], kfold_run.proc.stdout[-2000:]
    for f in range(1, K + 1):
        assert rec["folds"][str(f)]["train_images"] == n - held[f]
        fold_args = yaml.safe_load((run / f"fold{f}" / RunFolder.ARGS).read_text())
        assert (fold_args["fold"], fold_args["kfold"], Path(fold_args["save_path"])) == (f, K, run / f"fold{f}")
    # TrainData.fold: the training images of the other folds, nothing else; validation on the val split if any
    train = scan_split(kfold_run.data / "train", what="train set")
    data = TrainData(train, None, PreprocessSpec.create(32, 3, [0.5] * 3, [0.2] * 3), MULTICLASS)
    folds = np.array([f for _, f in rec["images"]])
    held_out = train.subset(np.flatnonzero(folds == 2))
    fold_data = data.fold(np.flatnonzero(folds != 2), held_out)
    assert [p for p, _ in fold_data.train_set.samples] == [p for (p, _), f in zip(train.samples, folds) if f != 2]
    assert fold_data.val_set is held_out and fold_data.spec is data.spec
    assert len(yaml.safe_load((run / RunFolder.ARGS).read_text())["mean"]) == 3  # the whole set's mean/std, once


def test_summary_mean_and_sample_std_are_numpys_over_the_folds(kfold_run: KfoldRun) -> None:
    run, rec = kfold_run.path, record(kfold_run.path)
    header, rows = summary(run)
    assert header == ["fold", "train_images", "held_out_images", "held_out_acc", "held_out_loss", "best_epoch",
                      "best_val_loss", "test_acc", "test_loss"]
    assert [r[0] for r in rows] == ["1", "2", "3", "mean", "std"]
    values = np.array([[float(v) for v in r[1:]] for r in rows[:K]])
    assert np.allclose([float(v) for v in rows[K][1:]], values.mean(axis=0), rtol=1e-12, atol=0)
    assert np.allclose([float(v) for v in rows[K + 1][1:]], values.std(axis=0, ddof=1), rtol=1e-12, atol=0)  # sample std
    loss = [rec["folds"][str(f)]["held_out"]["loss"] for f in range(1, K + 1)]
    assert values[:, header.index("held_out_loss") - 1].tolist() == pytest.approx(loss)
    assert rec["best_fold"]["fold"] == int(np.argmin(loss)) + 1  # --metrice loss: the lowest held-out loss
    assert f"best fold: fold{rec['best_fold']['fold']}" in kfold_run.proc.stdout and "mean ± std" in kfold_run.proc.stdout


def test_results_json_summary_of_the_folds_and_each_folds_own(kfold_run: KfoldRun) -> None:
    """RUN/results.json's kfold section holds kfold_summary.csv's mean and std and kfold.json's folds and best
    fold; each fold's own results.json holds its best.pt's epoch and metrics (utils.train.results)."""
    import json

    run, rec = kfold_run.path, record(kfold_run.path)
    section = json.loads((run / RunFolder.RESULTS).read_text(encoding="utf-8"))["kfold"]
    header, rows = summary(run)
    assert section["mean"] == pytest.approx(dict(zip(header[1:], map(float, rows[K][1:]))), rel=1e-12)
    assert section["std"] == pytest.approx(dict(zip(header[1:], map(float, rows[K + 1][1:]))), rel=1e-12)
    assert section["folds"] == rec["folds"] and section["best_fold"] == rec["best_fold"] and section["k"] == K
    for fold in range(1, K + 1):
        own = json.loads((run / f"fold{fold}" / RunFolder.RESULTS).read_text(encoding="utf-8"))
        best = load_ckpt(run / f"fold{fold}" / "best.pt")
        assert own["train"]["best_epoch"] == best["epoch"] == rec["folds"][str(fold)]["best"]["epoch"]
        assert own["train"]["best_metrics"] == best["metrics"] and own["test"] == rec["folds"][str(fold)]["test"]


def test_resume_after_fold_1_finishes_the_others_without_retraining_it(kfold_run: KfoldRun, tmp_path: Path) -> None:
    """Stopped at the first step of fold 2, resumed: fold 1 kept as it was, fold 2 continued from its
    last.pt, fold 3 trained. This run has no val split (each fold validates on its held-out images);
    with 1 epoch best.pt is epoch 1 whichever split chooses it, and the val split plays no part in
    training, so the out-of-fold probabilities equal the uninterrupted kfold_run's."""
    run = tmp_path / "cv"
    args = kfold_args(kfold_run.data, run, "--val_path", tmp_path / "no_val")
    stopped = run_main_stopped_after(STEPS_PER_FOLD + 1, args)
    assert stopped.returncode != 0 and f"continue with: python main.py --save_path {run} --resume" in stopped.stdout, \
        describe(stopped)
    assert record(run)["finished"] == [1] and (run / "fold2" / RunFolder.LAST).is_file()
    assert not (run / RunFolder.OOF).exists() and not (run / "fold3").exists()
    best1 = run / "fold1" / RunFolder.BEST
    before = (best1.read_bytes(), best1.stat().st_mtime_ns)
    fold1_rows = read_oof(run / "fold1" / RunFolder.OOF)

    resumed = run_script("main.py", "--save_path", run, "--resume")
    assert_ok(resumed)
    assert "fold 1/3: finished before, kept" in resumed.stdout and f"resuming {run / 'fold2'} at epoch 1, step 1" in resumed.stdout
    assert (best1.read_bytes(), best1.stat().st_mtime_ns) == before  # fold 1 not trained again, not even opened
    assert resumed.stdout.count(f"training {TINY_MODEL} on cpu (") == 2 and f"run folder: {run / 'fold1'}" not in resumed.stdout
    oof, reference = read_oof(run / RunFolder.OOF), read_oof(kfold_run.path / RunFolder.OOF)
    assert oof.paths == reference.paths and oof.folds.tolist() == reference.folds.tolist()
    # each fold calibrates on the images it validates on (here its held-out fold, there the val split):
    # the weights are the same, so are the probabilities at temperature 1
    assert np.allclose(uncalibrated(oof, run), uncalibrated(reference, kfold_run.path), atol=1e-5)
    assert np.array_equal(oof.probs[oof.folds == 1], fold1_rows.probs)
    # no val split: the held-out fold chose best.pt (said in kfold.json and the log), so best.pt's
    # validation metrics are its held-out metrics
    rec = record(run)
    assert rec["validation"] == "held_out" and "mild optimism" in rec["validation_note"]
    assert "mild optimism" in stopped.stderr
    for fold in range(1, K + 1):
        val = load_ckpt(run / f"fold{fold}" / RunFolder.BEST)["metrics"]["val"]
        assert val["acc"] == pytest.approx(rec["folds"][str(fold)]["held_out"]["acc"])
        assert val["loss"] == pytest.approx(rec["folds"][str(fold)]["held_out"]["loss"], abs=1e-3)  # fp16 best.pt


# ------------------------------------------------------------------------ metrice, predict, export
def test_metrice_and_predict_average_the_folds_export_takes_the_best(kfold_run: KfoldRun) -> None:
    run, test = kfold_run.path, kfold_run.data / "test"
    metrice, predict, export = run_many([
        {"script": "metrice.py", "args": ["--save_path", run, "--task", "test", "--visual", "--device", "cpu", "--workers", 0]},
        {"script": "predict.py", "args": ["--save_path", run, "--source", test, "--device", "cpu", "--workers", 0]},
        {"script": "export.py", "args": ["--save_path", run, "--export", "safetensors"]},
    ])
    for proc in (metrice, predict, export):
        assert_ok(proc)
    paths = [p for p, _ in scan_split(test, what="test set").samples]
    targets = np.array([t for _, t in scan_split(test, what="test set").samples])
    per_fold = [fold_probs(run / f"fold{f}", paths) for f in range(1, K + 1)]
    mean = np.mean(per_fold, axis=0)

    assert min(np.abs(p - mean).max() for p in per_fold) > 1e-3  # the mean is none of the folds
    # metrice.py: an ensemble of the 3 folds, results inside the run folder; its probabilities and scores are the mean's
    assert "ensemble of 3 models (mean)" in metrice.stdout
    metrics = {row[0]: row[1:] for row in csv.reader((run / "test" / "metrics.csv").open())}
    assert metrics["metric"] == ["ensemble (mean)", *(str(run / f"fold{f}") for f in range(1, K + 1))]
    expected = overall_metrics(targets, mean, TINY_CLASSES)
    for name in ("acc", "ece"):
        assert float(metrics[name][0]) == pytest.approx(expected[name], abs=1e-5), name
    visual = [r for name in ("correct.csv", "incorrect.csv") for r in csv.DictReader((run / "test" / name).open())]
    got = {r["path"]: {r[f"top{i}_class"]: float(r[f"top{i}_probability"]) for i in (1, 2, 3)} for r in visual}
    assert np.allclose([[got[p][c] for c in TINY_CLASSES] for p in paths], mean, atol=2e-6)

    # predict.py: each image's three probabilities are the mean of the folds'
    rows = list(csv.DictReader((run / "predict" / "exp" / "predictions.csv").open()))
    got = {r["path"]: {r[f"top{i}_class"]: float(r[f"top{i}_prob"]) for i in (1, 2, 3)} for r in rows}
    assert np.allclose([[got[p][c] for c in TINY_CLASSES] for p in paths], mean, atol=2e-6)

    # export.py: the best fold (the lowest held-out loss), said so; its weights are that fold's best.pt
    from safetensors.torch import load_file

    best = record(run)["best_fold"]["fold"]
    assert f"using its best fold, fold{best} (held-out loss" in export.stdout, describe(export)
    exported = load_file(str(run / f"fold{best}" / "export" / "best_hub" / "model.safetensors"))
    for fold in range(1, K + 1):
        weights = load_ckpt(run / f"fold{fold}" / RunFolder.BEST)["model"]
        same = all(np.array_equal(exported[k].numpy(), weights[k].float().numpy()) for k in exported)
        assert same == (fold == best), fold


def test_torchrun_trains_every_fold_in_every_process(tmp_path: Path) -> None:
    """--kfold 2 under torchrun with 2 CPU processes on 21 images (folds of 10 and 11: an odd share):
    the fold loop is collective (each fold's weights identical in both processes), and the held-out
    metrics, summed over the processes, count each held-out image once: they are the accuracy of
    oof.csv, which the first process alone predicted."""
    data = make_split_dataset(tmp_path / "data", TINY_CLASSES, train=7, val=2, test=0)
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "main.py"),
           *train_args(data, run, "--kfold", 2, "--batch_size", 4, "--test_path", tmp_path / "none")]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ) | SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.count("weights identical on all 2 processes") == 2, describe(proc)
    rec, oof = record(run), read_oof(run / RunFolder.OOF)
    assert oof.paths == [p for p, _ in scan_split(data / "train", what="train set").samples]
    assert sorted(rec["folds"][str(f)]["held_out_images"] for f in (1, 2)) == [10, 11]
    for fold in (1, 2):
        rows = oof.folds == fold
        assert rec["folds"][str(fold)]["held_out_images"] == int(rows.sum())
        assert rec["folds"][str(fold)]["held_out"]["acc"] == pytest.approx(
            float(np.mean(oof.probs[rows].argmax(axis=1) == oof.labels[rows])))


# ------------------------------------------------------------------------------------ refusals
def test_refusals_are_one_line(kfold_run: KfoldRun, tiny_data: Path, tmp_path: Path) -> None:
    run = kfold_run.path
    assert_user_error(run_inprocess("main.py", *kfold_args(tiny_data, tmp_path / "a", "--kfold", 1)),
                      "--kfold must be 2 or more")
    assert_user_error(run_inprocess("main.py", *kfold_args(tiny_data, tmp_path / "b", "--kfold", 9)),
                      "--kfold 9", "class 'blue' has 8 training image(s)", "--kfold 8")
    lists = {s: write_multilabel_split(tmp_path / "ml", s, 6, seed) for s, seed in (("train", 0), ("val", 1))}
    assert_user_error(run_inprocess("main.py", *train_args(None, tmp_path / "c", "--kfold", 2, "--train_path",
                                                           lists["train"], "--val_path", lists["val"])),
                      "--kfold is for multiclass runs only", "without --kfold")
    assert not any((tmp_path / n).exists() for n in "abc")  # a refusal leaves no run folder
    (tmp_path / "plain").mkdir()
    assert_user_error(run_inprocess("main.py", "--save_path", tmp_path / "plain", "--resume", "--kfold", 3),
                      "is not a --kfold run", "drop --kfold")
    assert_user_error(run_inprocess("main.py", "--save_path", run, "--resume", "--kfold", 5),
                      "is a --kfold run of --kfold 3", "drop --kfold")
    assert_user_error(run_inprocess("main.py", "--save_path", run, "--resume"), "all 3 folds", "nothing to resume")
    assert_user_error(run_inprocess("main.py", "--save_path", run / "fold2", "--resume"),
                      "is fold 2 of the --kfold run", f"--save_path {run} --resume")
