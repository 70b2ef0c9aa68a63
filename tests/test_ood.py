"""Unknown images (utils.infer.ood): the scores against hand-computed values, the statistics against
scikit-learn's OAS, the thresholds, AUROC and FPR95 with known answers; then main.py's fit (best.pt's
meta.ood and statistics, recomputed independently), predict.py --reject, the ONNX export's flags
against PyTorch's, serve.py's fields, metrice.py --ood_path's results.json against scikit-learn on
the scores it saved, and the refusals.

The runs are conftest's (trained_run: 2 epochs of resnet10t on three colours); one copy of it is
exported to ONNX once for the module (`rejecting`).
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PALETTE, assert_ok, assert_user_error, class_image, describe, load_ckpt, run_inprocess, run_script, train_args
from utils.core.log import UserError
from utils.core.schema import OOD_SCORES, ModelMeta, PreprocessSpec
from utils.infer import ood
from utils.infer.ood import (FeatureSums, OodStats, energy_score, fit_statistics, mahalanobis_score, msp_score,
                             ood_scores, threshold_at)

SPEC = PreprocessSpec(resize=32, crop=32, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


# =============================================================================== the scores
def test_each_score_against_hand_computed_values() -> None:
    logits = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0], [100.0, 0.0, -100.0]])
    e2 = math.exp(2.0)
    assert energy_score(logits) == pytest.approx([-math.log(e2 + 2), -(1 + math.log(3)), -100.0], abs=1e-12)
    meta = ModelMeta("resnet10t", ("a", "b", "c"), SPEC)
    assert msp_score(meta.probabilities(logits)) == pytest.approx([2 / (e2 + 2), 2 / 3, 0.0], abs=1e-6)
    warm = ModelMeta("resnet10t", ("a", "b", "c"), SPEC, temperature=(2.0,))  # msp reads the calibrated probabilities
    e1 = math.exp(1.0)
    assert msp_score(warm.probabilities(logits))[0] == pytest.approx(2 / (e1 + 2), abs=1e-6)
    assert energy_score(logits * 1)[0] == energy_score(logits)[0]  # energy: the raw logits, T = 1, whatever the meta

    stats = OodStats(means=np.array([[0.0, 0.0], [10.0, 0.0]], np.float32), precision=np.diag([1.0, 4.0]).astype(np.float32))
    features = np.array([[3.0, 4.0], [10.0, 1.0], [5.0, 0.0]])
    # (3,4): to (0,0) sqrt(9 + 4*16) = sqrt(73), to (10,0) sqrt(49 + 64); (10,1): to (10,0) sqrt(4*1) = 2; (5,0): 5 to both
    assert mahalanobis_score(features, stats) == pytest.approx([math.sqrt(73), 2.0, 5.0], abs=1e-9)
    got = ood_scores(OOD_SCORES, logits[:3], meta.probabilities(logits[:3]), features, stats)
    assert list(got) == list(OOD_SCORES) and got["mahalanobis"][1] == pytest.approx(2.0)


def test_mahalanobis_equals_the_direct_formula_on_random_features() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 16))
    stats = OodStats(rng.normal(size=(5, 16)).astype(np.float32), (a @ a.T / 16 + np.eye(16)).astype(np.float32))
    features = rng.normal(size=(40, 16)) * 3
    diff = features[:, None, :] - stats.means.astype(np.float64)[None]  # (N, K, D)
    direct = np.sqrt(np.einsum("nkd,de,nke->nk", diff, stats.precision.astype(np.float64), diff)).min(axis=1)
    assert mahalanobis_score(features, stats) == pytest.approx(direct, rel=1e-6)


def test_statistics_are_the_class_means_and_scikit_learns_oas() -> None:
    from sklearn.covariance import OAS

    rng = np.random.default_rng(1)
    targets = rng.integers(0, 4, 300)
    features = rng.normal(size=(300, 12)) * rng.uniform(0.5, 3, 12) + targets[:, None] * 2.0
    sums = [FeatureSums.empty(5, 12), FeatureSums.empty(5, 12)]  # class 4 has no image; two "processes" added up
    sums[0].add(features[:120], targets[:120])
    sums[1].add(features[120:], targets[120:])
    total = FeatureSums(*(a + b for a, b in zip((sums[0].class_sums, sums[0].counts, sums[0].outer),
                                                (sums[1].class_sums, sums[1].counts, sums[1].outer))))
    stats, shrinkage = fit_statistics(total)
    means = np.stack([features[targets == k].mean(axis=0) for k in range(4)])
    assert stats.means.shape == (4, 12) and np.allclose(stats.means, means, atol=1e-5)  # the unseen class is left out
    reference = OAS(assume_centered=True).fit(features - means[targets])
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-9)
    assert np.allclose(np.linalg.inv(stats.precision.astype(np.float64)), reference.covariance_, rtol=1e-4, atol=1e-5)


def test_threshold_keeps_exactly_the_tpr_share() -> None:
    scores = np.random.default_rng(2).permutation(100).astype(float)
    for tpr, known in ((0.95, 95), (0.5, 50), (0.01, 1), (1.0, 100), (0.951, 96)):
        threshold = threshold_at(scores, tpr)
        assert int((scores <= threshold).sum()) == known and threshold == known - 1
    assert threshold_at([3.0, 1.0, 2.0, 5.0, 4.0, 9.0, 8.0, 7.0, 6.0], 0.5) == 5.0  # ceil(4.5) = 5 of 9 kept
    assert ood.fit_thresholds({"msp": scores, "energy": -scores}, 0.9) == {"msp": 89.0, "energy": -10.0}


def test_auroc_and_fpr95_known_answers_and_scikit_learn() -> None:
    from sklearn.metrics import roc_auc_score

    from utils.evaluate.ood_report import ood_metrics

    rng = np.random.default_rng(3)
    inside = rng.normal(size=200)
    assert ood_metrics(inside, inside + 100) == {"auroc": 1.0, "fpr95": 0.0}  # separated
    assert ood_metrics(inside + 100, inside) == {"auroc": 0.0, "fpr95": 1.0}  # the wrong way round
    same = np.arange(100.0)
    assert ood_metrics(same, same) == {"auroc": 0.5, "fpr95": pytest.approx(0.95)}  # identical: chance
    outside = rng.normal(1.0, 1.0, 150)
    got = ood_metrics(inside, outside)
    labels = np.r_[np.zeros(200), np.ones(150)]
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[inside, outside]), abs=1e-12)
    # FPR95 by brute force: the smallest share of out images at or below a threshold keeping >= 95% of the in images
    brute = min(np.mean(outside <= t) for t in np.r_[inside, outside] if np.mean(inside <= t) >= 0.95)
    assert got["fpr95"] == pytest.approx(brute, abs=1e-12)


def _member(task: str = "multiclass", spec: Any = None, model_type: str = "onnx", classes: tuple = ("a", "b")) -> Any:
    from utils.infer.ensemble import Member

    meta = ModelMeta("resnet10t", classes, SPEC, task=task, ood=spec)
    return Member("m", SimpleNamespace(meta=meta, model_type=model_type), SPEC)


def test_rejection_refusals_are_one_line() -> None:
    from utils.core.schema import OodSpec
    from utils.infer.ensemble import Ensemble

    with pytest.raises(UserError, match="multiclass models"):
        ood.Rejector(Ensemble([_member("multilabel")]))
    with pytest.raises(UserError, match="multiclass models"):
        ood.OodScorer(Ensemble([_member("multilabel")]))
    with pytest.raises(UserError, match=r"no fitted rejection .*metrice.py --task calibrate.*main.py"):
        ood.Rejector(Ensemble([_member()]))
    spec = OodSpec("mahalanobis", 0.95, (("msp", 0.4), ("energy", -2.5), ("mahalanobis", 9.0)))
    with pytest.raises(UserError, match="--ood_score mahalanobis needs the penultimate features"):
        ood.Rejector(Ensemble([_member(spec=spec)]), "mahalanobis")
    partial = OodSpec("msp", 0.95, (("msp", 0.4),))
    with pytest.raises(UserError, match=r"no energy threshold \(fitted: msp\)"):
        ood.Rejector(Ensemble([_member(spec=partial)]), "energy")
    fallback = ood.Rejector(Ensemble([_member(spec=spec)]))  # an exported model: the best logit score instead
    assert fallback.score == ood.BEST_LOGIT_SCORE and fallback.threshold == spec.threshold(ood.BEST_LOGIT_SCORE)
    assert "needs the PyTorch checkpoint's features" in fallback.describe
    chosen = ood.Rejector(Ensemble([_member(spec=spec)]), "energy")
    assert (chosen.score, chosen.threshold) == ("energy", -2.5) and "--ood_score energy" in chosen.describe
    with pytest.raises(UserError, match="has a class named 'unknown'"):
        ood.Rejector(Ensemble([_member(spec=spec, classes=("cat", "unknown"))]))
    for argv, needle in ((["--ood_score", "msp"], "add --reject"), (["--reject", "--classical", "svm"], "--classical svm")):
        with pytest.raises(UserError, match=needle):
            import predict

            predict.parse_args(["--source", "x", *argv])


# =============================================================================== main.py's fit
def read_rows(folder: Path) -> dict[str, dict[str, str]]:
    """predictions.csv of a predict folder (or of the newest one under a run's predict/), by file name."""
    if not (folder / "predictions.csv").is_file():
        folder = max(folder.iterdir(), key=lambda p: p.stat().st_mtime)
    with (folder / "predictions.csv").open(newline="", encoding="utf-8") as fh:
        return {Path(r["path"]).name: r for r in csv.DictReader(fh)}


def independent_scores(run: Path, files: list[Path], stats: OodStats) -> dict[str, np.ndarray]:
    """The three scores of images computed here, without utils.infer.ood: the checkpoint's model, its
    logits and penultimate features (the classifier's input), torch's logsumexp and softmax, the
    Mahalanobis distance by its definition."""
    from utils.data.decode import load_image
    from utils.infer.backends import load_backend, preprocess_images
    from utils.models.features import last_linear

    backend = load_backend(run, "torch", "cpu")
    x = backend.normalize(torch.from_numpy(preprocess_images(backend.meta, [load_image(f, 3) for f in files])))
    seen: list[torch.Tensor] = []
    hook = last_linear(backend.model).register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        logits = backend.model(x).double()
    hook.remove()
    feats = seen[0].double().numpy()
    diff = feats[:, None, :] - stats.means.astype(np.float64)[None]
    maha = np.sqrt(np.einsum("nkd,de,nke->nk", diff, stats.precision.astype(np.float64), diff)).min(axis=1)
    temperature = backend.meta.temperature[0] if backend.meta.temperature else 1.0  # msp: the calibrated probabilities
    return {"msp": (1 - (logits / temperature).softmax(1).max(1).values).numpy(), "energy": (-torch.logsumexp(logits, 1)).numpy(),
            "mahalanobis": maha, "features": feats}


def test_main_stores_the_rejection_and_its_statistics_in_best_pt(trained_run: Any, tiny_data: Path) -> None:
    from utils.core.checkpoint import load_checkpoint

    assert "unknown images (--reject): thresholds keeping 95% of 9 images known" in trained_run.proc.stdout
    raw = load_ckpt(trained_run.path / "best.pt")  # weights_only
    assert raw["ood"]["score"] == ood.DEFAULT_SCORE and raw["ood"]["tpr"] == 0.95
    assert set(raw["ood"]["thresholds"]) == set(OOD_SCORES)
    means, precision = raw["ood_stats"]["means"], raw["ood_stats"]["precision"]
    assert means.dtype == precision.dtype == torch.float32
    assert means.shape[0] == 3 and precision.shape == (means.shape[1], means.shape[1])
    stats = OodStats.of_checkpoint(load_checkpoint(trained_run.path / "best.pt"), "best.pt")
    train = sorted((tiny_data / "train").rglob("*.png"))
    got = independent_scores(trained_run.path, train, stats)
    classes = np.array([["blue", "green", "red"].index(f.parent.name) for f in train])
    assert np.allclose(stats.means, np.stack([got["features"][classes == k].mean(0) for k in range(3)]), atol=1e-4)
    val = independent_scores(trained_run.path, sorted((tiny_data / "val").rglob("*.png")), stats)
    for name in OOD_SCORES:  # 95% of 9 images: ceil(8.55) = all 9 known, so the threshold is the largest val score
        assert raw["ood"]["thresholds"][name] == pytest.approx(val[name].max(), rel=1e-4, abs=1e-5), name


def test_refit_of_an_existing_checkpoint_gives_what_main_stored(trained_run: Any, tiny_data: Path) -> None:
    """fit_model_ood on best.pt's model and the run's splits (what metrice.py --task calibrate calls)."""
    from utils.core.checkpoint import load_checkpoint
    from utils.data.sources import scan_split
    from utils.models.weights import model_from_checkpoint

    ckpt = load_checkpoint(trained_run.path / "best.pt")
    splits = {s: scan_split(tiny_data / s, class_names=list(ckpt.meta.class_names)).samples for s in ("train", "val")}
    model = model_from_checkpoint(ckpt)
    spec, stats, line = ood.fit_model_ood(model, ckpt.meta, splits["train"], splits["val"], 0.95, 4, 0, torch.device("cpu"))
    assert spec.score == ckpt.meta.ood.score and spec.tpr == 0.95
    for (name, value), (stored_name, stored) in zip(spec.thresholds, ckpt.meta.ood.thresholds):
        assert name == stored_name and value == pytest.approx(stored, rel=1e-5, abs=1e-6)
    stored = OodStats.of_checkpoint(ckpt, "best.pt")
    assert np.allclose(stats.means, stored.means, atol=1e-5) and np.allclose(stats.precision, stored.precision, rtol=1e-4,
                                                                             atol=1e-4)
    half, _, _ = ood.fit_model_ood(model, ckpt.meta, splits["train"], splits["val"], 0.5, 4, 0, torch.device("cpu"))
    val = independent_scores(trained_run.path, [Path(p) for p, _ in splits["val"]], stats)
    for name, value in half.thresholds:  # 5 of the 9 val images kept known
        assert value == pytest.approx(np.sort(val[name])[4], rel=1e-4, abs=1e-5)
        assert int((val[name] <= value + 1e-6).sum()) == 5
    rewritten = ood.with_ood(ckpt, half, stats)
    assert rewritten.meta.ood == half and rewritten.extra[ood.STATS_KEY]["means"].shape == (3, stats.means.shape[1])
    assert ckpt.meta.ood != half  # the checkpoint given is not changed


def test_without_a_val_split_the_training_images_fit_the_thresholds(tiny_data: Path, tmp_path: Path) -> None:
    proc = run_inprocess("main.py", *train_args(tiny_data, tmp_path / "run", "--val_path", tmp_path / "none",
                                                "--test_path", tmp_path / "none", "--reject_tpr", "0.5"))
    assert proc.returncode == 0, describe(proc)
    assert "no val split, so the rejection thresholds are fitted on the training images" in proc.stdout
    assert "thresholds keeping 50% of 24 images known" in proc.stdout
    assert load_ckpt(tmp_path / "run" / "best.pt")["ood"]["tpr"] == 0.5
    assert_user_error(run_inprocess("main.py", *train_args(tiny_data, tmp_path / "bad", "--reject_tpr", "0")),
                      "--reject_tpr must be a share in (0, 1]")


# =============================================================================== predict, export, serve
@pytest.fixture(scope="module")
def rejecting(trained_run: Any, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of trained_run exported to ONNX, and a folder of in images (the test split) and out
    images (noise, a colour never trained, a grey ramp), in sub-folders."""
    root = tmp_path_factory.mktemp("rejecting")
    run = root / "run"
    run.mkdir()
    for name in ("best.pt", "args.yaml", "label.txt"):
        shutil.copy(trained_run.path / name, run / name)
    assert_ok(run_script("export.py", "--save_path", run, "--export", "onnx", "--device", "cpu"))
    images = root / "images"
    (images / "in").mkdir(parents=True)
    for path in sorted((tiny_data / "test").rglob("*.png")):
        shutil.copy(path, images / "in" / f"{path.parent.name}_{path.name}")
    (images / "out" / "deep").mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images / "out" / f"noise{i}.png")
        class_image(len(PALETTE) - 1, rng).save(images / "out" / "deep" / f"orange{i}.png")  # a colour no class has
    Image.fromarray(np.tile(np.arange(0, 240, 10, dtype=np.uint8), (24, 1))).save(images / "out" / "ramp.png")
    return {"run": run, "images": images, "onnx": run / "export" / "best.onnx"}


def test_predict_reject_marks_the_out_images_unknown(rejecting: dict[str, Any]) -> None:
    from utils.core.checkpoint import load_checkpoint

    run, images = rejecting["run"], rejecting["images"]
    proc = run_script("predict.py", "--source", images, "--save_path", run, "--device", "cpu", "--workers", 0,
                      "--reject", "--save_images")
    assert_ok(proc)
    assert f"--reject: {ood.DEFAULT_SCORE} score" in proc.stdout and "| unknown |" in proc.stdout
    rows = read_rows(run / "predict")
    assert list(next(iter(rows.values())))[-2:] == ["unknown", "ood_score"]
    out = [n for n in rows if not n.startswith(("blue", "green", "red"))]
    assert len(out) == 9 and all(rows[n]["unknown"] == "1" and rows[n]["class"] == "unknown" for n in out)
    inside = [n for n in rows if n not in out]
    assert sum(rows[n]["unknown"] == "0" for n in inside) >= 7, {n: rows[n]["ood_score"] for n in inside}
    ckpt = load_checkpoint(run / "best.pt")
    threshold = ckpt.meta.ood.threshold(ood.DEFAULT_SCORE)
    files = [next(images.rglob(n)) for n in rows]
    expected = independent_scores(run, files, OodStats.of_checkpoint(ckpt, "best.pt"))[ood.DEFAULT_SCORE]
    for name, value in zip(rows, expected):
        assert float(rows[name]["ood_score"]) == pytest.approx(value, rel=1e-4, abs=1e-5), name
        assert rows[name]["unknown"] == str(int(value > threshold)), name
    drawn = max((run / "predict").iterdir(), key=lambda p: p.stat().st_mtime) / "images"
    assert len(list(drawn.rglob("*.png"))) == len(rows)


def test_reject_with_two_streams_writes_what_one_stream_writes(rejecting: dict[str, Any], tmp_path: Path) -> None:
    """predict.py --reject --streams 2 (two batches at once, each scoring its own images) gives the same
    predictions.csv, byte for byte, as one stream."""
    run, images = rejecting["run"], rejecting["images"]
    folders = {}
    for streams in (1, 2):
        proc = run_script("predict.py", "--source", images, "--save_path", run, "--device", "cpu", "--workers", 0,
                          "--reject", "--batch_size", 2, "--streams", streams)
        assert_ok(proc)
        assert ("2 streams of 1 compute thread each" in proc.stdout) == (streams == 2)
        folders[streams] = Path(next(ln for ln in proc.stdout.splitlines() if ln.startswith("predict folder: ")).split(": ", 1)[1])
    first = (folders[1] / "predictions.csv").read_bytes()
    assert (folders[2] / "predictions.csv").read_bytes() == first and first.count(b",unknown,") >= 9  # the out images


def test_onnx_export_gives_the_same_unknown_flags_as_pytorch(rejecting: dict[str, Any]) -> None:
    run, images, onnx = rejecting["run"], rejecting["images"], rejecting["onnx"]
    exported = json.loads(onnx.with_name("best.onnx.json").read_text())
    assert exported["ood"] == load_ckpt(run / "best.pt")["ood"]  # the thresholds travel with the export
    proc = run_inprocess("predict.py", "--source", images, "--weight", onnx, "--device", "cpu", "--workers", 0, "--reject")
    assert proc.returncode == 0, describe(proc)
    logit_score = ood.BEST_LOGIT_SCORE if ood.DEFAULT_SCORE not in ("msp", "energy") else ood.DEFAULT_SCORE
    assert proc.stdout.count(f"--reject: {logit_score} score") == 1
    flagged = {}
    for score in ("msp", "energy"):  # each logit score: the export decides as the checkpoint does
        onnx_proc = run_inprocess("predict.py", "--source", images, "--weight", onnx, "--device", "cpu", "--workers", 0,
                                  "--reject", "--ood_score", score)
        assert onnx_proc.returncode == 0, describe(onnx_proc)
        onnx_rows = read_rows(onnx.parent / "predict")
        torch_proc = run_inprocess("predict.py", "--source", images, "--save_path", run, "--device", "cpu", "--workers", 0,
                                   "--reject", "--ood_score", score)
        assert torch_proc.returncode == 0, describe(torch_proc)
        torch_rows = read_rows(run / "predict")
        assert {n: r["unknown"] for n, r in onnx_rows.items()} == {n: r["unknown"] for n, r in torch_rows.items()}, score
        for name, row in onnx_rows.items():
            assert float(row["ood_score"]) == pytest.approx(float(torch_rows[name]["ood_score"]), abs=1e-4)
        flagged[score] = sum(r["unknown"] == "1" for r in torch_rows.values())
    # energy is independent of the temperature; the tiny model's calibrated msp may keep every image
    # known (a high temperature flattens its probabilities), so the flags compared are not all zeros:
    assert flagged["energy"] >= 1, flagged
    assert_user_error(run_inprocess("predict.py", "--source", images, "--weight", onnx, "--reject", "--ood_score",
                                    "mahalanobis", "--device", "cpu"), "needs the penultimate features")


def test_serve_answers_unknown_and_ood_score(rejecting: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    from utils.infer.backends import load_backend
    from utils.serve.app import Settings, create_app
    from utils.serve.service import EmbeddedService, ModelRunner

    run, images = rejecting["run"], rejecting["images"]
    proc = run_inprocess("predict.py", "--source", images, "--save_path", run, "--device", "cpu", "--workers", 0, "--reject")
    assert proc.returncode == 0, describe(proc)
    expected = read_rows(run / "predict")
    service = EmbeddedService(ModelRunner(load_backend(run, "torch", "cpu"), reject=True), max_batch=4, max_wait_ms=0)
    files = sorted(p for p in images.rglob("*.png"))
    with TestClient(create_app(service, Settings())) as client:
        assert client.get("/info").json()["reject"]["score"] == ood.DEFAULT_SCORE
        response = client.post("/predict", files=[("file", (f.name, f.read_bytes())) for f in files])
        assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(files) and sum(r["unknown"] for r in results) >= 9
    for result in results:
        row = expected[result["file"]]
        assert result["unknown"] == (row["unknown"] == "1") and result["ood_score"] == pytest.approx(float(row["ood_score"]),
                                                                                                    abs=1e-4)
        assert result["class"] == row["class"]
    assert_user_error(run_inprocess("serve.py", "--queue", "redis://127.0.0.1:6379/0", "--reject"),
                      "--reject does not apply to the API tier")


def test_an_ensemble_averages_its_members_scores_and_thresholds(trained_runs: dict[str, Any],
                                                                rejecting: dict[str, Any]) -> None:
    from utils.data.decode import load_image
    from utils.infer.ensemble import load_ensemble

    runs = [trained_runs["CrossEntropyLoss"].path, trained_runs["FocalLoss"].path]
    pictures = [load_image(f, 3) for f in sorted(rejecting["images"].rglob("*.png"))]
    singles = []
    for run in runs:
        one = load_ensemble([run])
        rejector = ood.Rejector(one)
        plan = one.plan()
        singles.append((rejector.predict(plan.batch(pictures), plan)[1], rejector.threshold))
    both = load_ensemble(runs)
    rejector = ood.Rejector(both)
    plan = both.plan()
    probs, scores, unknown = rejector.predict(plan.batch(pictures), plan)
    assert np.allclose(scores, (singles[0][0] + singles[1][0]) / 2, rtol=1e-6)
    assert rejector.threshold == pytest.approx((singles[0][1] + singles[1][1]) / 2)
    assert np.array_equal(unknown, scores > rejector.threshold) and "the models averaged" in rejector.describe
    assert np.allclose(probs, both.predict(plan.batch(pictures), plan)[0], atol=1e-6)  # the ensemble's own probabilities


def test_a_model_without_a_fitted_rejection_is_refused(rejecting: dict[str, Any], tmp_path: Path) -> None:
    raw = load_ckpt(rejecting["run"] / "best.pt")
    del raw["ood"], raw["ood_stats"]
    (tmp_path / "old").mkdir()
    torch.save(raw, tmp_path / "old" / "best.pt")
    assert_user_error(run_inprocess("predict.py", "--source", rejecting["images"], "--save_path", tmp_path / "old",
                                    "--reject", "--device", "cpu"),
                      "has no fitted rejection", "metrice.py --task calibrate", "main.py")


def test_metrice_calibrate_refits_the_rejection_of_a_checkpoint_without_one(rejecting: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    """A best.pt from before rejection existed (no ood, no statistics): metrice.py --task calibrate fits
    them as main.py did (same thresholds, same statistics), after the temperature, and predict.py
    --reject then works on it."""
    original = load_ckpt(rejecting["run"] / "best.pt")
    raw = dict(original)
    del raw["ood"], raw["ood_stats"]
    old = tmp_path / "old"
    old.mkdir()
    torch.save(raw, old / "best.pt")
    proc = run_script("metrice.py", "--save_path", old, "--task", "calibrate", "--device", "cpu", "--workers", "0")
    assert_ok(proc)
    assert "unknown images (--reject):" in proc.stdout, describe(proc)
    refit = load_ckpt(old / "best.pt")
    assert refit["ood"]["score"] == original["ood"]["score"] and refit["ood"]["tpr"] == original["ood"]["tpr"]
    for name, value in original["ood"]["thresholds"].items():
        assert refit["ood"]["thresholds"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    for key in ("means", "precision"):
        assert torch.allclose(refit["ood_stats"][key], original["ood_stats"][key], rtol=1e-4, atol=1e-4), key
    results = json.loads((old / "calibrate" / "results.json").read_text())
    assert set(results) >= {"calibration", "ood_fit"} and results["ood_fit"]["val_images"] == 9
    assert_ok(run_script("predict.py", "--source", rejecting["images"], "--save_path", old, "--reject", "--device", "cpu"))


# =============================================================================== metrice.py --ood_path
def test_metrice_ood_path_writes_auroc_equal_to_scikit_learn(rejecting: dict[str, Any], tiny_data: Path,
                                                             tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    run = rejecting["run"]
    proc = run_inprocess("metrice.py", "--save_path", run, "--task", "test", "--test_path", tiny_data / "test",
                         "--device", "cpu", "--workers", 0, "--ood_path", rejecting["images"] / "out")
    assert proc.returncode == 0, describe(proc)
    assert "--ood_path: 9 images of no trained class" in proc.stdout and "default score:" in proc.stdout
    out = max((run / "test").parent.glob("test*"), key=lambda p: p.stat().st_mtime)
    section = json.loads((out / "results.json").read_text())["ood"]
    assert section["default"] == ood.DEFAULT_SCORE and section["images"] == {"in": 9, "out": 9}
    with (out / "ood_scores.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 18 and {r["set"] for r in rows} == {"in", "out"}
    labels = np.array([r["set"] == "out" for r in rows], dtype=float)
    for name in OOD_SCORES:
        scores = np.array([float(r[name]) for r in rows])
        assert section[name]["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6), name
        inside, outside = scores[labels == 0], scores[labels == 1]
        brute = min(np.mean(outside <= t) for t in scores if np.mean(inside <= t) >= 0.95)
        assert section[name]["fpr95"] == pytest.approx(brute, abs=1e-6), name
        assert section[name]["out_unknown"] == pytest.approx(np.mean(outside > section[name]["threshold"]))
        assert (out / f"ood_{name}.png").stat().st_size > 5000
    assert section[ood.DEFAULT_SCORE]["auroc"] > 0.9, section
    assert_user_error(run_inprocess("metrice.py", "--save_path", run, "--task", "fps", "--ood_path", rejecting["images"]),
                      "--ood_path compares the images of a split")
    assert_user_error(run_inprocess("metrice.py", "--save_path", run, "--task", "test", "--ood_path", tmp_path / "missing"),
                      "--ood_path", "no such folder")  # said at once, not after the split is predicted
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_inprocess("metrice.py", "--save_path", run, "--task", "test", "--test_path", tiny_data / "test",
                                    "--device", "cpu", "--workers", 0, "--ood_path", empty), "holds no image files")
