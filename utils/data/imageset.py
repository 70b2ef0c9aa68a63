"""The images of one split as the rest of the toolkit sees them, whatever they were read from.

    image_set.samples        # [(path, target)]: a class index, or a tuple of them for a multi-label set
    image_set.class_names    # in index order (a natural sort of the names: 2 < 10)
    report_skipped(image_set.skipped, "train set")   # what was left out, with the reason

The scanners (utils.data.folders, utils.data.lists; utils.data.sources chooses) all return an
ImageSet. Imports neither torch nor Pillow.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from utils.core.log import UserError
from utils.core.task import MULTICLASS, TaskType

if TYPE_CHECKING:
    from utils.data.scan_cache import ScanCache

LOGGER = logging.getLogger(__name__)


def natural_key(text: str) -> list[Any]:
    """Sort key where digit runs compare as numbers: 2 < 10, img2 < img10."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok.casefold()) for tok in re.split(r"(\d+)", text) if tok]


# ----------------------------------------------------------------------------- class folders
@dataclass
class ImageSet:
    """The images of one split: samples, class names and what was skipped.

    A sample's target is as its task type encodes it (utils.core.task): a class index, or for a
    multilabel set the sorted tuple of its class indices. A scanner sets the task its source says
    (a list with several labels per row: multilabel); a run re-encodes its splits once for the task
    it trains (`as_task`). `signature` identifies the samples with their sizes and modification times
    (it changes when a file is added, removed, relabelled or edited); `cache` holds values derived
    from them (the mean/std of the images), kept between runs.
    """

    root: Path
    samples: list[tuple[str, Any]]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    signature: str = ""
    cache: "ScanCache | None" = None
    task: TaskType = MULTICLASS
    source: Path | None = None  # what the split was read from when not `root` itself (a list file)

    @property
    def targets(self) -> list[Any]:
        return [t for _, t in self.samples]

    def class_counts(self) -> list[int]:
        """Images per class (for a multi-label set, images carrying each label)."""
        return self.task.class_counts(self.targets, len(self.class_names)).tolist()

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """The images at `indices` (in that order), the same files and classes: no file is copied.
        Its signature identifies the parent's files and the indices taken.

        Args:
            indices: positions in `samples`.
        """
        indices = [int(i) for i in indices]
        signature = (hashlib.sha1(f"{self.signature}:{indices}".encode()).hexdigest() if self.signature else "")
        return replace(self, samples=[self.samples[i] for i in indices], skipped=[], signature=signature)

    def as_task(self, task: TaskType, hint: str = "train it with --task_type multilabel") -> ImageSet:
        """The same images with their targets encoded for `task` (itself when they already are).

        Args:
            task: the task type the targets are for.
            hint: what to do when they do not fit it (the error's end).

        Raises:
            UserError: an image whose labels the task cannot take (several, for multiclass), naming it.
        """
        if task is self.task:
            return self
        samples = []
        for path, target in self.samples:
            try:
                samples.append((path, task.encode(self.task.labels(target))))
            except UserError as err:
                raise UserError(f"{path} (split {self.source or self.root}): {err}; {hint}") from None
        return replace(self, samples=samples, task=task)


def read_label_file(path: str | Path) -> list[str]:
    """Class names from a label.txt: one per line, in index order."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


def samples_signature(samples: Sequence[tuple[str, Any]], stamps: dict[str, tuple[int, int]]) -> str:
    """A hash of the samples with their labels, sizes and modification times."""
    text = "".join(f"{path}\0{target}\0{stamps.get(path)}\n" for path, target in samples)
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()


def report_skipped(skipped: Sequence[tuple[str, str]], what: str, limit: int = 20) -> None:
    """Log the skipped files (path and reason), the first `limit` in full."""
    if not skipped:
        return
    LOGGER.warning("%s: skipped %d file(s):", what, len(skipped))
    for path, reason in skipped[:limit]:
        LOGGER.warning("  %s: %s", path, reason)
    if len(skipped) > limit:
        LOGGER.warning("  ... and %d more", len(skipped) - limit)
