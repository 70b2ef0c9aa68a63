"""The run folder, and reading and writing checkpoints.

A run never deletes another: an existing save_path is incremented (runs/exp -> runs/exp2). Every
file of a run is written through `Run`, which a distributed run restricts to rank 0. Checkpoints
are utils.schema.Checkpoint objects stored as plain dicts of tensors and JSON-able values, written
atomically, and read back with torch.load(..., weights_only=True): no pickled code is ever run.
"""
from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

from utils.device import import_torch
from utils.distributed import is_main_process
from utils.files import atomic_write, atomic_write_text, remove_stale_temps
from utils.log import UserError
from utils.schema import Checkpoint

if TYPE_CHECKING:  # torch is imported where a checkpoint is read or written: Run works without it
    import torch
    from torch import nn

LOGGER = logging.getLogger(__name__)



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


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save into a temporary file beside `path`, then rename over it (never half a file)."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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


# ------------------------------------------------------------------------------ checkpoints
def half_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with floating tensors in float16 (half the file size)."""
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in model.state_dict().items()}


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> Checkpoint:
    """Load a checkpoint of this toolkit safely (weights_only=True) and check its schema.

    Raises:
        UserError: missing file, unreadable file, or a file that is not a complete checkpoint of ours.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    torch = import_torch(f"reading {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated or pickled-object files all land here
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()[0][:160]  # torch colours its message
        raise UserError(f"{what} {path} cannot be loaded safely ({first}); "
                        "is it a checkpoint written by this toolkit (pickled objects are never loaded)?") from None
    return Checkpoint.from_dict(data, f"{what} {path}")


def float_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict with its floating tensors in float32 (best.pt stores float16)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def model_from_checkpoint(ckpt: Checkpoint) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (float32, eval mode).

    Raises:
        UserError: the weights do not fit the architecture the checkpoint names.
    """
    from utils.registry import create_model
    from utils.train_state import load_module_state

    meta = ckpt.meta
    model = create_model(meta.model_name, meta.num_classes, meta.image_channel)
    try:
        load_module_state(model, float_weights(ckpt.model))
    except (RuntimeError, ValueError) as err:
        raise UserError(f"the weights of this checkpoint do not fit {meta.model_name} with {meta.num_classes} classes "
                        f"({str(err).splitlines()[0][:160]}): was the file edited or assembled by hand?") from None
    return model.eval()
