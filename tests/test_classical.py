"""metrice.py --task features and predict.py --classical, checked by value.

One tiny run (resnet10t, 1 epoch at 32 px) on coloured classes; its test split is ambiguous on
purpose (two palette colours mixed in random stripes), so the network and the classifiers
disagree and a metric of the wrong predictions would show. The expected values are computed
here independently: the features by utils.models.features.penultimate_features on the model rebuilt
from best.pt, the metrics by scikit-learn.
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (PALETTE, TINY_CLASSES, assert_ok, assert_user_error, make_split_dataset, run_inprocess, run_script,
                      train_args)
from utils.core.log import UserError
from utils.core.names import CLASSICAL

COMMON = ("--device", "cpu", "--workers", "0")


def write_mixed_test(root: Path, per_class: int = 4, seed: int = 5) -> None:
    """root/test/<class>/mix<k>.png: two random palette colours in random stripes, plus noise."""
    rng = np.random.default_rng(seed)
    for name in TINY_CLASSES:
        (root / "test" / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            a, b = rng.choice(len(TINY_CLASSES), 2, replace=False)
            img = np.tile(np.array(PALETTE[a], dtype=np.float64), (24, 24, 1))
            img[:, rng.random(24) < rng.random()] = PALETTE[b]
            img += rng.normal(0, 30, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "test" / name / f"mix{k}.png")


@pytest.fixture(scope="module")
def features_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trained run and its `metrice.py --task features` with every classifier."""
    root = tmp_path_factory.mktemp("classical")
    data = make_split_dataset(root / "data", TINY_CLASSES, train=8, val=3, test=0)
    write_mixed_test(data)
    run = root / "run"
    assert_ok(run_script("main.py", *train_args(data, run)))
    proc = run_inprocess("metrice.py", "--save_path", run, "--task", "features", "--classical", ",".join(CLASSICAL), *COMMON)
    assert_ok(proc)
    return {"data": data, "run": run, "folder": run / "features", "proc": proc}


def reference_model(run: Path) -> tuple[torch.nn.Module, Any]:
    from utils.core.checkpoint import load_checkpoint
    from utils.models.weights import model_from_checkpoint

    ckpt = load_checkpoint(run / "best.pt")
    return model_from_checkpoint(ckpt).eval(), ckpt.meta.preprocess


def reference_features(run: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, probabilities) of best.pt for these images, without metrice's code paths."""
    from utils.data.decode import load_image
    from utils.data.transforms import Normalize, eval_transform
    from utils.models.features import penultimate_features

    model, spec = reference_model(run)
    x = Normalize(spec.mean, spec.std)(torch.stack([eval_transform(spec)(load_image(p, spec.channels)) for p in paths]))
    with torch.no_grad():
        return penultimate_features(model, x).numpy(), model(x).softmax(1).numpy()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------ features
def test_npz_holds_the_penultimate_features_of_every_split(features_run: dict[str, Any]) -> None:
    from utils.evaluate.classical import FeatureSet

    data, folder = features_run["data"], features_run["folder"]
    for split, per_class in (("train", 8), ("val", 3), ("test", 4)):
        fs = FeatureSet.load(folder / f"{split}.npz")  # allow_pickle=False
        assert fs.class_names == TINY_CLASSES and len(fs.paths) == per_class * len(TINY_CLASSES)
        assert [TINY_CLASSES[t] for t in fs.targets] == [Path(p).parent.name for p in fs.paths]
        assert all(Path(p).is_relative_to(data / split) for p in fs.paths)
        expected, _ = reference_features(features_run["run"], fs.paths)
        assert fs.features.shape == expected.shape == (len(fs.paths), 512)
        np.testing.assert_allclose(fs.features, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- classifiers
def test_saved_classifiers_are_the_fitted_ones_and_load_safely(features_run: dict[str, Any]) -> None:
    import skops.io as sio

    from utils.evaluate.classical import TRUSTED_TYPES, FeatureSet, class_probs, fit_classifier, load_classifier

    folder = features_run["folder"]
    train, test = FeatureSet.load(folder / "train.npz"), FeatureSet.load(folder / "test.npz")
    index = json.loads((folder / "classical.json").read_text())
    assert list(index["classifiers"]) == list(CLASSICAL)
    for name in CLASSICAL:
        entry = index["classifiers"][name]
        assert set(sio.get_untrusted_types(file=folder / entry["file"])) == set(entry["trusted_types"]) <= set(TRUSTED_TYPES)
        loaded, _ = load_classifier(folder, name)
        fitted = fit_classifier(name, train.features, train.targets)  # fixed seeds: the same model again
        assert fitted.params == entry["params"], name
        saved = class_probs(loaded, test.features, len(TINY_CLASSES))
        np.testing.assert_array_equal(saved, class_probs(fitted.pipeline, test.features, len(TINY_CLASSES)), err_msg=name)
        assert saved.shape == (len(test.targets), 3) and np.allclose(saved.sum(1), 1.0)


def test_reported_metrics_are_sklearn_metrics_of_the_saved_classifiers(features_run: dict[str, Any]) -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from utils.evaluate.classical import FeatureSet, class_probs, load_classifier

    folder = features_run["folder"]
    test = FeatureSet.load(folder / "test.npz")
    rows = {r["model"]: r for r in read_csv(folder / "metrics.csv")}
    assert list(rows) == ["network", *CLASSICAL]
    _, network_probs = reference_features(features_run["run"], test.paths)
    preds = {"network": network_probs.argmax(1)}
    for name in CLASSICAL:
        preds[name] = class_probs(load_classifier(folder, name)[0], test.features, 3).argmax(1)
    assert len({tuple(p) for p in preds.values()}) > 1, "the models must disagree for the check to mean anything"
    by_path = {r["path"]: r for r in read_csv(folder / "test_predictions.csv")}
    for model, pred in preds.items():
        row = rows[model]
        assert float(row["acc"]) == pytest.approx(accuracy_score(test.targets, pred)), model
        assert float(row["mean_acc"]) == pytest.approx(balanced_accuracy_score(test.targets, pred)), model
        assert float(row["f1"]) == pytest.approx(f1_score(test.targets, pred, average="macro", zero_division=0)), model
        assert [by_path[p][f"{model}_class"] for p in test.paths] == [TINY_CLASSES[c] for c in pred]
    stdout = features_run["proc"].stdout
    assert "test metrics" in stdout and all(f"| {name}: " in stdout for name in CLASSICAL)


# ------------------------------------------------------------------------------ predict.py
def test_predict_classical_uses_the_saved_classifier(features_run: dict[str, Any]) -> None:
    from utils.evaluate.classical import FeatureSet, class_probs, load_classifier

    folder, run = features_run["folder"], features_run["run"]
    proc = run_inprocess("predict.py", "--source", features_run["data"] / "test", "--save_path", run, "--classical", "svm", *COMMON)
    assert_ok(proc)
    out = Path(next(ln for ln in proc.stdout.splitlines() if ln.startswith("predict folder: ")).split(": ", 1)[1])
    try:
        rows = {r["path"]: r for r in read_csv(out / "predictions.csv")}
    finally:
        shutil.rmtree(out.parent)
    test = FeatureSet.load(folder / "test.npz")
    probs = class_probs(load_classifier(folder, "svm")[0], test.features, 3)
    network = reference_features(run, test.paths)[1].argmax(1)
    assert sorted(rows) == sorted(test.paths)
    assert [rows[p]["class"] for p in test.paths] == [TINY_CLASSES[c] for c in probs.argmax(1)]
    assert [float(rows[p]["prob"]) for p in test.paths] == pytest.approx(probs.max(1).tolist(), abs=1e-5)
    assert (probs.argmax(1) != network).any(), "svm and the network must differ somewhere for the check to mean anything"
    assert "--classical svm: SVM (RBF) on the penultimate features" in proc.stdout


def test_classical_refusals(features_run: dict[str, Any], tmp_path: Path) -> None:
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    run, data = features_run["run"], features_run["data"]
    predict = ("predict.py", "--source", data / "test", *COMMON)
    assert_user_error(run_inprocess("metrice.py", "--save_path", run, "--task", "features", "--classical", "svm,tree"),
                      "unknown tree", "svm,rf,knn,logreg,mlp")
    assert_user_error(run_inprocess("metrice.py", "--save_path", run, "--classical", "svm"), "goes with --task features")
    assert_user_error(run_inprocess("metrice.py", "--save_path", run, run, "--task", "features"), "one --save_path")
    assert_user_error(run_inprocess(*predict, "--save_path", run, "--classical", "svm", "--model_type", "onnx"),
                      "--classical", "--model_type torch")
    assert_user_error(run_inprocess(*predict, "--save_path", run, "--feature_maps", "-1"), "--feature_maps")

    copy = tmp_path / "run"  # the same run with other weights, and then without its features
    copy.mkdir()
    shutil.copytree(run / "features", copy / "features")
    ckpt = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    ckpt["model"] = {k: (v + 1 if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    torch.save(ckpt, copy / "best.pt")
    assert_user_error(run_inprocess(*predict, "--save_path", copy, "--classical", "knn"), "were fit on the features of")
    (copy / "features" / "knn.skops").write_bytes(b"changed")
    assert_user_error(run_inprocess(*predict, "--save_path", copy, "--classical", "knn"), "knn.skops", "differs")
    # a file that names a function outside TRUSTED_TYPES (here builtins.print) is refused, whatever the index says
    from utils.evaluate.classical import load_classifier

    blob = sio.dumps(Pipeline([("f", FunctionTransformer(print)), ("clf", LogisticRegression())]))
    assert sio.get_untrusted_types(data=blob) == ["builtins.print"]
    (copy / "features" / "logreg.skops").write_bytes(blob)
    index = json.loads((copy / "features" / "classical.json").read_text())
    index["classifiers"]["logreg"]["sha256"] = hashlib.sha256(blob).hexdigest()
    (copy / "features" / "classical.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="does not trust"):
        load_classifier(copy / "features", "logreg")
    shutil.rmtree(copy / "features")
    assert_user_error(run_inprocess(*predict, "--save_path", copy, "--classical", "svm"), "no fitted classifiers",
                      "--task features")
