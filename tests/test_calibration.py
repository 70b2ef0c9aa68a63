"""Calibration (issue 24): the temperature, the calibration measures, and the calibrated probabilities
of every path (main.py, metrice.py, predict.py, ONNX).

The numbers first, on fixed arrays in this process: the fitted temperature against scipy's
L-BFGS-B and a dense grid (multiclass, and one temperature per class for sigmoids), a split without
an NLL minimum, an over-confident model (logits x 5 of a calibrated one: the temperature found is 5
and the ECE falls), ECE/NLL/Brier against hand-computed values and scikit-learn. Then one tiny run
(main.py, one epoch) whose val split holds two images filed under the wrong class, so that the NLL
has a minimum (a val split classified all right has none): best.pt's temperature is the minimiser on
its own val logits, metrice.py reports before/after with it, --task calibrate rewrites it (the
weights untouched), the ONNX export and predict.py give softmax(logits / T). Under torchrun the
temperature is fitted on the whole val split, not one process's share.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import (REPO, SUBPROCESS_ENV, TINY_CLASSES, assert_ok, assert_user_error, describe, load_ckpt,
                      make_split_dataset, run_inprocess, run_many, run_script, train_args)
from utils.core.task import MULTICLASS, MULTILABEL
from utils.infer.calibration import (TEMPERATURE_RANGE, at_temperature, brier_score, calibration_bins, calibration_scores,
                                     fit_temperature, negative_log_likelihood, reliability)


# ------------------------------------------------------------------------------ references
def scipy_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The NLL minimiser of softmax(logits / T), found by scipy's L-BFGS-B on T itself (not log T)."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    rows = np.arange(len(logits))
    result = minimize(lambda t: -log_softmax(logits / t[0], axis=1)[rows, targets].mean(), x0=[1.0], method="L-BFGS-B",
                      bounds=[TEMPERATURE_RANGE], options={"ftol": 1e-15, "gtol": 1e-12})
    return float(result.x[0])


def grid_temperature(nll: Any, low: float = 0.05, high: float = 20.0, points: int = 20001) -> tuple[float, float]:
    """(the best temperature of a dense geometric grid, the grid's ratio between neighbours)."""
    grid = np.geomspace(low, high, points)
    return float(grid[int(np.argmin([nll(t) for t in grid]))]), float(grid[1] / grid[0])


def binary_nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    """The mean of -log sigmoid(z / t) where y, -log(1 - sigmoid(z / t)) elsewhere."""
    from scipy.special import log_expit

    return float(-np.mean(np.where(y, log_expit(z / t), log_expit(-z / t))))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------- the temperature
def test_multiclass_temperature_is_the_nll_minimiser() -> None:
    rng = np.random.default_rng(0)
    for scale in (0.5, 3.0):  # an under- and an over-confident set
        y = rng.integers(0, 4, 400)
        z = rng.normal(0, 1, (400, 4))
        z[np.arange(400), y] += 1.2
        z *= scale
        fit = fit_temperature(z, y, MULTICLASS)
        assert fit.kept == () and fit.images == 400 and fit.stored == fit.temperature
        assert fit.temperature[0] == pytest.approx(scipy_temperature(z, y), rel=1e-4)
        nll = lambda t: negative_log_likelihood(y, softmax(z / t))  # noqa: E731
        best, ratio = grid_temperature(nll)
        assert best / ratio <= fit.temperature[0] <= best * ratio
        assert nll(fit.temperature[0]) <= min(nll(fit.temperature[0] * 1.01), nll(fit.temperature[0] / 1.01))


def test_multilabel_has_one_temperature_per_class_each_its_own_minimiser() -> None:
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(1)
    y = rng.random((300, 4)) < 0.35
    z = (rng.normal(0, 1, (300, 4)) + np.where(y, 1.0, -1.0)) * np.array([0.4, 1.0, 2.5, 6.0])  # each class its own scale
    fit = fit_temperature(z, y.astype(np.float32), MULTILABEL)
    assert len(fit.temperature) == 4 and fit.kept == ()
    for c in range(4):
        nll = lambda t: binary_nll(z[:, c], y[:, c], t)  # noqa: E731
        reference = minimize_scalar(nll, bounds=TEMPERATURE_RANGE, method="bounded", options={"xatol": 1e-9}).x
        assert fit.temperature[c] == pytest.approx(reference, rel=1e-4), c
        best, ratio = grid_temperature(nll)
        assert best / ratio <= fit.temperature[c] <= best * ratio, c
    assert list(fit.temperature) == sorted(fit.temperature)  # the classes' logit scales, in order


def test_a_split_without_an_nll_minimum_keeps_temperature_1() -> None:
    right = np.array([[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [4, 1, 0]])
    fit = fit_temperature(right, [0, 1, 2, 0])  # all right: the NLL falls for ever as T shrinks
    assert fit.temperature == (1.0,) and fit.kept == (0,) and fit.stored is None
    wrong = right.copy()
    wrong[2] = [0, 1, 0]  # one mistake: a minimum exists
    assert fit_temperature(wrong, [0, 1, 2, 0]).stored is not None
    inverted = -right  # the true class scores lowest: no better than chance, the NLL falls as T grows
    assert fit_temperature(inverted, [0, 1, 2, 0]).stored is None
    # sigmoids, class by class: class 0 decided right everywhere, class 1 not
    z = np.array([[2.0, 1.0], [-1.0, 3.0], [-2.0, -0.5], [1.0, 0.5]])
    y = np.array([[1, 1], [0, 1], [0, 1], [1, 0]])
    fit = fit_temperature(z, y, MULTILABEL)
    assert fit.kept == (0,) and fit.temperature[0] == 1.0 and fit.temperature[1] != 1.0 and fit.stored == fit.temperature


def test_ece_falls_on_an_over_confident_model() -> None:
    """Labels drawn from softmax(z): z is calibrated, so 5 z is over-confident by a temperature of 5."""
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1.5, (6000, 5))
    p = softmax(z)
    y = (p.cumsum(axis=1) > rng.random((6000, 1))).argmax(axis=1)
    fit = fit_temperature(5 * z, y)
    assert fit.temperature[0] == pytest.approx(5.0, rel=0.05)
    before = calibration_scores(y, MULTICLASS.probabilities(5 * z), MULTICLASS)
    after = calibration_scores(y, MULTICLASS.probabilities(5 * z, fit.stored), MULTICLASS)
    assert before["ece"] > 0.2 and after["ece"] < 0.02
    assert after["nll"] < before["nll"] and after["brier"] < before["brier"]
    assert after["ece"] < calibration_scores(y, p, MULTICLASS)["ece"] + 0.01  # as good as the calibrated z


# ------------------------------------------------------------------------------- the measures
def test_ece_nll_and_brier_by_hand_and_against_scikit_learn() -> None:
    from sklearn.metrics import brier_score_loss, log_loss

    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.34, 0.33, 0.33]])
    y = np.array([0, 1, 1, 2])
    # top-1 confidences 0.9 (right), 0.6 (wrong), 0.7 (right), 0.34 (wrong): bins of width 1/15,
    # (0.8667, 0.9333] {0.9}, (0.5333, 0.6] {0.6}, (0.6667, 0.7333] {0.7}, (0.3333, 0.4] {0.34}
    ece = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.7) + abs(0 - 0.34)) / 4
    assert calibration_bins(y, probs)["ece"] == pytest.approx(ece)
    assert reliability(y, probs, MULTICLASS)["ece"] == pytest.approx(ece)
    nll = -(np.log(0.9) + np.log(0.3) + np.log(0.7) + np.log(0.33)) / 4
    assert negative_log_likelihood(y, probs) == pytest.approx(nll)
    assert negative_log_likelihood(y, probs) == pytest.approx(log_loss(y, probs, labels=[0, 1, 2]))
    brier = np.mean([(0.1 ** 2 + 0.1 ** 2), (0.6 ** 2 + 0.7 ** 2 + 0.1 ** 2), (0.2 ** 2 + 0.3 ** 2 + 0.1 ** 2),
                     (0.34 ** 2 + 0.33 ** 2 + 0.67 ** 2)])
    assert brier_score(y, probs) == pytest.approx(brier)
    assert brier_score(y, probs) == pytest.approx(brier_score_loss(y, probs, labels=[0, 1, 2]))
    # multi-label: each (image, label) a yes/no prediction
    p = np.array([[0.9, 0.2], [0.4, 0.8]])
    t = np.array([[1, 0], [1, 1]])
    assert negative_log_likelihood(t, p, MULTILABEL) == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.8])))
    assert negative_log_likelihood(t, p, MULTILABEL) == pytest.approx(np.mean([log_loss(t[:, c], p[:, c], labels=[0, 1])
                                                                               for c in range(2)]))
    assert brier_score(t, p, MULTILABEL) == pytest.approx(np.mean([brier_score_loss(t[:, c], p[:, c]) for c in range(2)]))
    # confidences 0.9 (right), 0.8 (right: no), 0.6 (wrong: 0.4 said no), 0.8 (right)
    assert reliability(t, p, MULTILABEL)["ece"] == pytest.approx((abs(1 - 0.9) + 2 * abs(1 - 0.8) + abs(0 - 0.6)) / 4)


@pytest.mark.parametrize("task", [MULTICLASS, MULTILABEL])
def test_at_temperature_gives_the_same_logits_probabilities_at_another_temperature(task: Any) -> None:
    z = np.random.default_rng(3).normal(0, 3, (50, 4))
    t = (1.7,) if task is MULTICLASS else (0.5, 1.0, 2.0, 4.0)
    calibrated = task.probabilities(z, t)
    assert np.allclose(at_temperature(calibrated, task, t), task.probabilities(z), atol=2e-6)
    assert np.allclose(at_temperature(task.probabilities(z), task, None, t), calibrated, atol=2e-6)


# ----------------------------------------------------------------------------- a real run
def torch_val_logits(run: Path, folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """best.pt's logits on a split's images (numpy preprocessing, the PyTorch backend), their targets and paths."""
    from utils.data.decode import load_image
    from utils.data.sources import scan_split
    from utils.infer.backends import load_backend, preprocess_images

    backend = load_backend(run / "best.pt", "torch", "cpu")
    samples = scan_split(folder, class_names=backend.meta.class_names, what="split").samples
    images = preprocess_images(backend.meta, [load_image(p, backend.meta.image_channel) for p, _ in samples])
    return np.asarray(backend(images), dtype=np.float64), np.array([t for _, t in samples]), [p for p, _ in samples]


def noisy_dataset(root: Path) -> Path:
    """Tiny colour classes whose val split has two images filed under another class (the NLL then has a minimum)."""
    data = make_split_dataset(root, TINY_CLASSES, train=8, val=4, test=3)
    shutil.copy(data / "val" / "red" / "img0.png", data / "val" / "blue" / "red0.png")
    shutil.copy(data / "val" / "blue" / "img0.png", data / "val" / "green" / "blue0.png")
    return data


@pytest.fixture(scope="session")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One main.py run (resnet10t, 1 epoch) on noisy_dataset, then metrice.py --task val on it."""
    root = tmp_path_factory.mktemp("calibration")
    data = noisy_dataset(root / "data")
    run = root / "runs" / "exp"
    train = run_script("main.py", *train_args(data, run))
    assert_ok(train)
    metrice = run_script("metrice.py", "--save_path", run, "--task", "val", "--device", "cpu", "--workers", "0")
    assert_ok(metrice)
    return {"root": root, "data": data, "run": run, "train": train, "metrice": metrice}


def test_main_stores_the_val_nll_minimiser_and_metrice_reports_with_it(calibrated_run: dict) -> None:
    run, data = calibrated_run["run"], calibrated_run["data"]
    stored = load_ckpt(run / "best.pt")["temperature"]
    logits, targets, _ = torch_val_logits(run, data / "val")
    assert len(stored) == 1 and stored[0] == pytest.approx(scipy_temperature(logits, targets), rel=1e-3)
    assert abs(np.log(stored[0])) > 0.1  # a temperature that changes something
    assert "calibration on the val split (14 images): temperature" in calibrated_run["train"].stdout
    assert "(stored in best.pt)" in calibrated_run["train"].stdout
    results = json.loads((run / "val" / "results.json").read_text())
    section = results["calibration"]
    assert section["temperature"] == pytest.approx(stored[0]) and section["calibrated"] is True
    expected = {"before": calibration_scores(targets, softmax(logits), MULTICLASS),
                "after": calibration_scores(targets, softmax(logits / stored[0]), MULTICLASS)}
    for when, scores in expected.items():
        for key, value in scores.items():
            assert section[f"{key}_{when}"] == pytest.approx(value, abs=1e-5), (key, when)
    assert section["ece_after"] != pytest.approx(section["ece_before"], abs=1e-3)
    assert results["metrics"][str(run)]["ece"] == pytest.approx(section["ece_after"])  # the overall table's ECE: calibrated
    assert results["metrics"][str(run)]["acc"] == pytest.approx(np.mean(logits.argmax(axis=1) == targets))
    assert [r["class"] for r in results["per_class"]] == TINY_CLASSES
    assert "before (temperature 1)" in calibrated_run["metrice"].stdout
    assert (run / "val" / "calibration.png").stat().st_size > 0


def test_metrice_calibrate_rewrites_the_temperature_and_only_it(calibrated_run: dict, tmp_path: Path) -> None:
    from utils.core.checkpoint import load_checkpoint
    from utils.core.run import Run

    run = tmp_path / "exp"
    shutil.copytree(calibrated_run["run"], run, ignore=shutil.ignore_patterns("export", "predict", "val*", "calibrate*"))
    ckpt = load_checkpoint(run / "best.pt")
    fitted = ckpt.meta.temperature
    import dataclasses

    ckpt.meta = dataclasses.replace(ckpt.meta, temperature=(7.0,))  # a stale temperature to replace
    Run(run).save("best.pt", ckpt)
    before = load_ckpt(run / "best.pt")
    (run / "export").mkdir()
    (run / "export" / "best.onnx").write_bytes(b"made before")  # export.py's file of the old best.pt
    proc = run_inprocess("metrice.py", "--save_path", run, "--task", "calibrate", "--device", "cpu", "--workers", "0")
    assert proc.returncode == 0, describe(proc)
    after = load_ckpt(run / "best.pt")
    assert after["temperature"] == pytest.approx(list(fitted), rel=1e-6)  # the same val split: main.py's fit
    assert before["model"].keys() == after["model"].keys()
    for key, tensor in before["model"].items():
        assert tensor.dtype == after["model"][key].dtype and tensor.numpy().tobytes() == after["model"][key].numpy().tobytes()
    refit = ("model", "temperature", "ood", "ood_stats")  # the rejection is refit after the temperature (test_ood)
    assert {k: v for k, v in before.items() if k not in refit} == {k: v for k, v in after.items() if k not in refit}
    assert "the stored temperature was 7.0000" in proc.stdout
    assert f"{run / 'export' / 'best.onnx'}" in proc.stderr and "export them again" in proc.stderr
    section = json.loads((run / "calibrate" / "results.json").read_text())["calibration"]
    assert section["previous_temperature"] == 7.0 and section["temperature"] == pytest.approx(fitted[0])
    assert section["ece_after"] < section["ece_previous"]
    assert not list(run.glob("*.tmp*"))


def test_calibrate_refuses_exported_files_and_several_runs(calibrated_run: dict, tmp_path: Path) -> None:
    run = calibrated_run["run"]
    fake = tmp_path / "best.onnx"
    fake.write_bytes(b"onnx")
    assert_user_error(run_inprocess("metrice.py", "--weight", fake, "--task", "calibrate"),
                      "--task calibrate rewrites the temperature stored in a PyTorch checkpoint", "onnx", "export it again")
    assert_user_error(run_inprocess("metrice.py", "--save_path", run, run, "--task", "calibrate"), "one run at a time")
    no_val = tmp_path / "no_val"
    shutil.copytree(run, no_val, ignore=shutil.ignore_patterns("export", "predict", "val*", "calibrate*"))
    proc = run_inprocess("metrice.py", "--save_path", no_val, "--task", "calibrate", "--val_path", tmp_path / "missing")
    assert_user_error(proc, "does not exist", "--val_path")


def test_a_version_2_checkpoint_loads_uncalibrated(calibrated_run: dict, tmp_path: Path) -> None:
    """The dict a version 2 toolkit wrote (no temperature): probabilities at temperature 1, and metrice says so."""
    from utils.core.checkpoint import load_checkpoint

    run = tmp_path / "v2"
    shutil.copytree(calibrated_run["run"], run, ignore=shutil.ignore_patterns("export", "predict", "val*", "calibrate*"))
    old = load_ckpt(run / "best.pt")
    old["version"] = 2
    del old["temperature"]
    torch.save(old, run / "best.pt")
    assert load_checkpoint(run / "best.pt").meta.temperature is None
    proc = run_inprocess("metrice.py", "--save_path", run, "--task", "val", "--device", "cpu", "--workers", "0")
    assert proc.returncode == 0, describe(proc)
    assert "uncalibrated (temperature 1): main.py fits one at the end of training; metrice.py --task calibrate fits " \
           "one for this run" in proc.stdout
    section = json.loads((run / "val" / "results.json").read_text())["calibration"]
    assert section["temperature"] == 1.0 and section["calibrated"] is False
    for key in ("ece", "nll", "brier"):
        assert section[f"{key}_before"] == section[f"{key}_after"]
    logits, targets, _ = torch_val_logits(run, calibrated_run["data"] / "val")
    assert section["nll_after"] == pytest.approx(calibration_scores(targets, softmax(logits), MULTICLASS)["nll"], abs=1e-5)


def test_onnx_export_and_predict_give_the_calibrated_probabilities(calibrated_run: dict) -> None:
    """softmax(logits / T) from best.pt, from the ONNX file, and in predict.py's CSV of either; not softmax(logits)."""
    from utils.data.decode import load_image
    from utils.infer.backends import load_backend, predict_probs, preprocess_images

    run, data = calibrated_run["run"], calibrated_run["data"]
    assert_ok(run_script("export.py", "--save_path", run, "--export", "onnx", "--device", "cpu"))
    temperature = load_ckpt(run / "best.pt")["temperature"]
    assert json.loads((run / "export" / "best.onnx.json").read_text())["temperature"] == temperature
    logits, _, paths = torch_val_logits(run, data / "val")
    calibrated, raw = softmax(logits / temperature[0]), softmax(logits)
    assert np.abs(calibrated - raw).max() > 0.05
    onnx = load_backend(run / "export" / "best.onnx", "onnx", "cpu")
    images = preprocess_images(onnx.meta, [load_image(p, 3) for p in paths])
    assert np.allclose(predict_probs(onnx, images), calibrated, atol=1e-5)
    procs = run_many([{"script": "predict.py", "args": ["--save_path", run, "--source", data / "val", "--device", "cpu",
                                                        "--workers", "0", "--model_type", kind]} for kind in ("torch", "onnx")])
    for proc, kind in zip(procs, ("torch", "onnx")):
        assert_ok(proc)
        folder = Path(next(ln for ln in proc.stdout.splitlines() if ln.startswith("predict folder: ")).split(": ", 1)[1])
        rows = {r["path"]: r for r in csv.DictReader((folder / "predictions.csv").open())}
        got = np.array([[float(rows[p][f"top{j}_prob"]) for j in (1, 2, 3)] for p in paths])
        assert np.allclose(got, -np.sort(-calibrated, axis=1), atol=2e-6), kind


def test_two_processes_fit_the_temperature_on_the_whole_val_split(calibrated_run: dict, tmp_path: Path) -> None:
    """Under torchrun each process predicts its share of the val split; the temperature is fitted on
    all of it (the same as one process finds on every val image) and written once."""
    data, run = calibrated_run["data"], tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "main.py"),
           *train_args(data, run, "--batch_size", "4")]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ) | SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, describe(proc)
    stored = load_ckpt(run / "best.pt")["temperature"]
    logits, targets, _ = torch_val_logits(run, data / "val")
    assert stored[0] == pytest.approx(scipy_temperature(logits, targets), rel=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]


def test_multilabel_run_stores_one_temperature_per_class(multilabel_run: dict) -> None:
    """main.py's per-class temperatures are each class's binary-NLL minimiser on the val logits (1 where
    a class has none), and metrice.py reports the sigmoids before and after with them."""
    from scipy.optimize import minimize_scalar

    from utils.data.decode import load_image
    from utils.infer.backends import load_backend, preprocess_images

    assert_ok(multilabel_run["proc"])
    run, root = multilabel_run["run"], multilabel_run["root"]
    backend = load_backend(run / "best.pt", "torch", "cpu")
    names = list(backend.meta.class_names)

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        rows = list(csv.DictReader((root / f"{name}.csv").open()))
        images = preprocess_images(backend.meta, [load_image(root / r["path"], 3) for r in rows])
        y = np.array([[n in r["labels"].split("|") for n in names] for r in rows])
        return np.asarray(backend(images), dtype=np.float64), y

    z, y = split("val")
    stored = load_ckpt(run / "best.pt").get("temperature")
    assert stored is not None and len(stored) == len(names)
    for c in range(len(names)):
        signed = np.where(y[:, c], z[:, c], -z[:, c])
        if (signed >= 0).all():  # every val image decided right: no minimum, kept at 1
            assert stored[c] == 1.0, names[c]
            continue
        nll = lambda t: binary_nll(z[:, c], y[:, c], t)  # noqa: E731
        reference = minimize_scalar(nll, bounds=TEMPERATURE_RANGE, method="bounded", options={"xatol": 1e-9}).x
        assert stored[c] == pytest.approx(reference, rel=1e-3), names[c]
    proc = run_inprocess("metrice.py", "--save_path", run, "--task", "test", "--device", "cpu", "--workers", "0")
    assert proc.returncode == 0, describe(proc)
    out = Path(next(ln for ln in proc.stdout.splitlines() if ln.startswith("results: ")).split(": ", 1)[1])  # test, test2 ...
    section = json.loads((out / "results.json").read_text())["calibration"]
    assert section["temperature"] == pytest.approx(stored) and section["calibrated"] is True
    zt, yt = split("test")
    for when, t in (("before", None), ("after", stored)):
        expected = calibration_scores(yt, MULTILABEL.probabilities(zt, t), MULTILABEL)
        for key, value in expected.items():
            assert section[f"{key}_{when}"] == pytest.approx(value, abs=1e-5), (key, when)
