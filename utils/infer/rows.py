"""Prediction rows and where they go: predictions.csv streamed to disk, labelled copies of the images,
the server's JSON.

    rows = prediction_rows(paths, probs, class_names, meta.task_type)   # PredictionRow: top-5, entropy, uncertain, labels
    with PredictionWriter(folder, class_names, task=meta.task_type) as writer:   # predictions.csv, flat memory
        writer.write(rows)
    rows[0].to_json()                                                   # what serve.py answers for the image

A row is typed once (PredictionRow) and each output serialises the same object.
"""
from __future__ import annotations

import csv
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from utils.core.task import MULTICLASS, TaskType

TOPK = 5


# ---------------------------------------------------------------------------------- rows
@dataclass
class PredictionRow:
    """What a model says of one image: the one type predictions.csv, the console table, the drawn
    copies and the server's JSON are all made from.

    Attributes:
        path: the image (a file path, or an upload's name).
        index: the most probable class's index.
        class_name: the most probable class.
        prob: its probability.
        top: the TOPK most probable classes (all when fewer), as (class, probability), most probable first.
        entropy: the task's uncertainty in nats (utils.core.task.TaskType.uncertainty).
        uncertain: multiclass: the top probability is below --conf_threshold; multilabel: no class given.
        labels: multilabel only: every class at or above its threshold, as (class, probability),
            most probable first (None for multiclass).
    """

    path: str
    index: int
    class_name: str
    prob: float
    top: list[tuple[str, float]]
    entropy: float
    uncertain: bool
    labels: list[tuple[str, float]] | None = None

    def given(self) -> list[str]:
        """The classes this image was given: its labels (multilabel), else its top class."""
        return [c for c, _ in self.labels] if self.labels is not None else [self.class_name]

    def csv_row(self) -> dict[str, Any]:
        """The row of predictions.csv (columns: csv_fields), probabilities with 6 decimals."""
        row: dict[str, Any] = {"path": self.path}
        if self.labels is not None:
            row["labels"] = "|".join(c for c, _ in self.labels)
            row["label_probs"] = "|".join(f"{p:.6f}" for _, p in self.labels)
        row |= {"class": self.class_name, "prob": f"{self.prob:.6f}"}
        for j, (name, p) in enumerate(self.top, start=1):
            row[f"top{j}_class"], row[f"top{j}_prob"] = name, f"{p:.6f}"
        return row | {"entropy": f"{self.entropy:.6f}", "uncertain": int(self.uncertain)}

    def to_json(self) -> dict[str, Any]:
        """The JSON of one image (serve.py's answer)."""
        out: dict[str, Any] = {"file": self.path, "class": self.class_name, "index": self.index, "prob": self.prob,
                               "top": [{"class": c, "prob": p} for c, p in self.top], "entropy": self.entropy,
                               "uncertain": self.uncertain}
        if self.labels is not None:
            out["labels"] = [{"class": c, "prob": p} for c, p in self.labels]
        return out


def csv_fields(num_classes: int, task: TaskType = MULTICLASS) -> list[str]:
    """The columns of predictions.csv for a model of num_classes classes (a multilabel model's rows
    also list every class it was given, with its probability)."""
    tops = [f"top{i}_{what}" for i in range(1, min(TOPK, num_classes) + 1) for what in ("class", "prob")]
    labels = ["labels", "label_probs"] if task.multilabel else []
    return ["path", *labels, "class", "prob", *tops, "entropy", "uncertain"]


def prediction_rows(paths: Sequence[str], probs: Any, class_names: Sequence[str], task: TaskType = MULTICLASS,
                    conf_threshold: float = 0.5, thresholds: Sequence[float] | None = None) -> list[PredictionRow]:
    """One row per image: the top-1 class and probability, the top-5 (or all, if fewer classes),
    the task's entropy and `uncertain`; for a multilabel model the classes at or above their
    thresholds (`thresholds`: the model's tuned ones, else 0.5 each).

    Returns:
        The rows, in the order of `paths`.
    """
    probs = np.asarray(probs, dtype=np.float32)
    k = min(TOPK, probs.shape[1])
    top_i = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_p = np.take_along_axis(probs, top_i, axis=1)
    uncertainty = task.uncertainty(probs)
    given = task.decide(probs, thresholds) if task.multilabel else None
    rows = []
    for n, path in enumerate(paths):
        labels = None
        if given is not None:
            labels = [(class_names[c], float(probs[n, c])) for c in np.argsort(-probs[n], kind="stable") if given[n, c]]
        rows.append(PredictionRow(
            path=str(path), index=int(top_i[n, 0]), class_name=class_names[int(top_i[n, 0])], prob=float(top_p[n, 0]),
            top=[(class_names[int(c)], float(p)) for c, p in zip(top_i[n], top_p[n])], entropy=float(uncertainty[n]),
            uncertain=not labels if labels is not None else float(top_p[n, 0]) < conf_threshold, labels=labels))
    return rows


class PredictionWriter:
    """Streams predictions.csv and skipped.csv, and keeps only what the summary needs
    (the first rows and per-class counts), so memory does not grow with the number of images.

    Args:
        folder: the predict folder.
        class_names: the model's classes.
        keep_rows: how many first rows to keep for the console table.
        task: the model's task type (a multilabel model's rows list its labels).
    """

    def __init__(self, folder: Path, class_names: Sequence[str], keep_rows: int = 10, task: TaskType = MULTICLASS) -> None:
        self.class_names = list(class_names)
        self.fields = csv_fields(len(class_names), task)
        self.keep_rows = keep_rows
        self.first_rows: list[PredictionRow] = []
        self.counts: Counter[str] = Counter()
        self.uncertain: Counter[str] = Counter()
        self.rows = 0
        self.skipped = 0
        self.predictions_path = folder / "predictions.csv"
        self.skipped_path = folder / "skipped.csv"
        self._pred = self.predictions_path.open("w", newline="", encoding="utf-8")
        self._skip = self.skipped_path.open("w", newline="", encoding="utf-8")
        self._pred_csv = csv.DictWriter(self._pred, fieldnames=self.fields)
        self._skip_csv = csv.writer(self._skip)
        self._pred_csv.writeheader()
        self._skip_csv.writerow(["path", "reason"])

    def write(self, rows: Sequence[PredictionRow]) -> None:
        for row in rows:
            self._pred_csv.writerow(row.csv_row())
            for name in row.given():
                self.counts[name] += 1
                self.uncertain[name] += int(row.uncertain)
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
def label_text(row: PredictionRow) -> str:
    """'class (probability)', with a mark when the prediction is uncertain."""
    return f"{row.class_name} ({row.prob:.2f})" + (" uncertain" if row.uncertain else "")


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
