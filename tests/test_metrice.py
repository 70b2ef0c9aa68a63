"""metrice.py end to end: metrics equal scikit-learn's, every report file, --visual, --tsne,
ensembles, --task fps, and the user errors. The library's metric, plot and feature helpers in process.

Two tiny runs are trained once (resnet10t from timm and shufflenet_v2_x0_5 from torchvision, one
epoch at 32 px on 4 colour classes) and evaluated in subprocesses, the way a user runs metrice.py.
The expected numbers are computed here independently: the model is rebuilt from best.pt and run
on the images with its stored preprocessing, and scikit-learn does the arithmetic.
"""
from __future__ import annotations

import csv
import functools
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CLASSES = ["red", "green", "blue", "yellow"]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20)]
SPLITS = {"train": 6, "val": 4, "test": 6}
REPORT_FILES = ["args.yaml", "metrics.csv", "per_class.csv", "confusion_matrix.csv", "confusion_matrix_normalized.csv",
                "confused_pairs.csv", "confusion_matrix.png", "confusion_matrix_normalized.png", "calibration.png",
                "pycm_report.html"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
       "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}


from conftest import assert_ok as check_ok  # noqa: E402
from conftest import assert_user_error as check_user_error
from conftest import run_inprocess


# ---------------------------------------------------------------------------------- helpers
def run(script: str, *args: Any, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python <script> args` from the repository root, one compute thread, offline."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=dict(os.environ) | ENV,
                          capture_output=True, text=True, timeout=timeout)


def run_parallel(calls: list[tuple[Any, ...]]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda call: run(*call), calls))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_images(root: Path, classes: list[str], per_class: int, seed: int) -> None:
    """root/<class>/img<k>.png: 32x32, the class colour with stripes and noise."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            img = np.tile(np.array(COLOURS[c % len(COLOURS)], dtype=np.float64), (32, 32, 1))
            img[:, :: 3 + c] *= 0.6
            img += rng.normal(0, 25, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"img{k}.png")


@functools.lru_cache(maxsize=None)
def independent_probs(run_dir: Path, folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(paths, targets, probabilities) of best.pt on a split, without metrice's code paths: the
    model rebuilt from the checkpoint, each image through the stored preprocessing, softmax here (of
    the logits divided by the stored calibration temperature, as every predictor does)."""
    from utils.core.checkpoint import load_checkpoint
    from utils.data.decode import load_image
    from utils.data.transforms import eval_transform
    from utils.models.weights import model_from_checkpoint

    ckpt = load_checkpoint(run_dir / "best.pt")
    model = model_from_checkpoint(ckpt)
    spec = ckpt.meta.preprocess
    transform = eval_transform(spec)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    paths, targets, images = [], [], []
    for c, name in enumerate(ckpt.meta.class_names):
        for path in sorted((folder / name).glob("*.png")):
            paths.append(str(path))
            targets.append(c)
            images.append(transform(load_image(path, spec.channels)))
    x = (torch.stack(images).float() / 255.0 - mean) / std
    with torch.no_grad():
        probs = (model(x) / torch.tensor(ckpt.meta.temperature or [1.0])).softmax(dim=1).numpy()
    return paths, np.array(targets), probs


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def metric_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("metric_data")
    for k, (split, n) in enumerate(SPLITS.items()):
        write_images(root / split, CLASSES, n, seed=10 + k)
    return root


@pytest.fixture(scope="session")
def metric_runs(metric_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two one-epoch runs trained at the same time: 'timm' (resnet10t) and 'tv' (shufflenet_v2_x0_5)."""
    runs = tmp_path_factory.mktemp("metric_runs")
    common = ["--image_size", 32, "--epoch", 1, "--workers", 0, "--batch_size", 8, "--device", "cpu",
              "--train_path", metric_data / "train", "--val_path", metric_data / "val", "--test_path", metric_data / "test",
              "--label_path", metric_data / "label.txt"]
    out = {"timm": runs / "timm", "tv": runs / "tv"}
    procs = run_parallel([("main.py", "--model_name", "resnet10t", "--save_path", out["timm"], *common),
                          ("main.py", "--model_name", "shufflenet_v2_x0_5", "--save_path", out["tv"], *common)])
    for proc in procs:
        check_ok(proc)
    return out


@pytest.fixture(scope="session")
def evaluations(metric_runs: dict[str, Path], metric_data: Path) -> dict[str, Any]:
    """Every metrice.py call of the module, grouped so that two or three run at a time.

    The full evaluation of the timm run comes first (runs/timm/test); the ensemble, started
    after it with the same first run, must write runs/timm/test2.
    """
    timm_run, tv_run = metric_runs["timm"], metric_runs["tv"]
    single, fps = run_parallel([
        ("metrice.py", "--save_path", timm_run, "--task", "test", "--visual", "--tsne", "--workers", 0, "--device", "cpu"),
        ("metrice.py", "--save_path", tv_run, "--task", "fps", "--batch_size", 2, "--device", "cpu"),
    ])
    check_ok(single)
    ensemble = run("metrice.py", "--save_path", timm_run, tv_run, "--ensemble", "weighted", "--task", "test",
                   "--workers", 0, "--device", "cpu")
    return {"single": single, "fps": fps, "ensemble": ensemble}


# ------------------------------------------------------------------------ single-run report
def test_metrics_equal_sklearn_on_independent_probabilities(evaluations: dict, metric_runs: dict, metric_data: Path) -> None:
    from sklearn.metrics import (balanced_accuracy_score, cohen_kappa_score, confusion_matrix,
                                 precision_recall_fscore_support, roc_auc_score)

    out = metric_runs["timm"] / "test"
    paths, targets, probs = independent_probs(metric_runs["timm"], metric_data / "test")
    preds = probs.argmax(axis=1)
    labels = list(range(len(CLASSES)))
    names = torch.load(metric_runs["timm"] / "best.pt", weights_only=True)["class_names"]

    overall = {row["metric"]: float(row["value"]) for row in read_csv(out / "metrics.csv")}
    assert overall["images"] == len(targets) == len(CLASSES) * SPLITS["test"]
    assert overall["acc"] == pytest.approx(float(np.mean(preds == targets)), abs=1e-9)
    assert overall["mean_acc"] == pytest.approx(balanced_accuracy_score(targets, preds), abs=1e-9)
    assert overall["kappa"] == pytest.approx(cohen_kappa_score(targets, preds), abs=1e-6, nan_ok=True)
    p, r, f, _ = precision_recall_fscore_support(targets, preds, labels=labels, average="macro", zero_division=0)
    assert (overall["precision"], overall["recall"], overall["f1"]) == pytest.approx((p, r, f), abs=1e-6)
    assert "top5_acc" not in overall  # 4 classes

    per_class = read_csv(out / "per_class.csv")
    assert [row["class"] for row in per_class] == names
    p, r, f, support = precision_recall_fscore_support(targets, preds, labels=labels, zero_division=0)
    f_half = precision_recall_fscore_support(targets, preds, labels=labels, beta=0.5, zero_division=0)[2]
    f_two = precision_recall_fscore_support(targets, preds, labels=labels, beta=2.0, zero_division=0)[2]
    for c, row in enumerate(per_class):
        assert float(row["precision"]) == pytest.approx(p[c], abs=1e-6)
        assert float(row["recall"]) == pytest.approx(r[c], abs=1e-6)
        assert float(row["f1"]) == pytest.approx(f[c], abs=1e-6)
        assert float(row["f0.5"]) == pytest.approx(f_half[c], abs=1e-6)
        assert float(row["f2"]) == pytest.approx(f_two[c], abs=1e-6)
        assert float(row["accuracy"]) == pytest.approx(np.mean((preds == c) == (targets == c)), abs=1e-6)
        assert int(row["support"]) == support[c]
        # AUC from the probabilities, not from hard labels
        assert float(row["auc"]) == pytest.approx(roc_auc_score(targets == c, probs[:, c]), abs=1e-4)
    assert overall["auc"] == pytest.approx(np.mean([float(row["auc"]) for row in per_class]), abs=1e-9)

    with (out / "confusion_matrix.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1:] == names and [row[0] for row in rows[1:]] == names
    matrix = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert (matrix == confusion_matrix(targets, preds, labels=labels)).all()

    # the probabilities metrice.py wrote (--visual) are the ones computed here
    written = {row["path"]: row for row in read_csv(out / "correct.csv") + read_csv(out / "incorrect.csv")}
    for path, target, row_probs in zip(paths, targets, probs):
        row = written[path]
        assert row["true_class"] == names[target] and row["predicted_class"] == names[row_probs.argmax()]
        assert float(row["probability"]) == pytest.approx(row_probs.max(), abs=1e-4)


def test_every_report_file_exists_and_parses(evaluations: dict, metric_runs: dict) -> None:
    out = metric_runs["timm"] / "test"
    for name in REPORT_FILES + ["correct.csv", "incorrect.csv", "tsne.csv", "tsne.png"]:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"{name} missing in {out}"
        if name.endswith(".csv"):
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
            assert rows and all(len(row) == len(rows[0]) for row in rows), name
        elif name.endswith(".png"):
            with Image.open(path) as img:
                img.verify()
    html = (out / "pycm_report.html").read_text(encoding="utf-8")
    assert "<html" in html.lower() and all(c in html for c in CLASSES)
    if not (out / "incorrect.csv").read_text(encoding="utf-8").strip().count("\n"):
        return  # no mistakes: no gallery
    with Image.open(out / "incorrect.png") as img:
        img.verify()


def test_console_shows_overall_and_per_class_tables(evaluations: dict, metric_runs: dict) -> None:
    out = evaluations["single"].stdout
    for text in ("overall", "accuracy", "Cohen's kappa", "macro F1", "macro AUC", "per class", "f0.5", "aupr", "support"):
        assert text in out, out
    for name in CLASSES:
        assert f"| {name}" in out
    assert f"results: {metric_runs['timm'] / 'test'}" in out


def test_visual_lists_every_image_once_most_confident_first(evaluations: dict, metric_runs: dict) -> None:
    out = metric_runs["timm"] / "test"
    correct, incorrect = read_csv(out / "correct.csv"), read_csv(out / "incorrect.csv")
    assert len(correct) + len(incorrect) == len(CLASSES) * SPLITS["test"]
    assert len({row["path"] for row in correct + incorrect}) == len(correct) + len(incorrect)
    for rows, right in ((correct, True), (incorrect, False)):
        assert all((row["true_class"] == row["predicted_class"]) == right for row in rows)
        confidence = [float(row["probability"]) for row in rows]
        assert confidence == sorted(confidence, reverse=True)
        for row in rows:  # top-k lists: the predicted class first, probabilities falling
            tops = [float(row[f"top{k}_probability"]) for k in range(1, len(CLASSES) + 1)]
            assert row["top1_class"] == row["predicted_class"] and tops == sorted(tops, reverse=True)
            assert sum(tops) == pytest.approx(1.0, abs=1e-4)


def test_tsne_points_one_per_image(evaluations: dict, metric_runs: dict) -> None:
    rows = read_csv(metric_runs["timm"] / "test" / "tsne.csv")
    assert len(rows) == len(CLASSES) * SPLITS["test"]
    assert {row["class"] for row in rows} == set(CLASSES)
    assert all(np.isfinite(float(row["x"])) and np.isfinite(float(row["y"])) for row in rows)


# -------------------------------------------------------------------------------- ensembles
def test_weighted_ensemble_side_by_side_in_a_new_folder(evaluations: dict, metric_runs: dict, metric_data: Path) -> None:
    proc = evaluations["ensemble"]
    check_ok(proc)
    timm_run, tv_run = metric_runs["timm"], metric_runs["tv"]
    out = timm_run / "test2"  # the single-run evaluation in test/ is kept
    assert f"results: {out}" in proc.stdout
    assert (timm_run / "test" / "correct.csv").is_file() and not (out / "correct.csv").exists()
    for name in REPORT_FILES:
        assert (out / name).is_file(), name

    with (out / "metrics.csv").open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header == ["metric", "ensemble (weighted)", str(timm_run), str(tv_run)]
    table = {row["metric"]: row for row in read_csv(out / "metrics.csv")}
    single = {row["metric"]: row["value"] for row in read_csv(timm_run / "test" / "metrics.csv")}
    assert float(table["acc"][str(timm_run)]) == pytest.approx(float(single["acc"]))

    # weights: each run's validation accuracy in best.pt; the ensemble is their weighted mean
    weights = [torch.load(r / "best.pt", weights_only=True)["metrics"]["val"]["acc"] for r in (timm_run, tv_run)]
    _, targets, probs_a = independent_probs(timm_run, metric_data / "test")
    _, _, probs_b = independent_probs(tv_run, metric_data / "test")
    combined = (weights[0] * probs_a + weights[1] * probs_b) / sum(weights)
    assert float(table["acc"]["ensemble (weighted)"]) == pytest.approx(float(np.mean(combined.argmax(1) == targets)))
    assert float(table["acc"][str(tv_run)]) == pytest.approx(float(np.mean(probs_b.argmax(1) == targets)))
    assert "ensemble of 2 models (weighted, weights" in proc.stdout and "| ensemble (weighted)" in proc.stdout


# ------------------------------------------------------------------------------------ speed
def test_fps_reports_positive_images_per_second(evaluations: dict, metric_runs: dict) -> None:
    proc = evaluations["fps"]
    check_ok(proc)
    lines = [ln for ln in proc.stdout.splitlines() if "images/s," in ln]
    assert lines, proc.stdout
    value = float(lines[0].split("batch 2: ", 1)[1].split(" images/s")[0])
    assert value > 0
    rows = read_csv(metric_runs["tv"] / "fps" / "fps.csv")
    assert {row["batch_size"] for row in rows} == {"2"}
    assert {row["memory_format"] for row in rows} == {"contiguous", "channels_last"}
    assert sum(row["fastest"] == "True" for row in rows) == 1
    for row in rows:
        assert float(row["images_per_s"]) > 0 and int(row["iterations"]) >= 3
        # images/second counts images, not batches
        assert float(row["images_per_s"]) == pytest.approx(2 * 1000 / float(row["batch_ms_median"]), rel=1e-6)


# ----------------------------------------------------------------------------------- errors
def test_user_errors_are_one_line(metric_runs: dict, metric_data: Path, tmp_path: Path) -> None:
    timm_run = metric_runs["timm"]
    (tmp_path / "not_a_run").mkdir()
    unknown = tmp_path / "unknown"
    shutil.copytree(metric_data / "test", unknown)
    shutil.copytree(metric_data / "test" / "red", unknown / "purple")
    empty = tmp_path / "empty"
    for name in CLASSES:
        (empty / name).mkdir(parents=True)
    other = tmp_path / "other_classes"  # the same model, its classes in another order
    other.mkdir()
    ckpt = torch.load(timm_run / "best.pt", weights_only=True)
    ckpt["class_names"] = list(reversed(ckpt["class_names"]))
    torch.save(ckpt, other / "best.pt")

    several = tmp_path / "several.csv"
    first = sorted((metric_data / "test" / CLASSES[0]).iterdir())[0]
    several.write_text(f"path,labels\n{first},{CLASSES[0]}|{CLASSES[1]}\n", encoding="utf-8")
    cases = [
        (("--save_path", tmp_path / "not_a_run"), ("no best.pt", "not_a_run")),
        (("--save_path", timm_run, "--test_path", tmp_path / "missing"), ("test folder", "missing", "--test_path")),
        (("--save_path", timm_run, "--test_path", unknown), ("purple", "does not know")),
        (("--save_path", timm_run, "--test_path", empty), ("no readable images", str(empty))),
        (("--save_path", timm_run, other), ("other classes", "other_classes")),
        # a multiclass model on a list with several labels per image: the image, and what to do
        (("--save_path", timm_run, "--test_path", several), ("several.csv", "0.png", "exactly one class, not 2",
                                                             "evaluate it with a model of that task")),
    ]
    procs = [run_inprocess("metrice.py", *args, "--workers", 0) for args, _ in cases]  # start-up errors: in process
    for proc, (_, needles) in zip(procs, cases):
        check_user_error(proc, *needles)
    assert not (empty / "test").exists() and {p.name for p in timm_run.iterdir() if p.is_dir()} <= {"test", "test2"}


def test_half_on_cpu_is_a_user_error(metric_runs: dict, capsys: pytest.CaptureFixture) -> None:
    """In process (the same run_cli path as the command line; a subprocess costs seconds here)."""
    from metrice import main, parse_args
    from utils.core.log import run_cli

    assert run_cli(main, parse_args, ["--save_path", str(metric_runs["timm"]), "--half", "--device", "cpu"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--half" in lines[0] and "CUDA" in lines[0]


def test_bad_options_exit_2_before_loading_anything() -> None:
    for args, needle in ((("--taks", "val"), "--task"), (("--task", "valid"), "invalid choice"),
                         (("--ensemble_weights", "1", "2"), "one per --save_path"),
                         (("--ensemble", "vote", "--ensemble_weights", "1"), "--ensemble weighted"),
                         (("--batch_size", "0"), "positive")):
        from metrice import parse_args
        from utils.core.log import UserError

        with pytest.raises((SystemExit, UserError)) as caught:
            parse_args(list(args))
        if isinstance(caught.value, SystemExit):
            assert caught.value.code == 2
        else:
            assert needle in str(caught.value)


# ------------------------------------------------------------------------- library helpers
def test_overall_metrics_with_many_classes_match_sklearn() -> None:
    from sklearn.metrics import (average_precision_score, balanced_accuracy_score, cohen_kappa_score,
                                 precision_recall_fscore_support, roc_auc_score, top_k_accuracy_score)

    from utils.evaluate.metrics import calibration_bins, most_confused_pairs, overall_metrics, per_class_metrics

    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(7)]
    targets = rng.integers(0, 7, 300)
    logits = rng.normal(0, 1, (300, 7))
    logits[np.arange(300), targets] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    preds = probs.argmax(axis=1)

    per_class = per_class_metrics(targets, probs, classes)
    overall = overall_metrics(targets, probs, classes, per_class=per_class)
    p, r, f, _ = precision_recall_fscore_support(targets, preds, average="macro", zero_division=0)
    assert overall["acc"] == pytest.approx(np.mean(preds == targets))
    assert overall["mean_acc"] == pytest.approx(balanced_accuracy_score(targets, preds))
    assert overall["kappa"] == pytest.approx(cohen_kappa_score(targets, preds), abs=1e-6)
    assert (overall["precision"], overall["recall"], overall["f1"]) == pytest.approx((p, r, f))
    assert overall["top5_acc"] == pytest.approx(top_k_accuracy_score(targets, probs, k=5))
    assert overall["auc"] == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr", average="macro"))
    for c, row in enumerate(per_class):
        assert row["aupr"] == pytest.approx(average_precision_score(targets == c, probs[:, c]))

    # expected calibration error by hand: 15 equal bins of the top-1 confidence
    confidence, correct = probs.max(axis=1), preds == targets
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    assert calibration_bins(targets, probs)["ece"] == pytest.approx(ece)
    assert overall["ece"] == pytest.approx(ece)

    # a class absent from the split: support 0, no AUC, left out of the macro averages
    few = targets != 6
    rows = per_class_metrics(targets[few], probs[few], classes)
    assert rows[6]["support"] == 0 and np.isnan(rows[6]["auc"]) and np.isnan(rows[6]["aupr"])

    matrix = np.array([[5, 3, 0], [1, 4, 7], [0, 0, 9]])
    pairs = most_confused_pairs(matrix, ["a", "b", "c"], k=2)
    assert [(q["true"], q["predicted"], q["count"]) for q in pairs] == [("b", "c", 7), ("a", "b", 3)]
    assert pairs[0]["fraction_of_true"] == pytest.approx(7 / 12)


@pytest.mark.parametrize("name", ["resnet10t", "shufflenet_v2_x0_5"])
def test_penultimate_features_feed_the_classifier(name: str) -> None:
    from utils.models.features import last_linear, penultimate_features
    from utils.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(name, 5).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = penultimate_features(model, x)
    head = last_linear(model)
    assert feats.shape == (2, head.in_features)
    with torch.no_grad():
        assert torch.allclose(head(feats), model(x), atol=1e-4)  # the classifier of these features gives the logits


def test_confusion_matrix_figure_scales_to_100_classes() -> None:
    from utils.draw.figures import plot_confusion_matrix

    small = plot_confusion_matrix(np.eye(4, dtype=int) * 3, list("abcd"))
    big = plot_confusion_matrix(np.random.default_rng(0).integers(0, 5, (100, 100)), [f"class{i}" for i in range(100)], True)
    assert big.get_size_inches()[0] > 4 * small.get_size_inches()[0]
    assert len(small.axes[0].texts) == 4 and len(big.axes[0].texts) == 0  # no unreadable numbers in 10,000 cells
