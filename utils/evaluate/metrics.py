"""Running sums of a classification epoch and the metrics derived from them.

Sums (loss, count, confusion matrix) are what a distributed run all-reduces, through
utils.core.distributed.reduce_sum, before any metric is computed.

The second half evaluates the predicted probabilities of a whole split (metrice.py): overall
and per-class metrics, the ECE (utils.infer.calibration), the most confused class pairs: numpy only (EpochSums
imports torch itself), so metrice.py evaluates an exported model without PyTorch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from utils.core.distributed import gather_rows, reduce_sum
from utils.core.task import MULTICLASS, MULTILABEL, TaskType
from utils.infer.calibration import calibration_bins

if TYPE_CHECKING:
    import torch


class EpochSums:
    """Loss sum, sample count and confusion matrix (rows: true class, columns: predicted)."""

    task = MULTICLASS

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.loss_sum = 0.0
        self.count = 0
        import torch

        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, loss: float, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch: its mean loss, logits (N, C) and hard targets (N,)."""
        n = targets.shape[0]
        self.loss_sum += float(loss) * n
        self.count += n
        pred = logits.argmax(dim=1).cpu()
        idx = targets.cpu() * self.num_classes + pred
        self.confusion += idx.bincount(minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def reduced(self) -> "EpochSums":
        """These sums added up over all processes."""
        import torch

        out = EpochSums(self.num_classes)
        packed = reduce_sum(torch.cat([torch.tensor([self.loss_sum, float(self.count)], dtype=torch.float64),
                                       self.confusion.flatten().double()]))
        out.loss_sum, out.count = float(packed[0]), int(packed[1])
        out.confusion = packed[2:].round().long().view(self.num_classes, self.num_classes)
        return out

    def metrics(self) -> dict[str, float]:
        """loss, acc (overall accuracy) and mean_acc (mean per-class recall over present classes)."""
        import torch

        sums = self.reduced()
        total = sums.confusion.sum().item()
        per_class_total = sums.confusion.sum(dim=1)
        present = per_class_total > 0
        recall = sums.confusion.diag()[present].double() / per_class_total[present].double()
        predicted = sums.confusion.sum(dim=0)[present].double()
        precision = torch.where(predicted > 0, sums.confusion.diag()[present].double() / predicted.clamp_min(1), 0.0)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
        mean_acc = recall.mean().item() if present.any() else 0.0
        return {
            "loss": sums.loss_sum / max(1, sums.count),
            "acc": sums.confusion.diag().sum().item() / max(1, total),
            "mean_acc": mean_acc,
            "balanced_acc": mean_acc,  # the same: mean recall over the classes present
            "f1": f1.mean().item() if present.any() else 0.0,  # macro F1 over the classes present
        }

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "count": self.count, "confusion": self.confusion.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum = float(state["loss_sum"])
        self.count = int(state["count"])
        self.confusion = state["confusion"].clone()


class MultiLabelSums:
    """Loss sum, sample count, and the epoch's probability and target rows of a multi-label model
    (mean average precision needs every score of a class, not a sum)."""

    task = MULTILABEL

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.loss_sum = 0.0
        self.count = 0
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, loss: float, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch: its mean loss, logits (N, C) and (multi-hot or mixed) targets (N, C)."""
        import torch

        n = targets.shape[0]
        self.loss_sum += float(loss) * n
        self.count += n
        self.probs.append(torch.sigmoid(logits.detach().float()).cpu())
        self.targets.append((targets.detach().float() >= 0.5).cpu())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, float, int]:
        """(probabilities, multi-hot targets, loss sum, count) over every process."""
        import torch

        probs = torch.cat(self.probs) if self.probs else torch.zeros(0, self.num_classes)
        targets = torch.cat(self.targets) if self.targets else torch.zeros(0, self.num_classes, dtype=torch.bool)
        totals = reduce_sum(torch.tensor([self.loss_sum, float(self.count)], dtype=torch.float64))
        return gather_rows(probs).numpy(), gather_rows(targets).numpy().astype(bool), float(totals[0]), int(totals[1])

    def reduced(self) -> "MultiLabelSums":
        """These rows and sums gathered from all processes."""
        import torch

        out = MultiLabelSums(self.num_classes)
        probs, targets, out.loss_sum, out.count = self.arrays()
        out.probs, out.targets = [torch.from_numpy(probs)], [torch.from_numpy(targets)]
        return out

    def metrics(self) -> dict[str, float]:
        """loss, map (mean average precision over the classes with positives) and f1 (macro F1 at 0.5)."""
        probs, targets, loss_sum, count = self.arrays()
        return {"loss": loss_sum / max(1, count), **multilabel_scores(targets, probs)}

    def state_dict(self) -> dict[str, Any]:
        import torch

        probs, targets = (torch.cat(v) if v else torch.zeros(0, self.num_classes) for v in (self.probs, self.targets))
        return {"loss_sum": self.loss_sum, "count": self.count, "probs": probs, "targets": targets.float()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.count = float(state["loss_sum"]), int(state["count"])
        self.probs, self.targets = [state["probs"].clone()], [state["targets"] >= 0.5]


SUMS: dict[str, type] = {"multiclass": EpochSums, "multilabel": MultiLabelSums}  # by task type


def new_sums(task: TaskType, num_classes: int) -> EpochSums | MultiLabelSums:
    """What an epoch's metrics of a model of this task are summed in (reducible across processes)."""
    return SUMS[task.name](num_classes)


def multilabel_metrics(targets: np.ndarray, probs: np.ndarray, thresholds: Sequence[float],
                       class_names: Sequence[str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A multi-label model's metrics on a split, with scikit-learn: overall (mAP over the classes
    with positives, micro and macro F1, micro precision and recall, exact-match ratio, Hamming loss)
    and per class (AP, precision, recall, F1 at its threshold, support).

    Args:
        targets: multi-hot (N, C).
        probs: probabilities (N, C).
        thresholds: one decision threshold per class.
        class_names: the C names.

    Returns:
        (overall, per-class rows keyed by MULTILABEL_PER_CLASS_FIELDS).
    """
    from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, hamming_loss,
                                 precision_recall_fscore_support)

    y = np.asarray(targets).astype(bool)
    decided = np.asarray(probs) >= np.asarray(thresholds, dtype=np.float32)
    present = y.sum(axis=0) > 0
    ap = [average_precision_score(y[:, c], probs[:, c]) if present[c] else float("nan") for c in range(y.shape[1])]
    p, r, f, support = precision_recall_fscore_support(y, decided, average=None, zero_division=0)
    micro = precision_recall_fscore_support(y, decided, average="micro", zero_division=0)
    overall = {"images": float(len(y)), "map": float(np.nanmean(ap)) if present.any() else float("nan"),
               "macro_f1": float(f1_score(y[:, present], decided[:, present], average="macro", zero_division=0))
               if present.any() else float("nan"),
               "micro_f1": float(micro[2]), "micro_precision": float(micro[0]), "micro_recall": float(micro[1]),
               "exact_match": float(accuracy_score(y, decided)), "hamming_loss": float(hamming_loss(y, decided))}
    rows = [{"class": name, "ap": float(ap[c]), "precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]),
             "threshold": float(thresholds[c]), "support": int(support[c])} for c, name in enumerate(class_names)]
    return overall, rows


def best_f1_thresholds(targets: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per class, the decision threshold (one of its probabilities) that gives the best F1 on these
    rows; 0.5 for a class without positives. Ties go to the highest threshold.

    Args:
        targets: multi-hot (N, C).
        probs: probabilities (N, C).

    Returns:
        C thresholds.
    """
    thresholds = []
    for c in range(probs.shape[1]):
        y, p = targets[:, c].astype(bool), probs[:, c]
        if not y.any():
            thresholds.append(0.5)
            continue
        order = np.argsort(-p, kind="stable")
        tp = np.cumsum(y[order])                  # deciding "present" for the k highest scores
        fp = np.cumsum(~y[order])
        f1 = 2 * tp / (tp + fp + y.sum())         # 2TP / (2TP + FP + FN), FN = positives - TP
        last = np.flatnonzero(np.r_[p[order][1:] != p[order][:-1], True])  # where a threshold can fall
        best = last[np.argmax(f1[last])]
        thresholds.append(float(p[order][best]))
    return thresholds


def multilabel_scores(targets: np.ndarray, probs: np.ndarray, thresholds: Any = 0.5) -> dict[str, float]:
    """map: mean of each class's average precision (classes with at least one positive);
    f1: macro F1 of the decisions probs >= thresholds over those classes."""
    from sklearn.metrics import average_precision_score

    present = targets.sum(axis=0) > 0
    if not present.any():
        return {"map": 0.0, "f1": 0.0}
    ap = [average_precision_score(targets[:, c], probs[:, c]) for c in np.flatnonzero(present)]
    decided = probs >= np.asarray(thresholds)
    tp = (decided & targets).sum(axis=0)[present]
    fp = (decided & ~targets).sum(axis=0)[present]
    fn = (~decided & targets).sum(axis=0)[present]
    f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return {"map": float(np.mean(ap)), "f1": float(f1.mean())}


# ------------------------------------------------------------------ evaluation of predictions
# What metrice.py reports: overall and per-class metrics from the predicted probabilities of a
# whole split. Precision, recall, per-class accuracy and the F-scores come from pycm's confusion
# matrix statistics; AUC and AUPR from the probabilities (scikit-learn), not from hard labels.

METRIC_LABELS: dict[str, str] = {
    "images": "images",
    "acc": "accuracy",
    "mean_acc": "mean per-class accuracy (balanced, MPA)",
    "kappa": "Cohen's kappa",
    "precision": "macro precision",
    "recall": "macro recall",
    "f1": "macro F1",
    "top5_acc": "top-5 accuracy",
    "auc": "macro AUC (one-vs-rest)",
    "aupr": "macro AUPR (average precision)",
    "ece": "expected calibration error (15 bins)",
    # multi-label models (decisions at the model's per-class thresholds)
    "map": "mean average precision (mAP)",
    "macro_f1": "macro F1",
    "micro_f1": "micro F1",
    "micro_precision": "micro precision",
    "micro_recall": "micro recall",
    "exact_match": "exact-match ratio (all labels right)",
    "hamming_loss": "Hamming loss",
}
MULTILABEL_PER_CLASS_FIELDS = ["class", "ap", "precision", "recall", "f1", "threshold", "support"]
PER_CLASS_FIELDS = ["class", "precision", "recall", "accuracy", "f0.5", "f1", "f2", "auc", "aupr", "support"]
# pycm's names of the per-class statistics reported
_PYCM_CLASS_STATS = {"precision": "PPV", "recall": "TPR", "accuracy": "ACC", "f0.5": "F0.5", "f1": "F1", "f2": "F2"}


def confusion_matrix_from(targets: Any, preds: Any, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes), rows: true class, columns: predicted class.

    Args:
        targets: true class indices (N,).
        preds: predicted class indices (N,).
        num_classes: the model's classes.

    Returns:
        An int64 array.
    """
    targets = np.asarray(targets, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    return np.bincount(targets * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def pycm_matrix(confusion: Any, class_names: list[str]) -> Any:
    """A pycm ConfusionMatrix of the counts, classes in the model's order.

    Args:
        confusion: counts (C, C), rows true, columns predicted.
        class_names: the class names.

    Returns:
        pycm.ConfusionMatrix (its .save_html writes the report).
    """
    import pycm

    names = [str(n) for n in class_names]
    table = {a: {b: int(confusion[i][j]) for j, b in enumerate(names)} for i, a in enumerate(names)}
    return pycm.ConfusionMatrix(matrix=table, classes=names)


def _number(value: Any, undefined: float) -> float:
    """pycm writes undefined statistics as the string 'None'."""
    return undefined if value is None or isinstance(value, str) else float(value)


def per_class_metrics(targets: Any, probs: Any, class_names: list[str], cm: Any = None) -> list[dict[str, Any]]:
    """Per-class precision, recall, accuracy (one-vs-rest), F0.5, F1, F2, AUC, AUPR and support.

    Precision, recall and F-scores that are undefined (a class never predicted, or absent from
    the split) are 0, as scikit-learn's zero_division=0. AUC is one-vs-rest ROC-AUC of the class
    probability (scikit-learn roc_auc_score); AUPR its average precision; both nan when the class
    has no image in the split (AUC also when every image is of that class).

    Args:
        targets: true class indices (N,).
        probs: probabilities (N, C).
        class_names: the C class names.
        cm: the pycm matrix of these predictions (built when None).

    Returns:
        One dict per class, keys PER_CLASS_FIELDS.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if cm is None:
        cm = pycm_matrix(confusion_matrix_from(targets, probs.argmax(axis=1), len(class_names)), class_names)
    rows = []
    for c, name in enumerate(class_names):
        key = str(name)
        truth = targets == c
        support = int(truth.sum())
        row: dict[str, Any] = {"class": name}
        for field, stat in _PYCM_CLASS_STATS.items():
            row[field] = _number(cm.class_stat[stat][key], 0.0)
        row["auc"] = float(roc_auc_score(truth, probs[:, c])) if 0 < support < len(targets) else float("nan")
        row["aupr"] = float(average_precision_score(truth, probs[:, c])) if support > 0 else float("nan")
        row["support"] = support
        rows.append(row)
    return rows


def overall_metrics(targets: Any, probs: Any, class_names: list[str], cm: Any = None,
                    per_class: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """The metrics of a whole split (keys of METRIC_LABELS; top5_acc only with more than 5 classes).

    Macro averages are over the classes that have images in the split (as mean_acc of training).

    Args:
        targets: true class indices (N,).
        probs: probabilities (N, C).
        class_names: the C class names.
        cm: the pycm matrix of these predictions (built when None).
        per_class: per_class_metrics of these predictions (computed when None).

    Returns:
        {metric: value}; kappa is nan when undefined (a single class in truth and prediction).
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if cm is None:
        cm = pycm_matrix(confusion_matrix_from(targets, probs.argmax(axis=1), len(class_names)), class_names)
    if per_class is None:
        per_class = per_class_metrics(targets, probs, class_names, cm)
    present = [row for row in per_class if row["support"] > 0]

    def macro(field: str) -> float:
        values = [row[field] for row in present if not np.isnan(row[field])]
        return float(np.mean(values)) if values else float("nan")

    out: dict[str, float] = {
        "images": float(len(targets)),
        "acc": float(np.mean(probs.argmax(axis=1) == targets)) if len(targets) else float("nan"),
        "mean_acc": macro("recall"),
        "kappa": _number(cm.overall_stat["Kappa"], float("nan")),
        "precision": macro("precision"),
        "recall": macro("recall"),
        "f1": macro("f1"),
    }
    if len(class_names) > 5:
        out["top5_acc"] = topk_accuracy(targets, probs, 5)
    out["auc"] = macro("auc")
    out["aupr"] = macro("aupr")
    out["ece"] = calibration_bins(targets, probs)["ece"]
    return out


def topk_accuracy(targets: Any, probs: Any, k: int) -> float:
    """Fraction of images whose true class is among the k most probable."""
    probs = np.asarray(probs)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == np.asarray(targets)[:, None]).any(axis=1))) if len(probs) else float("nan")


def most_confused_pairs(confusion: Any, class_names: list[str], k: int = 20) -> list[dict[str, Any]]:
    """The k largest off-diagonal cells of the confusion matrix.

    Returns:
        Rows {"true", "predicted", "count", "fraction_of_true"} (fraction: of the true class's
        images), largest count first; only cells with a count.
    """
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1)
    cells = [(int(confusion[i, j]), i, j) for i in range(len(confusion)) for j in range(len(confusion))
             if i != j and confusion[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [{"true": class_names[i], "predicted": class_names[j], "count": n, "fraction_of_true": n / max(1, int(totals[i]))}
            for n, i, j in cells[:k]]
