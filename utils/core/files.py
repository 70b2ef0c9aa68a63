"""Writing files so that nothing is ever half-written, and cleaning up after a killed writer.

    atomic_write(path, lambda tmp: torch.save(obj, tmp))     # a temporary file beside, then os.replace
    atomic_write_text(path, json.dumps(info))
    remove_stale_temps(folder)                                # temporaries of writers that no longer run

Temporary files and folders are hidden and carry the writer's process id
(`.best.pt.tmp-<pid>-<random>`), so a later run can tell a temporary of a killed process from one
that is still being written. Files get the permissions the umask gives any new file (mkstemp
alone would make them private). This module imports nothing heavy (processing.py uses it).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

LOGGER = logging.getLogger(__name__)

_TEMP = re.compile(r"^\..*\.tmp-(\d+)-")


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporaries for `name`: '.<name>.tmp-<pid>-'."""
    return f".{name}.tmp-{os.getpid()}-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write `path` through `write(temporary path)` into a temporary file beside it, then rename
    it over `path`: readers see the old file or the new one, never half of one.

    Args:
        path: the file to write.
        write: writes the content to the path it is given.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8) atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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
