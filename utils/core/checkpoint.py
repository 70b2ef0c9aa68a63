"""Reading and writing checkpoint files: atomically, and only with torch.load(..., weights_only=True).

    ckpt = load_checkpoint("runs/exp/best.pt")      # a utils.core.schema.Checkpoint, checked field by field
    atomic_save(ckpt.to_dict(), "runs/exp/best.pt") # a temporary file beside it, then a rename

Checkpoints are plain dicts of tensors and JSON-able values: no pickled code is ever run. torch is
imported when a checkpoint is read or written, so the modules that import this one run without it.
The model a checkpoint describes is built by utils.models.weights.model_from_checkpoint.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.core.device import import_torch
from utils.core.files import atomic_write
from utils.core.log import UserError
from utils.core.schema import Checkpoint

if TYPE_CHECKING:  # torch is imported where a checkpoint is read or written: Run works without it
    import torch
    from torch import nn


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save into a temporary file beside `path`, then rename over it (never half a file).

    Raises:
        utils.core.files.DiskFull: no room for it (naming the size; `path` is as it was).
    """
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp), size=tensor_bytes(obj))


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """The bytes torch.save writes for the tensors in `obj` (dicts and lists walked; a storage
    shared by several tensors counted once, as torch.save writes it once)."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


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
