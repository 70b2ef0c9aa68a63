"""Prediction rows and where they go: predictions.csv streamed to disk, labelled copies of the images.

    rows = prediction_rows(paths, probs, class_names)       # top-5, entropy, uncertain (multi-label: labels)
    with PredictionWriter(folder, class_names) as writer:   # predictions.csv and skipped.csv, flat memory
        writer.write(rows)
"""
from __future__ import annotations

import csv
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

TOPK = 5


# ---------------------------------------------------------------------------------- rows
def entropy(probs: Any) -> np.ndarray:
    """Shannon entropy of each row, in nats (0 = certain; log(num_classes) = uniform)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0, None)
    logs = np.log(np.where(p > 0, p, 1.0))
    return (-(p * logs).sum(axis=1)).astype(np.float32)


def csv_fields(num_classes: int, multilabel: bool = False) -> list[str]:
    """The columns of predictions.csv for a model of num_classes classes (a multi-label model's
    rows also list every label at or above its threshold, with its probability)."""
    k = min(TOPK, num_classes)
    tops = [f"top{i}_{what}" for i in range(1, k + 1) for what in ("class", "prob")]
    labels = ["labels", "label_probs"] if multilabel else []
    return ["path", *labels, "class", "prob", *tops, "entropy", "uncertain"]


def prediction_rows(paths: Sequence[str], probs: Any, class_names: Sequence[str],
                    conf_threshold: float = 0.5, thresholds: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """One row per image: the top-1 class and probability, the top-5 (or all, if fewer classes),
    the entropy, and `uncertain` (1 when the top probability is below conf_threshold).

    A multi-label model (`thresholds`: one per class): `labels` lists every class whose
    probability reaches its threshold ('|'-separated, most probable first) and `label_probs` their
    probabilities; the entropy is the mean of the classes' binary entropies; `uncertain` is 1 when
    no label reaches its threshold.

    Returns:
        Rows keyed by csv_fields(len(class_names), multilabel), plus `index` (top-1 class index).
    """
    probs = np.asarray(probs, dtype=np.float32)
    k = min(TOPK, probs.shape[1])
    top_i = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_p = np.take_along_axis(probs, top_i, axis=1)
    ent = entropy(probs) if thresholds is None else binary_entropy(probs)
    present = probs >= np.asarray(thresholds, dtype=np.float32) if thresholds is not None else None
    rows = []
    for n, path in enumerate(paths):
        row: dict[str, Any] = {"path": str(path), "index": int(top_i[n, 0]), "class": class_names[int(top_i[n, 0])],
                               "prob": float(top_p[n, 0])}
        for j in range(k):
            row[f"top{j + 1}_class"] = class_names[int(top_i[n, j])]
            row[f"top{j + 1}_prob"] = float(top_p[n, j])
        row["entropy"] = float(ent[n])
        row["uncertain"] = int(float(top_p[n, 0]) < conf_threshold)
        if present is not None:
            found = [c for c in np.argsort(-probs[n], kind="stable") if present[n, c]]
            row["labels"] = "|".join(class_names[c] for c in found)
            row["label_probs"] = "|".join(f"{probs[n, c]:.6f}" for c in found)
            row["label_indices"] = [int(c) for c in found]
            row["uncertain"] = int(not found)
        rows.append(row)
    return rows


def binary_entropy(probs: np.ndarray) -> np.ndarray:
    """The mean over classes of each class's binary entropy, in nats (a multi-label model's uncertainty)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    return (-(p * np.log(p) + (1 - p) * np.log(1 - p))).mean(axis=1).astype(np.float32)


class PredictionWriter:
    """Streams predictions.csv and skipped.csv, and keeps only what the summary needs
    (the first rows and per-class counts), so memory does not grow with the number of images.

    Args:
        folder: the predict folder.
        class_names: the model's classes.
        keep_rows: how many first rows to keep for the console table.
    """

    def __init__(self, folder: Path, class_names: Sequence[str], keep_rows: int = 10, multilabel: bool = False) -> None:
        self.class_names = list(class_names)
        self.multilabel = multilabel
        self.fields = csv_fields(len(class_names), multilabel)
        self.keep_rows = keep_rows
        self.first_rows: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.uncertain: Counter[str] = Counter()
        self.rows = 0
        self.skipped = 0
        self.predictions_path = folder / "predictions.csv"
        self.skipped_path = folder / "skipped.csv"
        self._pred = self.predictions_path.open("w", newline="", encoding="utf-8")
        self._skip = self.skipped_path.open("w", newline="", encoding="utf-8")
        self._pred_csv = csv.DictWriter(self._pred, fieldnames=self.fields, extrasaction="ignore")
        self._skip_csv = csv.writer(self._skip)
        self._pred_csv.writeheader()
        self._skip_csv.writerow(["path", "reason"])

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            self._pred_csv.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
            for name in (row["labels"].split("|") if self.multilabel and row["labels"] else [] if self.multilabel
                         else [row["class"]]):
                self.counts[name] += 1
                self.uncertain[name] += int(row["uncertain"])
            if len(self.first_rows) < self.keep_rows:
                self.first_rows.append(row)
        self.rows += len(rows)
        self._pred.flush()

    def skip(self, items: Sequence[tuple[str, str]]) -> None:
        for path, reason in items:
            self._skip_csv.writerow([path, reason])
        self.skipped += len(items)
        self._skip.flush()

    def close(self) -> None:
        self._pred.close()
        self._skip.close()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------ drawing
def label_text(row: dict[str, Any]) -> str:
    """'class (probability)', with a mark when the prediction is uncertain."""
    return f"{row['class']} ({row['prob']:.2f})" + (" uncertain" if row.get("uncertain") else "")


def output_name(rel: Path, keep_formats: Sequence[str] = (".jpg", ".jpeg", ".png")) -> Path:
    """Where a drawn copy of `rel` goes: same name when its format is kept, else name + '.png'."""
    return rel if rel.suffix.lower() in keep_formats else rel.with_name(rel.name + ".png")


class BoundedWriter:
    """Runs image-saving jobs on a thread (PIL releases the GIL while encoding) with at most
    `limit` pending, so the pipeline overlaps drawing with inference without piling up images."""

    def __init__(self, limit: int = 256, threads: int = 1) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.pending: deque[Future] = deque()
        self.limit = limit

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while len(self.pending) >= self.limit:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(fn, *args))

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
