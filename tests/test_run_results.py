"""main.py keeps its results in the run folder (utils.train.results): results.json's train, test and
model sections hold the numbers of train.log, best.pt and the printed test line; a resume keeps them
right (the earlier epochs' times from last.pt) and keeps the sections other writers added; results.png
shows the curves with the best epoch marked. The --kfold summary: tests/test_kfold.py.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_ok, load_ckpt, run_inprocess

from utils.core.run import RunFolder


def read_log(run: Path) -> list[dict[str, str]]:
    with (run / "train.log").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def printed_test(stdout: str) -> dict[str, float]:
    """'test (9 images, best.pt): acc 1.0000, mean_acc 1.0000, loss 0.9848' as numbers."""
    line = re.findall(r"^test \(\d+ images, best\.pt\): (.*)$", stdout, re.M)[-1]
    return {k: float(v) for k, v in (part.split(" ") for part in line.split(", "))}


def check_results(run: Path, stdout: str, epochs: int) -> dict:
    """Every number of results.json against its source; returns the file's content."""
    results = json.loads((run / RunFolder.RESULTS).read_text(encoding="utf-8"))
    train, best = results["train"], load_ckpt(run / "best.pt")
    rows = read_log(run)
    assert train["epochs"] == epochs == len(rows) == len(train["time"]["epoch_seconds"])
    assert train["best_epoch"] == best["epoch"] == best["best"]["epoch"]
    assert train["best_value"] == best["best"]["value"] and train["best_metric"] == best["best"]["metric"] == "acc"
    assert train["best_metrics"] == best["metrics"]
    row = rows[train["best_epoch"] - 1]  # the best epoch's train.log row: the same val and train numbers
    val = train["best_metrics"]["val"]
    assert [float(row[k]) for k in ("test_loss", "test_acc", "test_mean_acc")] == [val["loss"], val["acc"], val["mean_acc"]]
    assert [float(row[k]) for k in ("loss", "acc")] == [train["best_metrics"]["train"]["loss"], train["best_metrics"]["train"]["acc"]]
    assert train["best_value"] == val["acc"]
    assert train["classes"] == best["class_names"] and train["image_size"] == best["image_size"] == 32
    printed = printed_test(stdout)
    assert {k: round(results["test"][k], 4) for k in printed} == printed
    times = train["time"]
    assert times["train_seconds"] == pytest.approx(sum(times["epoch_seconds"]))
    assert times["train_seconds"] == pytest.approx(sum(times["parts_seconds"].values()))
    assert times["epoch_seconds_mean"] == pytest.approx(times["train_seconds"] / epochs)
    model = results["model"]
    from utils.models.registry import create_model

    assert model["parameters"] == sum(p.numel() for p in create_model(best["model_name"], 3).parameters())
    assert model["best_pt_mb"] == (run / "best.pt").stat().st_size / 1e6
    speed = model["speed"]
    assert speed["image_size"] == 32 and speed["batch_size"] == 8 and speed["iterations"] >= 5
    assert speed["images_per_s"] == pytest.approx(8 / (speed["batch_ms_median"] / 1000))
    return results


def test_results_json_holds_train_log_best_pt_and_the_printed_test(trained_run) -> None:
    assert_ok(trained_run.proc)
    check_results(trained_run.path, trained_run.proc.stdout, trained_run.epochs)
    assert f"results: {trained_run.path / RunFolder.RESULTS}" in trained_run.proc.stdout


def test_results_png_marks_the_best_epoch(trained_run) -> None:
    from utils.draw.figures import plot_results
    from utils.train.results import RESULTS_PLOT

    image = Image.open(trained_run.path / RESULTS_PLOT)
    assert image.width > 2.5 * image.height  # loss, metrics, lr side by side
    fig = plot_results(read_log(trained_run.path), ("acc", "mean_acc"), 2, "acc")
    assert len(fig.axes) == 3
    for ax in fig.axes:  # the dashed line at the best epoch, on every panel
        marks = [line for line in ax.get_lines() if line.get_label() == "best epoch 2"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [2, 2]


def test_resume_keeps_results_right_and_other_sections(trained_run, tmp_path: Path) -> None:
    run = tmp_path / "exp"
    shutil.copytree(trained_run.path, run)
    before = json.loads((run / RunFolder.RESULTS).read_text(encoding="utf-8"))
    foreign = {"acc": 0.5, "note": "written by another tool"}
    (run / RunFolder.RESULTS).write_text(json.dumps(before | {"metrics": foreign}), encoding="utf-8")
    proc = run_inprocess("main.py", "--save_path", run, "--resume", "--epoch", "3")
    assert_ok(proc)
    results = check_results(run, proc.stdout, 3)
    assert results["metrics"] == foreign  # another writer's section is kept
    # the first two epochs' times come back from last.pt: the same numbers (the last epoch's without the
    # writing of that last.pt itself, which it could not hold), then the new epoch's
    old, new = before["train"]["time"]["epoch_seconds"], results["train"]["time"]["epoch_seconds"]
    assert new[0] == old[0] and 0.5 * old[1] < new[1] <= old[1]
    assert np.isfinite(new[2]) and new[2] > 0
