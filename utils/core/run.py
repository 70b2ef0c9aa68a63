"""The run folder: the names of a run's files, finding a run's model, and writing a run (one folder per
run, never another run's).

    folder = RunFolder("runs/exp")
    folder.best, folder.last, folder.args_file      # runs/exp/best.pt, last.pt, args.yaml ...
    RunFolder.checkpoint("runs/exp", "--save_path") # a run folder -> its best.pt (a --kfold run: its best fold's); a file -> itself
    path = increment_path("runs/exp")               # runs/exp if free, else runs/exp2, exp3 ... (claimed by mkdir)
    run = Run(path)                                 # every file of a training run is written through it (rank 0 only)
    run.write_yaml(RunFolder.ARGS, options)

A run never deletes another: an existing --save_path is incremented. Under torchrun only the main
process writes.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from utils.core.checkpoint import CheckpointWriter, atomic_save
from utils.core.distributed import broadcast_object, is_main_process
from utils.core.files import append_whole, atomic_write, atomic_write_text, remove_stale_temps
from utils.core.schema import Checkpoint

from utils.core.log import UserError

LOGGER = logging.getLogger(__name__)


class RunFolder:
    """A run folder of main.py and the names of its files (the one place that spells them).

    Args:
        path: the folder.
    """

    ARGS = "args.yaml"        # every resolved option of the run
    LABELS = "label.txt"      # class names in index order
    LOG = "train.log"         # one CSV row per epoch
    BEST = "best.pt"          # the weights that scored best (what metrice, predict, export and serve use)
    LAST = "last.pt"          # everything --resume needs
    SWA = "swa.pt"            # --swa's averaged weights
    EXPORT_DIR = "export"     # export.py's files
    PREDICT_DIR = "predict"   # predict.py's folders (predict/exp, exp2 ...)
    FEATURES_DIR = "features" # metrice.py --task features
    # main.py --kfold K: one sub-folder per fold (fold1 ... foldK, each a whole run folder) and, beside them:
    KFOLD = "kfold.json"      # the folds: K, seed, which training image is in which fold, the folds finished
    KFOLD_SUMMARY = "kfold_summary.csv"  # each metric per fold, and its mean and standard deviation
    OOF = "oof.csv"           # out-of-fold class probabilities of every training image: path,label,fold,<class>...
    FOLD_PREFIX = "fold"
    LABEL_ISSUES_DIR = "label_issues"  # metrice.py --task label_issues
    RESULTS = "results.json"  # in each metrice.py output folder: every metric it printed, machine-readable
    LR_FIND_CSV = "lr_find.csv"   # main.py --lr_find: step,lr,loss,smoothed of each optimizer update
    LR_FIND_PLOT = "lr_find.png"  # main.py --lr_find: the loss against the lr, the suggestion marked

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def args_file(self) -> Path:
        return self.path / self.ARGS

    @property
    def labels_file(self) -> Path:
        return self.path / self.LABELS

    @property
    def log_file(self) -> Path:
        return self.path / self.LOG

    @property
    def export_dir(self) -> Path:
        return self.path / self.EXPORT_DIR

    def fold(self, k: int) -> Path:
        """The folder of fold k (1-based) of a --kfold run."""
        return self.path / f"{self.FOLD_PREFIX}{k}"

    @property
    def is_kfold(self) -> bool:
        """Whether this is the parent folder of a main.py --kfold run."""
        return (self.path / self.KFOLD).is_file()

    def kfold_record(self) -> dict[str, Any]:
        """What kfold.json holds (utils.train.kfold writes it): k, seed, the training set, each image's
        fold, the folds finished with their metrics, and once all are, the best fold.

        Raises:
            UserError: the file cannot be read or is not such a record.
        """
        file = self.path / self.KFOLD
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{file}: cannot read the --kfold record ({getattr(err, 'strerror', None) or err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("k"), int):
            raise UserError(f"{file}: not the record of a main.py --kfold run (no fold count k)")
        return record

    @classmethod
    def model_folder(cls, path: str | Path, flag: str = "--save_path") -> Path:
        """The run folder whose model a folder names: itself, or for a --kfold run its best fold
        (the highest held-out --metrice; one model for deployment, as K folds are K times the compute),
        which is printed with the reason.

        Raises:
            UserError: a --kfold run whose folds are not all finished.
        """
        path = Path(path)
        if not cls(path).is_kfold:
            return path
        record = cls(path).kfold_record()
        best = record.get("best_fold")
        if not isinstance(best, dict):
            raise UserError(f"{flag} {path}: a --kfold run whose {record['k']} folds are not all finished: resume it with "
                            f"python main.py --save_path {path} --resume, or pass {flag} {cls(path).fold(1)} (one fold)")
        folder = cls(path).fold(int(best["fold"]))
        print(f"{flag} {path}: a --kfold run of {record['k']} folds; using its best fold, {folder.name} (held-out "
              f"{best['metric']} {best['value']:.4f}, {best['rule']}); pass {flag} {folder.parent / 'foldN'} for "
              "another", flush=True)
        return folder

    @classmethod
    def checkpoint(cls, path: str | Path, flag: str = "--save_path") -> Path:
        """The checkpoint a path names: a run folder's best.pt (a --kfold run's: its best fold's, see
        model_folder), or the file itself.

        Raises:
            UserError: nothing there, or a folder without best.pt (naming the flag, and the runs
                that hold one when the folder is a parent of runs).
        """
        path = Path(path)
        if path.is_dir():
            path = cls.model_folder(path, flag)
            best = path / cls.BEST
            if best.is_file():
                return best
            runs = sorted(str(p.parent) for p in path.glob(f"*/{cls.BEST}"))
            hint = f"; runs here: {', '.join(runs[:10])}" if runs else ""
            raise UserError(f"{flag} {path}: no {cls.BEST} in it: pass the run folder main.py wrote (its --save_path){hint}")
        if not path.exists():
            raise model_not_found(path, flag)
        return path


def nearby_runs(path: str | Path, limit: int = 10) -> list[Path]:
    """The run folders near a path that is not one: those in its parent folder, else in runs/ (main.py's
    default), newest first. A run folder holds best.pt, or is a --kfold run.

    Args:
        path: the path given for a run or model (runs/x, runs/exp/best.pt ...).
        limit: at most this many.
    """
    path = Path(path)
    for where in (path.parent, Path("runs")):
        if not where.is_dir():
            continue
        runs = [p for p in where.iterdir() if p.is_dir() and ((p / RunFolder.BEST).is_file() or RunFolder(p).is_kfold)]
        if runs:
            return sorted(runs, key=lambda p: (-p.stat().st_mtime, str(p)))[:limit]
    return []


def check_model_paths(paths: Sequence[str | Path], flag: str) -> None:
    """The run folders or model files a script was given exist (checked before the models load).

    Raises:
        UserError: the first that does not, naming the flag and the runs nearby (model_not_found).
    """
    for path in paths:
        if not Path(path).exists():
            raise model_not_found(path, flag)


def model_not_found(path: str | Path, flag: str) -> UserError:
    """The one line for a run or model path that does not exist: the flag, and the runs that do.

    Args:
        path: what was given.
        flag: the flag it was given to (--save_path, --weight ...).
    """
    runs = nearby_runs(path)
    where = (f"runs in {runs[0].parent}, newest first: {', '.join(map(str, runs))}" if runs
             else "no run beside it or in runs/ (main.py --save_path makes one)")
    return UserError(f"{flag} {path}: not found; pass a run folder of main.py (e.g. runs/exp) or a model file; {where}")


@contextlib.contextmanager
def claimed_run(save_path: str | Path, fresh: bool = True) -> Iterator[Run]:
    """The run folder a training run writes: `save_path` itself (a resumed run), or a fresh folder
    claimed now (runs/exp -> runs/exp2 ...) by the first process and told to the others. A fresh
    folder that is still empty when set-up fails is removed, so a mistake leaves nothing behind.

    Args:
        save_path: --save_path.
        fresh: claim a new folder (False: --resume writes into save_path).
    """
    path = Path(save_path)
    if fresh:  # the first process claims the folder; the others are told which
        path = broadcast_object(increment_path(path) if is_main_process() else None)
    print(f"run folder: {path}", flush=True)
    try:
        yield Run(path)
    except BaseException:
        if fresh and is_main_process() and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise


def increment_path(path: str | Path) -> Path:
    """Claim a fresh run folder: `path` if it does not exist, else path2, path3 ...

    The folder is created here (mkdir without exist_ok), so two runs started at once with the
    same --save_path never get the same folder, and an existing folder is never written into.
    """
    path = Path(path)
    stem = re.sub(r"\d+$", "", path.name) or path.name
    n = 1
    while True:
        candidate = path if n == 1 else path.with_name(f"{stem}{n}")
        if not candidate.exists():
            try:
                candidate.mkdir(parents=True)
                return candidate
            except FileExistsError:
                pass  # another process claimed it first
        n += 1


class Run(RunFolder):
    """A run folder being written; the one place through which a run writes files (only on the main process).

    Args:
        path: the folder (created if missing).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.main = is_main_process()
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.path)  # a checkpoint write cut short by a kill
        self._writer = CheckpointWriter()  # background checkpoint writes (save(..., background=True))
        self._tb = None
        self._tb_missing = False  # tensorboard is optional: once found missing, not tried again

    def write_yaml(self, name: str, data: dict[str, Any]) -> None:
        if self.main:
            atomic_write_text(self.path / name, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    def write_text(self, name: str, text: str) -> None:
        """Write a text file (kfold.json ...) atomically."""
        if self.main:
            atomic_write_text(self.path / name, text)

    def write_lines(self, name: str, lines: list[str]) -> None:
        if self.main:
            atomic_write_text(self.path / name, "".join(f"{ln}\n" for ln in lines))

    def write_csv(self, name: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Write a whole CSV file (header, then rows), atomically."""
        if not self.main:
            return
        out = io.StringIO(newline="")
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
        atomic_write_text(self.path / name, out.getvalue())

    def append_csv(self, name: str, row: dict[str, Any], fields: list[str]) -> None:
        """Append a row (the header first when the file is new), whole or not at all: a write the
        disk has no room for is cut back off and raises DiskFull."""
        if not self.main:
            return
        path = self.path / name
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
        if not path.exists():
            writer.writeheader()
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})
        append_whole(path, out.getvalue().encode("utf-8"))

    def save(self, name: str, ckpt: Checkpoint, background: bool = False, prepare: Callable[[Any], Any] | None = None) -> None:
        """Write a checkpoint atomically (on the main process only).

        Args:
            background: snapshot it now and write it in the checkpoint writer's thread
                (utils.core.checkpoint.CheckpointWriter) while the caller goes on; otherwise now, after
                the background writes given before it (so a later save is never overwritten by an earlier one).
            prepare: with `background`, what the writer's thread does to the snapshot before saving it.

        Raises:
            DiskFull, UserError: this write failed, or an earlier background one did.
        """
        if not self.main:
            return
        if background:
            self._writer.save(ckpt.to_dict(), self.path / name, prepare)
            return
        self._writer.wait()
        atomic_save(ckpt.to_dict(), self.path / name)

    def wait_saves(self) -> None:
        """Block until every background checkpoint write is on the disk (before reading one back, and at the end).

        Raises:
            DiskFull, UserError: one of them failed (its file is as it was before).
        """
        self._writer.wait()

    def savefig(self, fig: Any, name: str) -> None:
        """A matplotlib figure as a PNG (a Pillow image is saved as it is)."""
        if not self.main:
            return
        if hasattr(fig, "savefig"):
            atomic_write(self.path / name, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
        else:
            atomic_write(self.path / name, lambda tmp: fig.save(tmp, format="PNG", compress_level=1))

    def tensorboard(self) -> Any:
        """A TensorBoard SummaryWriter into the run folder (None on other ranks, and where the optional
        tensorboard package is missing: said once, and the run goes on with train.log and the PNGs)."""
        if self.main and self._tb is None and not self._tb_missing:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb_missing = True
                LOGGER.warning("TensorBoard logs are off: tensorboard is not installed (pip install 'tensorboard>=2.14'); "
                               "train.log and the curve PNGs are written as usual")
                return None
            self._tb = SummaryWriter(log_dir=str(self.path))
        return self._tb

    def close(self) -> None:
        """Close TensorBoard, and give back the checkpoint writer's buffers once its writes are done
        (they are waited for, and their failures raised, by wait_saves)."""
        self._writer.release()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
