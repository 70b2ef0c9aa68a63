"""Evaluating models on a labelled split: predictions, metrics, and speed (metrice.py's library).

    ensemble = load_ensemble(["runs/exp"])
    split = predict_split(ensemble, image_set.samples, batch_size=64, workers=0)
    results = score_split(ensemble, split)            # {"runs/exp": {"acc": ..., "f1": ...}}

Images are decoded and batched by the same loader as predict.py (utils.infer.loader.prediction_loader)
and run through the same Ensemble.predict, so metrice.py and predict.py give the same
probabilities for the same images and models. numpy throughout; torch is imported only for the
penultimate features of a torch model (t-SNE).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from utils.core.log import UserError, progress
from utils.data.imageset import report_skipped
from utils.evaluate.metrics import multilabel_metrics, overall_metrics
from utils.infer.calibration import CALIBRATION_BINS, at_temperature, calibration_scores, reliability
from utils.infer.ensemble import Ensemble, combine_probs
from utils.infer.loader import prediction_loader
from utils.infer.ood import OodScorer
from utils.infer.speed import measure_backend


@dataclass
class SplitPredictions:
    """The predictions of an ensemble on a labelled split.

    Attributes:
        samples: the split's (path, target) pairs, targets encoded for the models' task (ImageSet.as_task).
        keep: indices into samples of the images that decoded (the rows below).
        targets: their true classes (N,), or for a multi-label split their labels, multi-hot (N, C).
        probs: the ensemble's probabilities (N, C) (the model's own for a single model).
        member_probs: each member's probabilities (N, C).
        features: penultimate features of the first member (N, D), when asked for.
        ood: the out-of-distribution scores {name: (N,)} (utils.infer.ood.OodScorer), when asked for.
    """

    samples: list[tuple[str, int]]
    keep: list[int]
    targets: np.ndarray
    probs: np.ndarray
    member_probs: list[np.ndarray]
    features: np.ndarray | None = None
    ood: dict[str, np.ndarray] | None = None

    def path(self, row: int) -> str:
        """The image file of a row."""
        return self.samples[self.keep[row]][0]


def torch_features(backend: Any, images: np.ndarray) -> np.ndarray:
    """Penultimate features of a PyTorch backend's model for a uint8 batch (TenCrop: averaged)."""
    import torch

    from utils.data.transforms_np import run_with_tta
    from utils.models.features import penultimate_features

    def features(x: torch.Tensor) -> torch.Tensor:
        x = backend.normalize(x.to(backend.device))
        return penultimate_features(backend.model, x.half() if backend.half else x).float().cpu()

    return run_with_tta(features, torch.from_numpy(np.ascontiguousarray(images))).numpy()


def predict_split(ensemble: Ensemble, samples: list[tuple[str, int]], batch_size: int, workers: int, tta: bool = False,
                  device: Any = None, features: bool = False, desc: str = "eval", scorer: OodScorer | None = None
                  ) -> SplitPredictions:
    """Probabilities of every model of `ensemble` on every image of a labelled split (and with a
    `scorer`, the out-of-distribution scores of the same pass: metrice.py --ood_path).

    Images that fail to decode are reported and left out.

    Raises:
        UserError: no image decoded; features asked of a model that is not a PyTorch module.
    """
    if features and ensemble.members[0].backend.model_type != "torch":
        raise UserError("penultimate features need the PyTorch model: use --model_type torch")
    plan = ensemble.plan(tta)
    loader = prediction_loader([p for p, _ in samples], plan, batch_size, workers)
    keep: list[int] = []
    combined: list[np.ndarray] = []
    per_member: list[list[np.ndarray]] = [[] for _ in ensemble.members]
    feats: list[np.ndarray] = []
    scores: list[dict[str, np.ndarray]] = []
    failed: list[tuple[str, str]] = []
    for batch in progress(loader, desc=desc, leave=False):
        failed.extend((samples[i][0], reason) for i, reason in batch["failed"])
        if not batch["indices"]:
            continue
        keep.extend(batch["indices"])
        if scorer is not None:
            probs, member_probs, batch_scores = scorer.predict(batch["inputs"], plan)
            scores.append(batch_scores)
        else:
            probs, member_probs = ensemble.predict(batch["inputs"], plan)
        combined.append(np.asarray(probs, dtype=np.float32))
        for store, p in zip(per_member, member_probs):
            store.append(np.asarray(p, dtype=np.float32))
        if features:
            feats.append(torch_features(ensemble.members[0].backend, batch["inputs"][plan.group_of[0]]))
    report_skipped(failed, "images that failed to decode (left out of the evaluation)")
    if not keep:
        raise UserError("no image of the split could be decoded")
    probs = np.concatenate(combined)
    return SplitPredictions(samples=samples, keep=keep, targets=ensemble.meta.task_type.target_array([samples[i][1] for i in keep], probs.shape[1]),
                            probs=probs, member_probs=[np.concatenate(p) for p in per_member],
                            features=np.concatenate(feats) if features else None,
                            ood={n: np.concatenate([s[n] for s in scores]) for n in scorer.names} if scorer else None)


def score_split(ensemble: Ensemble, split: SplitPredictions, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Overall metrics of the ensemble and, for several models, of each member beside it.

    Returns:
        {label: metrics}; the first entry is the final prediction's ("ensemble (vote)" or the run).
    """
    meta = ensemble.meta

    def score(probs: np.ndarray) -> dict[str, float]:
        if meta.task_type.multilabel:  # mAP and F1 at the model's per-class thresholds
            return multilabel_metrics(split.targets, probs, meta.task_type.thresholds(meta.num_classes, meta.thresholds),
                                      class_names)[0]
        return overall_metrics(split.targets, probs, list(class_names))

    if len(ensemble) == 1:
        return {ensemble.members[0].name: score(split.probs)}
    results = {f"ensemble ({ensemble.method})": score(split.probs)}
    for member, probs in zip(ensemble.members, split.member_probs):
        results[member.name] = score(probs)
    return results


def stored_temperature(meta: Any) -> float | list[float]:
    """A model's temperature as results.json writes it: one number (1 when uncalibrated), or one per
    class for a calibrated multi-label model."""
    t = meta.temperature
    return 1.0 if t is None else (float(t[0]) if len(t) == 1 and not meta.task_type.multilabel else [float(v) for v in t])


def score_calibration(ensemble: Ensemble, split: SplitPredictions) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The final prediction's calibration before (every model at temperature 1) and after (each with
    its stored temperature, as predicted): ECE, NLL, Brier score (utils.infer.calibration).

    The "before" probabilities are the predicted ones taken back through each model's temperature
    (utils.infer.calibration.at_temperature), then combined as the ensemble combines; with TenCrop
    (--test_tta) the crops were averaged after the temperature, so "before" is then that average taken
    back, not the average of the uncalibrated crops.

    Returns:
        (results.json's calibration section: temperature (one model: its value; several: {name: value}),
        calibrated, bins, ece/nll/brier _before and _after; the reliability bins {"before", "after"}).
    """
    task = ensemble.meta.task_type
    raw = [p if m.backend.meta.temperature is None else at_temperature(p, task, m.backend.meta.temperature)
           for m, p in zip(ensemble.members, split.member_probs)]
    before_probs = raw[0] if len(raw) == 1 else combine_probs(raw, ensemble.method, ensemble.weights)
    before = calibration_scores(split.targets, before_probs, task)
    after = calibration_scores(split.targets, split.probs, task)
    temperatures = {m.name: stored_temperature(m.backend.meta) for m in ensemble.members}
    section: dict[str, Any] = {
        "temperature": next(iter(temperatures.values())) if len(temperatures) == 1 else temperatures,
        "calibrated": any(m.backend.meta.temperature is not None for m in ensemble.members), "bins": CALIBRATION_BINS}
    for key in ("ece", "nll", "brier"):
        section[f"{key}_before"], section[f"{key}_after"] = before[key], after[key]
    curves = {"before": reliability(split.targets, before_probs, task), "after": reliability(split.targets, split.probs, task)}
    return section, curves


def measure_speed(ensemble: Ensemble, batch_sizes: dict[str, list[int]], tta: bool = False) -> list[dict[str, Any]]:
    """images/second of each model at each of its batch sizes (utils.infer.speed.measure_backend).

    Args:
        ensemble: the models.
        batch_sizes: {member name: [batch sizes]}.
        tta: time TenCrop batches.

    Returns:
        Rows with "run" added (the member's name).
    """
    rows = []
    for member in ensemble.members:
        for batch_size in batch_sizes[member.name]:
            rows.extend(r | {"run": member.name} for r in measure_backend(member.backend, member.spec, batch_size, tta))
    return rows
