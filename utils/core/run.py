"""The run folder: one folder per run, never another run's.

    path = increment_path("runs/exp")    # runs/exp if free, else runs/exp2, exp3 ... (claimed by mkdir)
    run = Run(path)                      # every file of the run is written through it (rank 0 only)
    run.write_yaml("args.yaml", options)

A run never deletes another: an existing --save_path is incremented. Under torchrun only the main
process writes.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

from utils.core.checkpoint import atomic_save
from utils.core.distributed import is_main_process
from utils.core.files import atomic_write, atomic_write_text, remove_stale_temps
from utils.core.schema import Checkpoint

if TYPE_CHECKING:  # torch is imported where a checkpoint is read or written: Run works without it
    pass


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


class Run:
    """A run folder; the one place through which a run writes files (only on the main process).

    Args:
        path: the folder (created if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.main = is_main_process()
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.path)  # a checkpoint write cut short by a kill
        self._tb = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def write_yaml(self, name: str, data: dict[str, Any]) -> None:
        if self.main:
            atomic_write_text(self.path / name, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    def write_lines(self, name: str, lines: list[str]) -> None:
        if self.main:
            atomic_write_text(self.path / name, "".join(f"{ln}\n" for ln in lines))

    def write_csv(self, name: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Write a whole CSV file (header, then rows)."""
        if not self.main:
            return
        with (self.path / name).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)

    def append_csv(self, name: str, row: dict[str, Any], fields: list[str]) -> None:
        """Append a row, writing the header first when the file is new."""
        if not self.main:
            return
        path = self.path / name
        new = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})

    def save(self, name: str, ckpt: Checkpoint) -> None:
        """Write a checkpoint atomically (on the main process only)."""
        if self.main:
            atomic_save(ckpt.to_dict(), self.path / name)

    def savefig(self, fig: Any, name: str) -> None:
        """A matplotlib figure as a PNG (a Pillow image is saved as it is)."""
        if not self.main:
            return
        if hasattr(fig, "savefig"):
            atomic_write(self.path / name, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
        else:
            atomic_write(self.path / name, lambda tmp: fig.save(tmp, format="PNG", compress_level=1))

    def tensorboard(self) -> Any:
        """A TensorBoard SummaryWriter into the run folder (None on other ranks)."""
        if self.main and self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path))
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
