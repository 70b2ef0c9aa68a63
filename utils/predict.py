"""Prediction as a function of (models, images), and the streaming pieces predict.py is built from.

    ensemble = load_ensemble(["runs/exp"])                          # utils.ensemble: one or more models
    probs = predict_pil(ensemble, [load_image("cat.jpg")])          # numpy (1, num_classes), rows sum to 1
    rows = prediction_rows(["cat.jpg"], probs, ensemble.class_names)

A server calls `predict_pil` (or `Ensemble.predict` on batches it prepared with its InputPlan). For
folders, `PredictionLoader` decodes files in batches (in worker processes with workers > 0; any
mode, EXIF orientation applied); a file that fails to decode comes back as a failure with its
reason, never an exception, and `collate_predict` drops it from its batch. `PredictionWriter`
streams rows into a CSV so memory stays flat however many images there are. Everything here is
numpy and Pillow: no torch import.
"""
from __future__ import annotations

import csv
import glob
import logging
import math
import multiprocessing
import os
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from utils.ensemble import Ensemble, InputPlan
from utils.images import IMG_EXTENSIONS, check_image_header, drop_repeated_files, list_files, load_image, natural_key
from utils.log import UserError

LOGGER = logging.getLogger(__name__)

TOPK = 5
GLOB_CHARS = ("*", "?", "[")
LIST_SUFFIXES = (".csv", ".txt", ".lst", ".list", ".tsv")  # --source given as a list of images (utils.lists)


# ------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """What --source names: the image files to predict, what was skipped, and the folder that
    output paths are made relative to."""

    files: list[Path]
    skipped: list[tuple[str, str]]
    root: Path


def find_images(source: str | Path) -> Source:
    """The image files of one file, a folder (recursive, natural order), a glob pattern, or a list
    file (a CSV or text list of images, as main.py takes: its labels are ignored here).

    Hidden files and non-image files are listed as skipped; unreadable images are found later,
    when they are decoded.

    Raises:
        UserError: nothing exists at `source`, or a glob matches nothing.
    """
    text = str(source)
    path = Path(text)
    if path.is_dir():
        files, skipped = list_files(path)
        files, repeated = drop_repeated_files(files)
        return Source(files, skipped + repeated, path)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:  # a list file (utils.lists): its images
        from utils.lists import read_rows

        rows, _ = read_rows(path)
        listed = [(line, path.parent / written if not Path(written).is_absolute() else Path(written))
                  for line, written, _ in rows if written]
        files = [p for _, p in listed if p.is_file()]
        if not files:  # notes, not a list: say so once rather than once per line
            first = f" (line {listed[0][0]}: {listed[0][1]} not found)" if listed else ""
            return Source([], [(str(path), f"not an image file, nor a list of existing images{first}")], path.parent)
        missing = [(str(p), f"{path} line {line}: file not found") for line, p in listed if not p.is_file()]
        files, repeated = drop_repeated_files(files)
        return Source(files, missing + repeated, path.parent)
    if path.is_file():
        if path.suffix.lower() not in IMG_EXTENSIONS:
            return Source([], [(str(path), f"not an image file ({path.suffix or 'no extension'})")], path.parent)
        return Source([path], [], path.parent)
    if any(ch in text for ch in GLOB_CHARS):
        matches = sorted(glob.glob(text, recursive=True), key=natural_key)
        if not matches:
            raise UserError(f"--source {text}: the pattern matches no file")
        files: list[Path] = []
        skipped: list[tuple[str, str]] = []
        for match in map(Path, matches):
            if match.is_dir():
                more, skip = list_files(match)
                files += more
                skipped += skip
            elif match.name.startswith("."):
                skipped.append((str(match), "hidden file"))
            elif match.suffix.lower() not in IMG_EXTENSIONS:
                skipped.append((str(match), f"not an image file ({match.suffix or 'no extension'})"))
            else:
                files.append(match)
        seen: set[Path] = set()
        files = [f for f in files if not (f in seen or seen.add(f))]  # a folder and its files may both match
        files, repeated = drop_repeated_files(files)
        skipped += repeated
        parents = [str(f.parent.resolve()) for f in files] or [os.getcwd()]
        return Source(files, skipped, Path(os.path.commonpath(parents)))
    raise UserError(f"--source {text}: no such file or folder (pass an image, a folder of images, or a quoted glob such as 'img/*.jpg')")


def relative_name(path: Path, root: Path) -> Path:
    """`path` relative to `root` (output files mirror the source tree), or its name when outside."""
    try:
        return path.relative_to(root)  # found under root as given: no file-system call
    except ValueError:
        pass
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return Path(path.name)


# ------------------------------------------------------------------------------- inputs
def predict_pil(ensemble: Ensemble, images: Sequence[Image.Image], tta: bool = False) -> np.ndarray:
    """Probabilities of PIL images of any mode (EXIF orientation is the caller's: see
    utils.images.load_image). The one call a server needs.

    Returns:
        float32 numpy (N, num_classes), rows summing to 1 (the ensemble's combination for several models).
    """
    plan = ensemble.plan(tta)
    return ensemble.predict(plan.batch(images), plan)[0]


# ------------------------------------------------------------------------------- dataset
class PredictDataset:
    """Image files -> (inputs per geometry, view, index, failure reason).

    Args:
        files: image paths.
        plan: the input geometries of the models (Ensemble.plan).
        view: a transform whose uint8 output is kept for drawing (the model's centre view for
            Grad-CAM), or None.
        view_channels: channels of the view.
    """

    def __init__(self, files: Sequence[str | Path], plan: InputPlan, view: Any = None, view_channels: int = 3) -> None:
        self.files = [str(f) for f in files]
        self.plan = plan
        self.view = view
        self.view_channels = view_channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, Any, int, str | None]:
        path = self.files[index]
        try:
            channels = set(self.plan.channels) | ({self.view_channels} if self.view is not None else set())
            images = {c: load_image(path, c) for c in sorted(channels)}
            inputs = self.plan.inputs(images)
            view = self.view(images[self.view_channels]) if self.view is not None else None
        except Exception as err:  # noqa: BLE001 - any decoder failure means 'skip and report'
            reason = check_image_header(Path(path)) or f"cannot decode ({type(err).__name__}: {err})"
            return None, None, index, reason
        return inputs, view, index, None

    def load_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """The collated batch of these files (what a loader process returns)."""
        return collate_predict([self[i] for i in indices])


def collate_predict(batch: Sequence[tuple[Any, Any, int, str | None]]) -> dict[str, Any]:
    """Stack the decoded images (one batch per geometry); keep failures as (index, reason)."""
    good = [b for b in batch if b[0] is not None]
    groups = len(good[0][0]) if good else 0
    return {
        "inputs": [np.stack([b[0][g] for b in good]) for g in range(groups)],
        "views": np.stack([b[1] for b in good]) if good and good[0][1] is not None else None,
        "indices": [b[2] for b in good],
        "failed": [(b[2], b[3]) for b in batch if b[0] is None],
    }


class PredictionLoader:
    """Batches of a PredictDataset in file order. With workers > 0, batches are decoded in that
    many processes, at most 2 per worker ahead of the consumer (memory stays flat).

    Args:
        dataset: the files and their transforms.
        batch_size: images per batch.
        workers: decoding processes; 0 decodes in this process.
    """

    def __init__(self, dataset: PredictDataset, batch_size: int, workers: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.workers = workers

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def _chunks(self) -> Iterator[range]:
        for start in range(0, len(self.dataset), self.batch_size):
            yield range(start, min(start + self.batch_size, len(self.dataset)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.workers == 0:
            for chunk in self._chunks():
                yield self.dataset.load_batch(chunk)
            return
        chunks = self._chunks()
        with multiprocessing.get_context().Pool(self.workers) as pool:
            pending: deque[Any] = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(self.dataset.load_batch, (chunk,)))
                if len(pending) >= 2 * self.workers:
                    break
            while pending:
                batch = pending.popleft().get()
                chunk = next(chunks, None)
                if chunk is not None:
                    pending.append(pool.apply_async(self.dataset.load_batch, (chunk,)))
                yield batch


def prediction_loader(files: Sequence[str | Path], plan: InputPlan, batch_size: int, workers: int,
                      view: Any = None, view_channels: int = 3) -> PredictionLoader:
    """Batches of decoded images for prediction (in file order): {"inputs": one uint8 numpy batch
    per geometry of `plan`, "views", "indices" into `files`, "failed": [(index, reason)]}."""
    return PredictionLoader(PredictDataset(files, plan, view, view_channels), batch_size, workers)


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


def annotate(image: Image.Image, text: str, min_side: int = 128) -> Image.Image:
    """A copy of `image` (RGB) with `text` on a banner at the top; images smaller than min_side
    are enlarged (nearest neighbour) first so the text stays readable."""
    from utils.plots import load_font

    image = image.convert("RGB")
    short = min(image.size)
    if short < min_side:
        scale = math.ceil(min_side / short)
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    else:
        image = image.copy()
    size = max(10, min(image.size) // 14)
    font = load_font(size)
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 4)
    draw.rectangle((0, 0, min(image.width, box[2] + 2 * pad), box[3] + 2 * pad), fill=(0, 0, 0))
    draw.text((pad, pad), text, fill=(255, 255, 255), font=font)
    return image


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
