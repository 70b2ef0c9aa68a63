"""Datasets given as list files instead of class folders: a CSV, or a text list of `path label` lines.

    train.csv                          train.txt (--list_sep: any whitespace by default)
    path,label                         images/cat_001.jpg cat
    images/cat_001.jpg,cat             images/dog_001.jpg dog
    images/dog_001.jpg,dog

    multi-label CSV (labels separated by | or spaces; --task_type multilabel is then inferred)
    path,labels
    img/0001.png,cat|sofa

Paths are relative to the list file's folder (absolute ones are kept). Labels are class names,
or class indices when a label file (--label_path, one name per line) gives the names. A row
whose file is missing or unreadable, whose label is unknown, or that repeats an earlier row's
file is skipped and reported with its line number, as a bad image of a class folder is.
Imports no torch: processing.py and the deployment tools read lists too.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from utils.core.log import UserError
from utils.core.task import MULTICLASS, MULTILABEL
from utils.data.decode import check_image_header
from utils.data.imageset import ImageSet, natural_key, read_label_file, samples_signature
from utils.data.scan_cache import ScanCache, gc_paused

LOGGER = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "image", "file", "filename")
LABEL_COLUMNS = ("label", "labels", "class", "classes")


def split_labels(text: str, multi: bool) -> list[str]:
    """The labels of one row: one label, or for a multi-label column several, split on '|' (or on
    whitespace when there is no '|')."""
    text = text.strip()
    if not multi:
        return [text] if text else []
    parts = text.split("|") if "|" in text else text.split()
    return [p.strip() for p in parts if p.strip()]


def read_rows(path: Path, sep: str | None = None) -> tuple[list[tuple[int, str, list[str]]], bool]:
    """The rows of a list file: (line number, image path as written, labels).

    Returns:
        (rows, multi): multi is True for a CSV whose label column is 'labels'/'classes' or where a
        row holds several labels separated by '|'.

    Raises:
        UserError: a CSV without a path or label column, an unreadable file.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"list file {path} cannot be read ({err})") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        path_col = next((c for c in PATH_COLUMNS if c in columns), None)
        label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
        if path_col is None or label_col is None:
            raise UserError(f"list file {path}: a CSV needs a header with a path column ({'/'.join(PATH_COLUMNS)}) and a "
                            f"label column ({'/'.join(LABEL_COLUMNS)}); its header is {reader.fieldnames}")
        names = {c.strip().lower(): c for c in reader.fieldnames or []}
        multi = label_col in ("labels", "classes")
        rows = []
        for line, row in enumerate(reader, start=2):
            value = (row.get(names[label_col]) or "")
            multi = multi or "|" in value
            rows.append((line, (row.get(names[path_col]) or "").strip(), value))
        return [(line, p, split_labels(v, multi)) for line, p, v in rows], multi
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        parts = raw.rsplit(sep, 1) if sep else raw.rsplit(None, 1)
        rows.append((line, parts[0].strip(), [parts[1].strip()] if len(parts) == 2 and parts[1].strip() else []))
    return rows, False


def label_names(rows: Sequence[tuple[int, str, list[str]]], label_path: str | Path | None) -> list[str]:
    """The class names of a training list: the label file's, else the labels found, naturally sorted."""
    if label_path and Path(label_path).is_file():
        return read_label_file(label_path)
    found = {label for _, _, labels in rows for label in labels}
    if not found:
        raise UserError("the list holds no labelled row")
    return sorted(found, key=natural_key)


def label_index(label: str, names: Sequence[str], by_name: dict[str, int]) -> int | None:
    """A label's class index: its name, or an index into the names (numeric labels with a label file)."""
    if label in by_name:
        return by_name[label]
    if label.isdigit() and int(label) < len(names) and not any(n.isdigit() for n in names):
        return int(label)
    return None


@gc_paused()
def scan_list(list_path: str | Path, class_names: Sequence[str] | None = None, label_path: str | Path | None = None,
              check_headers: bool = True, what: str = "dataset", use_cache: bool = True, sep: str | None = None) -> ImageSet:
    """The images and labels of a list file, as an ImageSet (root = the list's folder).

    Args:
        list_path: the CSV or text list.
        class_names: the model's classes (val/test); None to take them from label_path or the labels.
        label_path: a label file giving the class names (and the meaning of numeric labels).
        check_headers: open each image's header to skip non-images early.
        what: the split's name in messages.
        use_cache: reuse earlier header checks (utils.data.scan_cache.ScanCache).
        sep: the separator of a text list (None: any whitespace).

    Returns:
        The ImageSet; its task is multilabel when rows carry several labels.
    """
    list_path = Path(list_path)
    rows, multi = read_rows(list_path, sep)
    task = MULTILABEL if multi else MULTICLASS  # several labels per row: what the list says
    names = list(class_names) if class_names is not None else label_names(rows, label_path)
    by_name = {n: i for i, n in enumerate(names)}
    cache = ScanCache(list_path.parent) if use_cache and check_headers else None
    stamps: dict[str, tuple[int, int]] = {}
    samples: list[tuple[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    first_line: dict[str, int] = {}
    for line, written, labels in rows:
        where = f"{list_path} line {line}"
        path = (list_path.parent / written) if written and not Path(written).is_absolute() else Path(written)
        reason = _row_problem(path, written, labels, first_line, check_headers, cache, stamps)
        indices = [label_index(label, names, by_name) for label in labels]
        if reason is None and None in indices:
            reason = f"unknown label '{labels[indices.index(None)]}' (classes: {', '.join(names[:20])})"
        if reason:
            skipped.append((str(path), f"{where}: {reason}"))
            continue
        first_line[str(path.resolve())] = line
        samples.append((str(path), task.encode(indices)))
    if cache is not None:
        cache.save()
    if not samples:
        raise UserError(f"{what} list {list_path} has no usable row (first problem: "
                        f"{skipped[0][1] if skipped else 'it is empty'})")
    return ImageSet(root=list_path.parent, samples=samples, class_names=names, skipped=skipped,
                    signature=samples_signature(samples, stamps), cache=cache, task=task, source=list_path)


def _row_problem(path: Path, written: str, labels: list[str], first_line: dict[str, int], check_headers: bool,
                 cache: ScanCache | None, stamps: dict[str, tuple[int, int]]) -> str | None:
    """Why a row cannot be used, or None."""
    if not written:
        return "no image path"
    if not labels:
        return "no label"
    if not path.is_file():
        return f"file not found: {path}"
    earlier = first_line.get(str(path.resolve()))
    if earlier is not None:
        return f"the same image as line {earlier} (a duplicate row)"
    if not check_headers:
        return None
    if cache is None:
        return check_image_header(path)
    reason, stamps[str(path)] = cache.check(path)
    return reason


def write_list(path: Path, rows: Sequence[tuple[Path, Sequence[str]]], root: Path) -> None:
    """Write a list file of (image, labels) rows, image paths relative to `root` (the list's
    folder): a CSV (path,label or path,labels) or a text list of
    `path label` lines, by the file's suffix."""
    from utils.core.files import atomic_write_text

    def rel(p: Path) -> str:  # relative even outside root (../raw/cat/1.png): the two move together
        return Path(os.path.relpath(Path(p).absolute(), root.absolute())).as_posix()

    multi = any(len(labels) > 1 for _, labels in rows)
    if path.suffix.lower() == ".csv":
        import io

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "labels" if multi else "label"])
        writer.writerows([rel(p), "|".join(labels)] for p, labels in rows)
        atomic_write_text(path, out.getvalue())
    else:
        atomic_write_text(path, "".join(f"{rel(p)} {labels[0]}\n" for p, labels in rows))
