"""metrice.py --ood_path: how well each unknown-image score (utils.infer.ood) tells the split's images
(in: the trained classes) from a folder of images of no trained class (out).

    metrics = ood_metrics(in_scores, out_scores)     # {"energy": {"auroc": 0.97, "fpr95": 0.12}, ...}
    report_ood(out, ensemble, scorer, split, "unknown/", batch_size, workers, tta, device)

AUROC and the false-positive rate at 95% true-positive rate are scikit-learn's roc_auc_score and
roc_curve, with the in images as the positives and the score's negation as their score: AUROC is the
chance that an out image scores above an in image (1: separated, 0.5: no better than chance), FPR95
the share of out images still called known when 95% of the in images are. The report writes
ood_scores.csv (every image's scores), ood_<score>.png (the histograms), a table, and the `ood`
section of results.json; it says which score the model uses by default, and why.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from prettytable import PrettyTable

from utils.core.log import UserError
from utils.core.run import Run
from utils.draw.figures import plot_score_histogram
from utils.evaluate.split import SplitPredictions, predict_split
from utils.evaluate.tasks import update_results
from utils.infer.ensemble import Ensemble
from utils.infer.ood import BEST_LOGIT_SCORE, DEFAULT_REASON, DEFAULT_SCORE, OodScorer, ensemble_threshold
from utils.infer.sources import find_images

TPR = 0.95  # the in images' share at which the false-positive rate is read


def ood_metrics(inside: Any, outside: Any) -> dict[str, float]:
    """AUROC and FPR at 95% TPR of one score (higher = further from the training images).

    Args:
        inside: the scores of images of the trained classes (the positives).
        outside: the scores of images of no trained class.

    Returns:
        {"auroc", "fpr95"}.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    inside, outside = np.asarray(inside, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    labels = np.concatenate([np.ones(len(inside)), np.zeros(len(outside))])
    known = -np.concatenate([inside, outside])  # higher = more like the training images
    fpr, tpr, _ = roc_curve(labels, known, drop_intermediate=False)  # collinear points too: each is a threshold
    return {"auroc": float(roc_auc_score(labels, known)), "fpr95": float(fpr[np.searchsorted(tpr, TPR - 1e-12)])}


def report_ood(out: Run, ensemble: Ensemble, scorer: OodScorer, split: SplitPredictions, ood_path: str | Path,
               batch_size: int, workers: int, tta: bool, device: Any) -> dict[str, Any]:
    """Score the images of `ood_path` (recursive; labels ignored) and compare them with the split's.

    Args:
        out: the metrice.py output folder.
        ensemble: the models; scorer: their scores (the split was predicted with it).
        split: the split's predictions, with their scores (predict_split(scorer=...)).
        ood_path: --ood_path.
        batch_size, workers, tta, device: as the split was predicted.

    Returns:
        results.json's `ood` section: {"default", "reason", "images", score: {"auroc", "fpr95", ...}}.
    """
    source = find_images(ood_path)
    if not source.files:
        raise UserError(f"--ood_path {ood_path} holds no image files: pass a folder of images of no trained class")
    print(f"--ood_path: {len(source.files)} images of no trained class from {ood_path}", flush=True)
    far = predict_split(ensemble, [(str(f), 0) for f in source.files], batch_size, workers, tta, device,
                        desc="ood", scorer=scorer)
    spec = ensemble.meta.ood
    default, reason = (spec.score, DEFAULT_REASON) if spec else (None, "no rejection fitted: train again, or refit it with "
                                                                       "metrice.py --task calibrate")
    if spec and spec.score != DEFAULT_SCORE:  # fitted by another version, or chosen by the refit
        reason = f"stored with the model; the toolkit's default is now {DEFAULT_SCORE}: {DEFAULT_REASON}"
    if default is not None and default not in scorer.names:  # an exported model: what --reject uses instead
        default, reason = BEST_LOGIT_SCORE, (f"the model's default {spec.score} needs the PyTorch checkpoint's features; "
                                             f"{BEST_LOGIT_SCORE} is the better logit score ({DEFAULT_REASON})")
    section: dict[str, Any] = {"default": default, "reason": reason,
                               "images": {"in": len(split.keep), "out": len(far.keep)}}
    rows = [["path", "set", *scorer.names]]
    for name, part in (("in", split), ("out", far)):
        rows += [[part.path(i), name, *(f"{part.ood[n][i]:.6f}" for n in scorer.names)] for i in range(len(part.keep))]
    out.write_csv("ood_scores.csv", rows[0], rows[1:])
    table = PrettyTable(["score", "AUROC", "FPR@95%TPR", "threshold", "in known", "out unknown"])
    table.title = f"unknown images: {len(split.keep)} in, {len(far.keep)} out"
    for name in scorer.names:
        values = ood_metrics(split.ood[name], far.ood[name])
        threshold = ensemble_threshold(ensemble, name, scorer.weights)
        if threshold is not None:  # what --reject does with the model's own threshold
            values |= {"threshold": threshold, "in_known": float(np.mean(split.ood[name] <= threshold)),
                       "out_unknown": float(np.mean(far.ood[name] > threshold))}
        section[name] = values
        table.add_row([name + (" (default)" if name == default else ""), f"{values['auroc']:.4f}",
                       f"{values['fpr95']:.4f}", *(f"{values[k]:.4g}" if k in values else "-"
                                                  for k in ("threshold", "in_known", "out_unknown"))])
        out.savefig(plot_score_histogram(split.ood[name], far.ood[name], name, threshold,
                                         f"{name}: AUROC {values['auroc']:.3f}, FPR@95%TPR {values['fpr95']:.3f}"),
                    f"ood_{name}.png")
    print(table, flush=True)
    best = max(scorer.names, key=lambda n: section[n]["auroc"])
    print(f"default score: {section['default']} -- {section['reason']}; on these images {best} separates best "
          f"(AUROC {section[best]['auroc']:.4f})", flush=True)
    update_results(out.path, ood=section)
    return section
