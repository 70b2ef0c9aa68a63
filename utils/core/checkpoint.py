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
from typing import TYPE_CHECKING, Any, Callable

from utils.core.device import import_torch
from utils.core.files import atomic_write
from utils.core.log import UserError
from utils.core.schema import Checkpoint

if TYPE_CHECKING:  # torch is imported where a checkpoint is read or written: Run works without it
    import torch
    from torch import nn


def atomic_save(obj: Any, path: str | Path, durable: bool = False) -> None:
    """torch.save into a temporary file beside `path`, then rename over it (never half a file).

    Args:
        durable: fsync before the rename (utils.core.files.atomic_write): a power cut leaves the old file or the new.

    Raises:
        utils.core.files.DiskFull: no room for it (naming the size; `path` is as it was).
    """
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp), size=tensor_bytes(obj), durable=durable)


def snapshot(obj: Any, buffers: dict[tuple, Any] | None = None, memo: dict[int, Any] | None = None,
             where: tuple = ()) -> Any:
    """A copy of `obj` that later training cannot change: dicts (as plain dicts), lists and tuples
    rebuilt, every tensor copied to a CPU tensor of its own (a tensor met twice is copied once, so
    torch.save still writes it once); other values (numbers, strings) are immutable.

    Args:
        obj: a checkpoint's dict (state_dicts, optimizer state, RNG states ...).
        buffers: CPU tensors of an earlier snapshot of the same layout, by their place in it, that no one
            reads any more: copied into instead of allocated (fresh memory costs page faults: 134 MB of
            resnet18 with AdamW took 0.5-1 s to copy fresh and 0.04 s into warm buffers here); the copies
            made are put in it for the next time.
        memo: tensors already copied, by id (for the recursion).
        where: obj's place in the whole (for the recursion).
    """
    import torch

    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) in memo:
            return memo[id(obj)]
        buf = buffers.get(where) if buffers is not None else None
        if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype or buf.layout != obj.layout:
            buf = obj.detach().to("cpu", copy=True)
        else:
            buf.copy_(obj.detach())
        if buffers is not None:
            buffers[where] = buf
        memo[id(obj)] = buf
        return buf
    if isinstance(obj, dict):
        return {k: snapshot(v, buffers, memo, (*where, k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [snapshot(v, buffers, memo, (*where, i)) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _write(obj: Any, path: Path, prepare: Callable[[Any], Any] | None) -> None:
    """The writer thread's work: prepare, then a durable atomic save."""
    atomic_save(prepare(obj) if prepare is not None else obj, path, durable=True)


class CheckpointWriter:
    """Writes checkpoint files in one background thread, in the order they were given, while training goes on.

    `save` takes a snapshot of the checkpoint (a copy of its tensors, on the caller's thread: what is
    written is the state at the call, whatever training does next) and hands it to the thread, which
    writes it with atomic_save(durable=True): a temporary file, fsync, rename. A file name is never
    half-written whatever stops the process; a kill leaves the previous file and a hidden temporary
    (removed by the next run, utils.core.files.remove_stale_temps). A save waits for the earlier save
    of the same file, so at most one snapshot per file is held. A write that failed is raised on the
    caller's thread by the next `save` or `wait` (a full disk as its DiskFull; any other error as one
    UserError line naming the file); a file whose write failed keeps its previous content.
    """

    def __init__(self) -> None:
        self._pool: Any = None
        self._pending: dict[Path, Any] = {}  # file -> the future of its latest write
        self._buffers: dict[Path, dict[tuple, Any]] = {}  # file -> its last snapshot's tensors, reused by the next

    def save(self, obj: Any, path: str | Path, prepare: Callable[[Any], Any] | None = None) -> None:
        """Snapshot `obj` now and write it to `path` in the background.

        Args:
            obj: the checkpoint's dict; its tensors may change as soon as this returns.
            path: the file.
            prepare: applied to the snapshot in the writer's thread before it is saved (e.g. halving the
                weights of best.pt), so that work stays off the caller's thread too; it must not change
                the snapshot in place.

        Raises:
            utils.core.files.DiskFull, UserError: an earlier background write failed.
        """
        from concurrent.futures import ThreadPoolExecutor

        path = Path(path)
        self._raise_failed()
        if path in self._pending:  # its snapshot's buffers are free once it is written
            self._result(path, self._pending.pop(path))
        copy = snapshot(obj, self._buffers.setdefault(path, {}))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending[path] = self._pool.submit(_write, copy, path, prepare)

    def wait(self) -> None:
        """Block until every write given so far is on the disk.

        Raises:
            utils.core.files.DiskFull, UserError: a write failed (the first of them; its file is as it was).
        """
        pending, self._pending = self._pending, {}
        first: BaseException | None = None
        for path, future in pending.items():
            try:
                self._result(path, future)
            except BaseException as err:  # noqa: BLE001 - every write is waited for; the first failure is raised
                first = first or err
        if first is not None:
            raise first

    def release(self) -> None:
        """Give back the snapshot buffers and the thread once the writes are done (the end of training);
        a later save starts afresh. Raises nothing: a failed write is raised by `wait`."""
        if any(not future.done() for future in self._pending.values()):
            return
        self._buffers.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _raise_failed(self) -> None:
        """Raise the failure of a write that already finished (said at the next save, not only at the end)."""
        for path, future in list(self._pending.items()):
            if future.done() and future.exception() is not None:
                del self._pending[path]
                self._result(path, future)

    @staticmethod
    def _result(path: Path, future: Any) -> None:
        err = future.exception()
        if err is None or isinstance(err, UserError):  # DiskFull says what and where already
            if err is not None:
                raise err
            return
        text = str(err).strip()
        why = getattr(err, "strerror", None) or (text.splitlines()[0][:160] if text else type(err).__name__)
        raise UserError(f"writing {path} failed ({why}); the previous {path.name} is intact: free the folder's disk "
                        "or fix its permissions, then continue the run with --resume") from err


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
