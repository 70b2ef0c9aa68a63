"""Prediction rows and where they go: predictions.csv streamed to disk, labelled copies of the images,
the server's JSON.

    rows = prediction_rows(paths, probs, class_names, meta.task_type)   # PredictionRow: top-5, entropy, uncertain, labels
    writer = PredictionWriter(folder, class_names, task=meta.task_type, total=n)   # predictions.csv, flat memory
    writer.write(rows)                                                  # each batch's rows, appended whole
    writer.finish(n)                                                    # complete: incomplete.txt removed
    rows[0].to_json()                                                   # what serve.py answers for the image

A row is typed once (PredictionRow) and each output serialises the same object.
"""
from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from utils.core.files import append_whole, atomic_write_text
from utils.core.task import MULTICLASS, MULTILABEL, TaskType

TOPK = 5
UNKNOWN = "unknown"  # the class an image of no trained class is given (--reject)
# Fast PNG compression for drawn copies: at the default level, encoding them is slower than predicting them.
SAVE_OPTIONS = {".png": {"compress_level": 1}, ".jpg": {"quality": 90}, ".jpeg": {"quality": 90}}


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
        unknown: with --reject: the image is of no trained class (its out-of-distribution score is
            above the model's threshold, utils.infer.ood); its outputs name it UNKNOWN, and `top`
            keeps the nearest trained classes. None without --reject.
        ood_score: with --reject: that score (higher = further from the training images).
    """

    path: str
    index: int
    class_name: str
    prob: float
    top: list[tuple[str, float]]
    entropy: float
    uncertain: bool
    labels: list[tuple[str, float]] | None = None
    unknown: bool | None = None
    ood_score: float | None = None

    @property
    def shown_class(self) -> str:
        """The class its outputs name: UNKNOWN for an image --reject rejects, else the top class."""
        return UNKNOWN if self.unknown else self.class_name

    def given(self) -> list[str]:
        """The classes this image was given: its labels (multilabel), else its top class (UNKNOWN
        for an image --reject rejects)."""
        if self.unknown:
            return [UNKNOWN]
        return [c for c, _ in self.labels] if self.labels is not None else [self.class_name]

    def csv_values(self) -> list[Any]:
        """The values of its predictions.csv row, in the order of csv_fields, probabilities with 6 decimals."""
        values: list[Any] = [self.path]
        if self.labels is not None:
            values += ["|".join(c for c, _ in self.labels), "|".join(f"{p:.6f}" for _, p in self.labels)]
        values += [self.shown_class, f"{self.prob:.6f}"]
        for name, p in self.top:
            values += [name, f"{p:.6f}"]
        values += [f"{self.entropy:.6f}", int(self.uncertain)]
        if self.unknown is not None:
            values += [int(self.unknown), f"{self.ood_score:.6f}"]
        return values

    def csv_row(self) -> dict[str, Any]:
        """Its row of predictions.csv by column (csv_fields)."""
        fields = csv_fields(len(self.top), MULTILABEL if self.labels is not None else MULTICLASS, self.unknown is not None)
        return dict(zip(fields, self.csv_values(), strict=True))

    def to_json(self) -> dict[str, Any]:
        """The JSON of one image (serve.py's answer); with --reject also `unknown` and `ood_score`, and
        an unknown image's class is UNKNOWN (`index`, `prob` and `top` stay the nearest trained class's)."""
        out: dict[str, Any] = {"file": self.path, "class": self.shown_class,
                               "index": self.index, "prob": self.prob,
                               "top": [{"class": c, "prob": p} for c, p in self.top], "entropy": self.entropy,
                               "uncertain": self.uncertain}
        if self.labels is not None:
            out["labels"] = [{"class": c, "prob": p} for c, p in self.labels]
        if self.unknown is not None:
            out |= {"unknown": bool(self.unknown), "ood_score": float(self.ood_score)}
        return out


def csv_fields(num_classes: int, task: TaskType = MULTICLASS, reject: bool = False) -> list[str]:
    """The columns of predictions.csv for a model of num_classes classes (a multilabel model's rows
    also list every class it was given, with its probability; with --reject, `unknown` and `ood_score`)."""
    tops = [f"top{i}_{what}" for i in range(1, min(TOPK, num_classes) + 1) for what in ("class", "prob")]
    labels = ["labels", "label_probs"] if task.multilabel else []
    return ["path", *labels, "class", "prob", *tops, "entropy", "uncertain", *(["unknown", "ood_score"] if reject else [])]


def prediction_rows(paths: Sequence[str], probs: Any, class_names: Sequence[str], task: TaskType = MULTICLASS,
                    conf_threshold: float = 0.5, thresholds: Sequence[float] | None = None,
                    ood: tuple[Any, Any] | None = None) -> list[PredictionRow]:
    """One row per image: the top-1 class and probability, the top-5 (or all, if fewer classes),
    the task's entropy and `uncertain`; for a multilabel model the classes at or above their
    thresholds (`thresholds`: the model's tuned ones, else 0.5 each); with `ood` (--reject: each
    image's score and unknown flag, utils.infer.ood.Rejector) `ood_score` and `unknown`.

    Returns:
        The rows, in the order of `paths`.
    """
    probs = np.asarray(probs, dtype=np.float32)
    k = min(TOPK, probs.shape[1])
    top_i = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_p = np.take_along_axis(probs, top_i, axis=1)
    uncertainty = task.uncertainty(probs).tolist()
    given = task.decide(probs, thresholds) if task.multilabel else None
    scores, unknown = (np.asarray(ood[0], dtype=np.float64).tolist(), np.asarray(ood[1], dtype=bool).tolist()) if ood is not None else (None, None)
    rows = []
    # .tolist() once per batch: the same Python floats as float() of each element, without a call per value
    for n, (path, indices, values) in enumerate(zip(paths, top_i.tolist(), top_p.tolist())):
        labels = None
        if given is not None:
            labels = [(class_names[c], float(probs[n, c])) for c in np.argsort(-probs[n], kind="stable") if given[n, c]]
        rows.append(PredictionRow(
            path=str(path), index=indices[0], class_name=class_names[indices[0]], prob=values[0],
            top=[(class_names[c], p) for c, p in zip(indices, values)], entropy=uncertainty[n],
            uncertain=not labels if labels is not None else values[0] < conf_threshold, labels=labels,
            unknown=unknown[n] if unknown is not None else None, ood_score=scores[n] if scores is not None else None))
    return rows


class PredictionWriter:
    """Streams predictions.csv and skipped.csv, and keeps only what the summary needs
    (the first rows and per-class counts), so memory does not grow with the number of images.

    Each batch's rows are appended in one write, so the files hold whole rows only. While the
    folder is being written it holds incomplete.txt; `finish` removes it when every image was
    predicted, or says in it (and lists in remaining.csv) what a stopped run left undone.

    Args:
        folder: the predict folder.
        class_names: the model's classes.
        keep_rows: how many first rows to keep for the console table.
        task: the model's task type (a multilabel model's rows list its labels).
        total: how many files will be predicted (for incomplete.txt).
        reject: the rows carry `unknown` and `ood_score` (predict.py --reject).
    """

    INCOMPLETE = "incomplete.txt"  # present while the folder is written, and after a run that did not finish
    REMAINING = "remaining.csv"    # a stopped run's files not predicted: a list predict.py --source takes

    def __init__(self, folder: Path, class_names: Sequence[str], keep_rows: int = 10, task: TaskType = MULTICLASS,
                 total: int = 0, reject: bool = False) -> None:
        self.class_names = [*class_names, *([UNKNOWN] if reject else [])]  # the names the summary counts
        self.fields = csv_fields(len(class_names), task, reject)
        self.keep_rows = keep_rows
        self.first_rows: list[PredictionRow] = []
        self.counts: Counter[str] = Counter()
        self.uncertain: Counter[str] = Counter()
        self.rows = 0
        self.skipped = 0
        self.incomplete = ""  # after finish(): what a stopped run wrote and how to finish it
        self.folder = Path(folder)
        self.predictions_path = self.folder / "predictions.csv"
        self.skipped_path = self.folder / "skipped.csv"
        atomic_write_text(self.folder / self.INCOMPLETE, (
            f"predict.py started writing this folder at {time.strftime('%Y-%m-%d %H:%M:%S')} to predict {total} files.\n"
            "While this file is here the folder is incomplete: if no predict.py is running, it was killed before the "
            "end, and predictions.csv holds whole rows for the images predicted until then; run predict.py again.\n"))
        atomic_write_text(self.predictions_path, _csv_text([], self.fields, header=True))
        atomic_write_text(self.skipped_path, _csv_text([], ["path", "reason"], header=True))

    def write(self, rows: Sequence[PredictionRow]) -> None:
        """Append a batch's rows (one write: whole rows, or none when the disk is full)."""
        append_whole(self.predictions_path, _csv_lines([row.csv_values() for row in rows], len(self.fields)).encode("utf-8"))
        given = [row.given() for row in rows]
        self.counts.update(name for names in given for name in names)
        self.uncertain.update(name for row, names in zip(rows, given) if row.uncertain for name in names)
        for name in self.counts.keys() - self.uncertain.keys():  # a class given, none of it uncertain: 0
            self.uncertain[name] = 0
        self.first_rows += rows[: max(0, self.keep_rows - len(self.first_rows))]
        self.rows += len(rows)

    def skip(self, items: Sequence[tuple[str, str]]) -> None:
        """Append files that were not predicted, with the reason."""
        if items:
            append_whole(self.skipped_path, _csv_text([{"path": p, "reason": r} for p, r in items],
                                                      ["path", "reason"]).encode("utf-8"))
        self.skipped += len(items)

    def finish(self, total: int, remaining: Sequence[str] = (), stopped_by: str = "") -> None:
        """Close the folder's record: complete (incomplete.txt removed), or stopped before `remaining`,
        which remaining.csv lists; `incomplete` is then the line that says what was written and how
        to finish (incomplete.txt holds it too).

        Args:
            total: the files there were to predict.
            remaining: the files not reached (none: the run is complete).
            stopped_by: what stopped it (SIGTERM ...).
        """
        marker = self.folder / self.INCOMPLETE
        if not remaining:
            marker.unlink(missing_ok=True)
            return
        listed = self.folder / self.REMAINING
        atomic_write_text(listed, _csv_text([{"path": os.path.abspath(p), "label": ""} for p in remaining], ["path", "label"],
                                            header=True))
        line = (f"stopped by {stopped_by} after {total - len(remaining)} of {total} files: {self.predictions_path} holds "
                f"their {self.rows} rows and is incomplete ({marker.name}); the {len(remaining)} files left are listed "
                f"in {listed}: to finish, run predict.py again with --source {listed} and the same other flags")
        atomic_write_text(marker, line + "\n")
        self.incomplete = line

def _csv_lines(rows: Sequence[list[Any]], columns: int) -> str:
    """CSV lines of rows of values (csv_values), each `columns` long."""
    if any(len(values) != columns for values in rows):
        raise ValueError(f"a prediction row does not have the {columns} columns of predictions.csv")
    out = io.StringIO(newline="")
    csv.writer(out).writerows(rows)
    return out.getvalue()


def _csv_text(rows: Sequence[dict[str, Any]], fields: Sequence[str], header: bool = False) -> str:
    """CSV lines of `rows` (with a header line first when asked)."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(fields))
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# ------------------------------------------------------------------------------ drawing
def label_text(row: PredictionRow) -> str:
    """'class (probability)', with a mark when the prediction is uncertain; 'unknown (nearest: class
    probability)' for an image --reject rejects."""
    if row.unknown:
        return f"{UNKNOWN} (nearest: {row.class_name} {row.prob:.2f})"
    return f"{row.class_name} ({row.prob:.2f})" + (" uncertain" if row.uncertain else "")


def output_name(rel: Path, keep_formats: Sequence[str] = (".jpg", ".jpeg", ".png")) -> Path:
    """Where a drawn copy of `rel` goes: same name when its format is kept, else name + '.png'."""
    return rel if rel.suffix.lower() in keep_formats else rel.with_name(rel.name + ".png")


def save_annotated(path: str, text: str, dest: Path) -> None:
    """A copy of the image at `path` with `text` drawn on it, saved at `dest` (predict.py --save_images)."""
    from utils.data.decode import load_image
    from utils.draw.labels import annotate

    dest.parent.mkdir(parents=True, exist_ok=True)
    annotate(load_image(path, 3), text).save(dest, **SAVE_OPTIONS.get(dest.suffix.lower(), {}))


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
