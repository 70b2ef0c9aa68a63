"""Out-of-fold class probabilities: the one format main.py --kfold writes and metrice.py --task
label_issues reads (the run folder's oof.csv, RunFolder.OOF).

    table = OofTable(paths, labels, folds, probs, class_names)   # labels: class indices; folds: 1..K (0: not a fold)
    write_oof(run / RunFolder.OOF, table)
    table = read_oof(run / RunFolder.OOF)

One row per image: `path,label,fold,<class 1>,...,<class C>`, the label a class name, the
probabilities in label.txt's order. A probability is written with 7 significant digits.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.core.files import atomic_write_text
from utils.core.log import UserError

OOF_COLUMNS = ("path", "label", "fold")


@dataclass
class OofTable:
    """Each image's path, given class index, fold (1..K; 0 for images of no fold, e.g. a val split)
    and predicted class probabilities (N, C)."""

    paths: list[str]
    labels: np.ndarray
    folds: np.ndarray
    probs: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.folds = np.asarray(self.folds, dtype=np.int64)
        self.probs = np.asarray(self.probs, dtype=np.float64).reshape(len(self.paths), len(self.class_names))
        if not len(self.paths) == len(self.labels) == len(self.folds):
            raise ValueError("paths, labels and folds must have one entry per image")

    @classmethod
    def concat(cls, tables: Sequence[OofTable]) -> OofTable:
        """The rows of several tables of the same classes, in order."""
        names = tables[0].class_names
        return cls([p for t in tables for p in t.paths], np.concatenate([t.labels for t in tables]),
                   np.concatenate([t.folds for t in tables]), np.concatenate([t.probs for t in tables]), list(names))


def write_oof(path: str | Path, table: OofTable) -> None:
    """Write the table as CSV (atomically)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*OOF_COLUMNS, *table.class_names])
    for p, label, fold, probs in zip(table.paths, table.labels, table.folds, table.probs):
        writer.writerow([p, table.class_names[label], int(fold), *(f"{v:.7g}" for v in probs)])
    atomic_write_text(path, out.getvalue())


def read_oof(path: str | Path) -> OofTable:
    """Read a table write_oof wrote.

    Raises:
        UserError: the file is missing or is not such a table (naming the line).
    """
    path = Path(path)
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    except OSError as err:
        raise UserError(f"{path}: cannot read the out-of-fold probabilities ({err.strerror or err})") from None
    if not rows or tuple(rows[0][:3]) != OOF_COLUMNS or len(rows[0]) < 5:
        raise UserError(f"{path}: not an out-of-fold table (expected the header {','.join(OOF_COLUMNS)},<class names>)")
    names = rows[0][3:]
    index = {n: i for i, n in enumerate(names)}
    paths, labels, folds, probs = [], [], [], []
    for line, row in enumerate(rows[1:], start=2):
        try:
            if len(row) != len(names) + 3:
                raise ValueError(f"{len(row)} columns, expected {len(names) + 3}")
            labels.append(index[row[1]])
            folds.append(int(row[2]))
            probs.append([float(v) for v in row[3:]])
            paths.append(row[0])
        except (KeyError, ValueError) as err:
            raise UserError(f"{path} line {line}: {err if isinstance(err, ValueError) else f'unknown class {row[1]!r}'}") from None
    return OofTable(paths, np.array(labels, dtype=np.int64), np.array(folds, dtype=np.int64),
                    np.array(probs, dtype=np.float64).reshape(len(paths), len(names)), names)
