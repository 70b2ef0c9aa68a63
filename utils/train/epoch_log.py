"""What each epoch of training tells a person: train.log, TensorBoard, the curve PNGs, the console table.

    log = EpochLog(run, epochs=100, extra_fields=["kd_loss"])
    log.write(EpochRecord(epoch=3, lr=1e-3, seconds=12.5, train=train, val=val, improved=True))
    draw = log.batch_drawer(class_names, mean, std, count=5)   # train_batch0.png ... in the first epoch

train.log is a CSV with one row per epoch (epoch,lr,loss,acc,mean_acc,test_loss,test_acc,
test_mean_acc[,kd_loss]); the curves are redrawn from it, so they always show the whole run,
resumed or not. Drawing them takes a second or two (matplotlib), so it stays off the training
path: they are drawn only when the time since the last drawing (at first: since the log was
made) is at least 100 times what that drawing took (at first: FIRST_DRAW_SECONDS), at most 1% of
the run, and when the run ends or stops (unless no epoch was written since the last drawing). A
run of short epochs gets its first curves after about a minute, or at its end; one of long epochs
after its first epoch. TensorBoard and train.log are written every
epoch. Everything goes through the run folder's `Run`, so only the main process writes.
"""
from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from prettytable import PrettyTable

from utils.core.files import atomic_write_text
from utils.core.run import Run, RunFolder
from utils.core.task import MULTICLASS, TaskType
from utils.draw.figures import plot_curves
from utils.draw.labels import batch_grid
from utils.train.trackers import Tracker, epoch_metrics

LOGGER = logging.getLogger(__name__)


def log_fields(task: TaskType = MULTICLASS) -> list[str]:
    """train.log's columns: epoch,lr,loss,acc,mean_acc,test_loss,test_acc,test_mean_acc (the task's two
    metrics: multilabel map, f1)."""
    first, second = task.log_metrics
    return ["epoch", "lr", "loss", first, second, "test_loss", f"test_{first}", f"test_{second}"]


CURVE_SHARE = 0.01  # at most this share of the run's time goes to redrawing loss.png, acc.png, lr.png
FIRST_DRAW_SECONDS = 0.6  # what a drawing is taken to cost before one was timed (about that on a 2-core CPU)


def read_train_log(path: str | Path) -> list[dict[str, str]]:
    """The rows of a train.log CSV."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def truncate_train_log(path: str | Path, epochs_done: int) -> None:
    """Keep the header and the first `epochs_done` rows (a resumed run rewrites the later ones)."""
    path = Path(path)
    if not path.exists():
        return
    with path.open(newline="", encoding="utf-8") as fh:
        fields = list(csv.DictReader(fh).fieldnames or log_fields())
    rows = [r for r in read_train_log(path) if int(r["epoch"]) <= epochs_done]
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())  # a kill or a full disk leaves the old rows, never none


@dataclass
class EpochRecord:
    """One finished epoch.

    Args:
        epoch: 1-based epoch number.
        lr: its learning rate.
        seconds: training + validation time.
        train: training metrics (loss, acc, mean_acc and extra terms such as kd_loss).
        val: validation metrics, or None without a val split.
        improved: it produced a new best.pt.
        notes: short remarks for the console title (head only, ...).
    """

    epoch: int
    lr: float
    seconds: float
    train: dict[str, float]
    val: dict[str, float] | None
    improved: bool
    notes: list[str] = field(default_factory=list)

    def row(self, metrics: tuple[str, str] = ("acc", "mean_acc")) -> dict[str, Any]:
        """The train.log row (metrics: its two metric columns)."""
        val = self.val or {}
        return {"epoch": self.epoch, "lr": self.lr, "loss": self.train["loss"], "test_loss": val.get("loss"),
                **{m: self.train[m] for m in metrics}, **{f"test_{m}": val.get(m) for m in metrics},
                "kd_loss": self.train.get("kd_loss")}


class EpochLog:
    """The per-epoch outputs of a run.

    Args:
        run: the run folder.
        epochs: the number of epochs the run trains (for the console title).
        extra_fields: train.log columns after the standard ones (e.g. kd_loss).
        val_label: how the validation row is labelled in the console ("val", "val (EMA)").
        task: the run's task type: its two metrics are train.log's columns (acc, mean_acc; multilabel: map, f1).
        tracker: an experiment tracker (utils.train.trackers) that also gets each epoch's metrics, or None.
    """

    def __init__(self, run: Run, epochs: int, extra_fields: Sequence[str] = (), val_label: str = "val",
                 task: TaskType = MULTICLASS, tracker: Tracker | None = None) -> None:
        self.run = run
        self.tracker = tracker  # --tracker: wandb or MLflow get each epoch's metrics too
        self.epochs = epochs
        self.metrics = task.log_metrics
        self.fields = log_fields(task) + list(extra_fields)
        self.val_label = val_label
        self.tb = run.tensorboard()
        self._drawn_at: float | None = time.monotonic()  # when the curves were last drawn (at first: now)
        self._draw_seconds = FIRST_DRAW_SECONDS          # how long that took (at first: a guess)
        self._rows = 0                        # train.log rows written by this process ...
        self._drawn_rows = 0                  # ... and how many of them the last drawing showed

    def resume(self, epochs_done: int) -> None:
        """Drop the rows of epochs a resumed run trains again."""
        if self.run.main:
            truncate_train_log(self.run.log_file, epochs_done)

    def write(self, record: EpochRecord) -> None:
        """Append the train.log row and the TensorBoard scalars, print the table, and redraw the
        curves when it is their turn (see the module's docstring)."""
        row = record.row(self.metrics)
        self.run.append_csv(RunFolder.LOG, row, self.fields)
        self._rows += 1
        if self.tb is not None:
            for key, value in row.items():
                if key != "epoch" and value is not None:
                    tag = key if key.startswith("test_") or key in ("lr", "kd_loss") else f"train_{key}"
                    self.tb.add_scalar(tag, value, record.epoch)
            self.tb.flush()
        if self.tracker is not None:
            self.tracker.log_metrics(epoch_metrics(row, record.seconds), step=record.epoch)
        self.print_table(record)
        self.draw_curves(force=False)

    def draw_curves(self, force: bool = True) -> None:
        """loss.png, acc.png and lr.png from train.log: when due, or with `force` now; either way
        not again if no row was written since the last drawing."""
        if not self.run.main or not self.run.log_file.exists():
            return
        now = time.monotonic()
        if self._drawn_at is not None and (self._rows == self._drawn_rows or
                                           not force and now - self._drawn_at < self._draw_seconds / CURVE_SHARE):
            return
        for name, fig in plot_curves(read_train_log(self.run.log_file), self.metrics).items():
            self.run.savefig(fig, name)
        self._drawn_at = time.monotonic()
        self._draw_seconds = self._drawn_at - now
        self._drawn_rows = self._rows

    def print_table(self, record: EpochRecord) -> None:
        """The epoch's PrettyTable: a row for train and one for val."""
        if not self.run.main:
            return
        first, second = self.metrics
        table = PrettyTable(["split", "loss", first, second])
        notes = "".join(f"  {n}" for n in record.notes)
        table.title = (f"epoch {record.epoch}/{self.epochs}  lr {record.lr:.3g}  {record.seconds:.1f}s{notes}"
                       + ("  * best" if record.improved else ""))
        table.add_row(["train", record.train["loss"], record.train[first], record.train[second]])
        if record.val:
            table.add_row([self.val_label, record.val["loss"], record.val[first], record.val[second]])
        table.float_format = ".4"
        print(table, flush=True)

    def batch_drawer(self, class_names: Sequence[str], mean: Sequence[float], std: Sequence[float],
                     count: int) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
        """A callback for the first epoch that saves the first `count` training batches as the model
        sees them (after augmentation and mixing) as train_batch<step>.png."""
        mean_t = torch.tensor(mean).view(1, -1, 1, 1) * 255.0
        std_t = torch.tensor(std).view(1, -1, 1, 1) * 255.0

        def draw(step: int, images: torch.Tensor, targets: torch.Tensor) -> None:
            if step >= count or not self.run.main:
                return
            pixels = (images.detach().float().cpu() * std_t + mean_t).clamp(0, 255).to(torch.uint8)
            if targets.ndim == 1:
                labels = [class_names[t] for t in targets.tolist()]
            else:  # mixed targets: the two classes with their shares
                top = targets.detach().float().cpu().topk(min(2, len(class_names)), dim=1)
                labels = [" ".join(f"{class_names[i]}:{v:.2f}" for v, i in zip(vals.tolist(), idx.tolist()) if v > 0.005)
                          for vals, idx in zip(top.values, top.indices)]
            self.run.savefig(batch_grid(pixels, labels, f"train batch {step}"), f"train_batch{step}.png")

        return draw

    def close(self) -> None:
        """Draw the final curves and close TensorBoard (also when the run stops early)."""
        self.draw_curves(force=True)
        self.run.close()
