"""The run folder and checkpoints.

A run never deletes another: an existing, non-empty save_path is incremented (runs/exp ->
runs/exp2). Every file of a run is written through `Run`, which a distributed run restricts to
rank 0. Checkpoints are plain dicts of tensors and JSON-able values, written atomically, and
read back with torch.load(..., weights_only=True).
"""
from __future__ import annotations

import csv
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from utils.device import is_main_process
from utils.log import UserError

LOGGER = logging.getLogger(__name__)

FORMAT = "pytorch-classifier-ng/1"
TRAIN_LOG_FIELDS = ["epoch", "lr", "loss", "acc", "mean_acc", "test_loss", "test_acc", "test_mean_acc"]


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
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
        self._tb = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def write_yaml(self, name: str, data: dict[str, Any]) -> None:
        if self.main:
            (self.path / name).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")

    def write_lines(self, name: str, lines: list[str]) -> None:
        if self.main:
            (self.path / name).write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")

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

    def save(self, name: str, obj: dict[str, Any]) -> None:
        if self.main:
            atomic_save(obj, self.path / name)

    def savefig(self, fig: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        if self.main:
            fig.savefig(self.path / name, dpi=120, bbox_inches="tight")
        plt.close(fig)

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


def read_train_log(path: str | Path) -> list[dict[str, str]]:
    """The rows of a train.log CSV."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def truncate_train_log(path: str | Path, epochs_done: int) -> None:
    """Keep the header and the first `epochs_done` rows (a resumed run rewrites the later ones)."""
    path = Path(path)
    if not path.exists():
        return
    rows = [r for r in read_train_log(path) if int(r["epoch"]) <= epochs_done]
    fields = TRAIN_LOG_FIELDS + [k for k in (rows[0].keys() if rows else []) if k not in TRAIN_LOG_FIELDS]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------ checkpoints
def half_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with floating tensors in float16 (half the file size)."""
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in model.state_dict().items()}


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load a checkpoint of this toolkit safely (weights_only=True).

    Raises:
        UserError: missing file, unreadable file, or a file that is not one of ours.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated or pickled-object files all land here
        raise UserError(f"{what} {path} cannot be loaded safely ({str(err).splitlines()[0][:160]}); "
                        "is it a checkpoint written by this toolkit?") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{what} {path} was not written by this toolkit (no '{FORMAT}' format tag); "
                        "to start from foreign weights use main.py --weight FILE")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (float32, eval mode)."""
    from utils.registry import create_model

    model = create_model(ckpt["model_name"], ckpt["num_classes"], ckpt["image_channel"])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    return model.eval()
