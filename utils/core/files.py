"""Writing files so that nothing is ever half-written, cleaning up after a killed writer, and the
two faults of an output folder: a full disk and a folder that cannot be written.

    atomic_write(path, lambda tmp: torch.save(obj, tmp), size)   # a temporary file beside, then os.replace
    atomic_write_text(path, json.dumps(info))
    remove_stale_temps(folder)                                # temporaries of writers that no longer run
    check_writable(Path("runs/exp/predict"), "--save_path")  # before any work: one line if it cannot be written

Temporary files and folders are hidden and carry the writer's process id
(`.best.pt.tmp-<pid>-<random>`), so a later run can tell a temporary of a killed process from one
that is still being written. Files get the permissions the umask gives any new file (mkstemp
alone would make them private). A write that the disk has no room for removes its temporary
(the file it replaces stays as it was) and raises DiskFull: one line naming the folder, the space
needed and the space free. This module imports nothing heavy (processing.py uses it).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from utils.core.log import UserError

LOGGER = logging.getLogger(__name__)

_TEMP = re.compile(r"^\..*\.tmp-(\d+)-")
# A write failed for want of space: OSErrors say so by their number; torch.save says so with a
# RuntimeError of its own ("iostream error"), so the free space left behind the failed write is checked too.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 1 << 20  # bytes: a write that failed with less than this free failed for want of space


def megabytes(size: int) -> str:
    """A size for people: '59.2 MB'."""
    return f"{size / 1e6:.1f} MB"


class DiskFull(UserError):
    """No room on the disk for a file: one line naming the folder, the space needed and free, and what to do.

    Args:
        path: the file that could not be written (the file it would have replaced is as it was).
        needed: its size in bytes when known beforehand, else how far the write came.
        free: bytes free in its folder once the temporary was removed.
        hint: what else to do or know (default: write to another disk, and run again).
        known: whether `needed` is the whole size (else a lower bound).
    """

    def __init__(self, path: Path, needed: int, free: int, hint: str = "", known: bool = True) -> None:
        self.path, self.needed, self.free, self.known = Path(path), needed, free, known
        need = f"{'about' if known else 'more than'} {megabytes(needed)}"
        more = f"at least {megabytes(needed - free)} more" if known and needed > free else "more"
        super().__init__(f"the disk is full: {self.path.name} needs {need} in {self.path.parent} and {megabytes(free)} "
                         f"are free: free {more} there; " + (hint or "or write to another disk; then run again"))

    def with_hint(self, hint: str) -> "DiskFull":
        """The same fault with another 'what else to do or know'."""
        return DiskFull(self.path, self.needed, self.free, hint, self.known)


def _no_space(err: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for want of space (its temporary still in place)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporaries for `name`: '.<name>.tmp-<pid>-'."""
    return f".{name}.tmp-{os.getpid()}-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None], size: int | None = None, durable: bool = False) -> None:
    """Write `path` through `write(temporary path)` into a temporary file beside it, then rename
    it over `path`: readers see the old file or the new one, never half of one.

    Args:
        path: the file to write.
        write: writes the content to the path it is given.
        size: how many bytes it will take, when known (named if the disk is full).
        durable: fsync the file before the rename and the folder after it, so that after a power
            cut or a kernel crash `path` is the old file or the whole new one (what a rename alone
            promises only while the machine stays up).

    Raises:
        DiskFull: the disk had no room for it (the temporary is removed, `path` is as it was).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    os.close(fd)
    written = -1  # how far a write that ran out of space came
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except Exception as err:
        if not _no_space(err, path.parent):
            raise
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if written >= 0:  # out of the except block: the writer's open file is closed, its space given back
        raise DiskFull(path, size or written, shutil.disk_usage(path.parent).free, known=bool(size))


def _fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's) data to the disk (a folder where the system cannot: skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if Path(path).is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if not Path(path).is_dir() or err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8, line ends as given: a CSV keeps its own) atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


def append_whole(path: str | Path, data: bytes) -> None:
    """Append `data` to `path` (made if missing) in one write: a write that fails (a full disk) is
    cut back off, so the file ends with whole lines only.

    Raises:
        DiskFull: the disk had no room for it.
    """
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as err:
            os.ftruncate(fd, start)
            if err.errno not in NO_SPACE_ERRNOS:
                raise
            raise DiskFull(path, len(data), shutil.disk_usage(path.parent).free) from None
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders in `folder` (not below) left by writers that were
    killed before they finished (their process no longer exists).

    Returns:
        What was removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        LOGGER.info("removed %d temporary file(s) left by an interrupted write in %s", len(removed), folder)
    return removed


def check_writable(folder: str | Path, flag: str, fix: str = "") -> None:
    """Check, before any work, that `folder` (or, while it does not exist, the folder it would be
    made in) can be written: a file is made there and removed.

    Args:
        folder: the output folder a script will write into.
        flag: the flag that chooses it, named in the error line.
        fix: what to do (default: choose a folder you can write to with `flag`).

    Raises:
        UserError: one line naming the folder, why (read-only file system, permission denied) and what to do.
    """
    folder = Path(folder)
    existing = folder
    while not existing.is_dir() and existing != existing.parent:
        if existing.exists():
            raise UserError(f"{flag}: {existing} is a file, so {folder} cannot be made: choose another folder")
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix("write-check"), dir=existing)
    except OSError as err:
        raise UserError(f"{flag}: cannot write in {existing} ({err.strerror}), where the results would go "
                        f"({folder}): " + (fix or f"pass a folder you can write to with {flag}")) from None
    os.close(fd)
    os.remove(probe)
