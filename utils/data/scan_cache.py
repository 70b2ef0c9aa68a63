"""What a scan of a folder found, kept between runs (outside the data folder), so that a second
scan of a large folder opens no image and lists no unchanged folder.

    cache = ScanCache(Path("dataset/train"))
    reason, stamp = cache.check(path)        # the header check, from the cache when the file is unchanged
    cache.save()

Where it lives: cache_dir() ($PYTORCH_CLASSIFIER_CACHE, else ~/.cache/pytorch-classifier-ng; "off"
caches nothing).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from utils.core.files import atomic_write_text
from utils.data.decode import check_image_header

LOGGER = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where scans are cached: $PYTORCH_CLASSIFIER_CACHE, else $XDG_CACHE_HOME/pytorch-classifier-ng
    (~/.cache/pytorch-classifier-ng). Set PYTORCH_CLASSIFIER_CACHE=off to cache nothing."""
    chosen = os.environ.get("PYTORCH_CLASSIFIER_CACHE")
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pytorch-classifier-ng"


class ScanCache:
    """What the scan of a folder found, kept between runs so that a second scan of a large folder
    opens no image: the header check of each file keyed by (path, size, modification time), and
    values derived from the images (e.g. their mean/std) keyed by the caller.

    It also keeps the sorted listing of each folder keyed by the folder's modification time
    (which changes when an entry is added, removed or renamed), so that a second scan lists no
    folder again and only stats each file. Folders holding symbolic links, or changed in the last
    seconds before the scan, are always listed afresh.

    It lives outside the data folder (cache_dir()/scan/<hash of the folder's path>.json), so
    scanning never writes into the user's data. A file whose size or time changed is checked again.

    Args:
        root: the scanned folder.
    """

    VERSION = 2
    SETTLED_NS = 2_000_000_000  # a folder changed this recently may change again within its time stamp

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        base = cache_dir()
        self.enabled = str(base).lower() not in ("off", "0", "none")
        digest = hashlib.sha1(str(self.root).encode("utf-8", "surrogateescape")).hexdigest()[:20]
        self.path = base / "scan" / f"{digest}.json"
        self.files: dict[str, list[Any]] = {}
        self.dirs: dict[str, list[Any]] = {}
        self.derived: dict[str, Any] = {}
        self.visited: set[str] = set()
        self.started_ns = time.time_ns()
        self.changed = False
        if self.enabled:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("version") == self.VERSION and data.get("root") == str(self.root):
                    self.files, self.dirs = dict(data["files"]), dict(data["dirs"])
                    self.derived = dict(data.get("derived") or {})
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass  # no cache yet, or an unreadable one: scan afresh

    def listing(self, folder: str, mtime_ns: int) -> list[list[str]] | None:
        """The cached [name, kind] entries of `folder` if it is unchanged since (see walk_files)."""
        self.visited.add(folder)
        entry = self.dirs.get(folder)
        return entry[1] if entry is not None and entry[0] == mtime_ns else None

    def put_listing(self, folder: str, mtime_ns: int, entries: list[list[str]]) -> None:
        """Remember a folder's listing, unless the folder changed too recently to trust its time."""
        if self.started_ns - mtime_ns > self.SETTLED_NS:
            self.dirs[folder] = [mtime_ns, entries]
            self.changed = True

    def check(self, path: str | Path, stamp: tuple[int, int] | None = None) -> tuple[str | None, tuple[int, int]]:
        """The header check of `path` (None = readable), from the cache when the file is unchanged.

        Args:
            path: the file.
            stamp: its (size, mtime_ns) when the caller has stat'ed it already.

        Returns:
            (reason or None, (size, mtime_ns)).
        """
        if stamp is None:
            st = os.stat(path)
            stamp = (st.st_size, st.st_mtime_ns)
        key = str(path)
        entry = self.files.get(key)
        if entry is not None and entry[0] == stamp[0] and entry[1] == stamp[1]:
            return entry[2], stamp
        reason = check_image_header(Path(path))
        self.files[key] = [stamp[0], stamp[1], reason]
        self.changed = True
        return reason, stamp

    def get(self, key: str) -> Any:
        """A derived value stored under `key`, or None."""
        return self.derived.get(key)

    def put(self, key: str, value: Any) -> None:
        """Store a derived value (JSON-able) and write the cache."""
        self.derived[key] = value
        self.changed = True
        self.save()

    def save(self, keep: set[str] | None = None) -> None:
        """Write the cache if anything changed (keeping only the `keep` files and the folders
        visited by this scan, when `keep` is given)."""
        if keep is not None and set(self.files) - keep:
            self.files = {k: v for k, v in self.files.items() if k in keep}
            self.changed = True
        if keep is not None and set(self.dirs) - self.visited:
            self.dirs = {k: v for k, v in self.dirs.items() if k in self.visited}
            self.changed = True
        if not self.enabled or not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"version": self.VERSION, "root": str(self.root), "files": self.files,
                                                     "dirs": self.dirs, "derived": self.derived}))
            self.changed = False
        except OSError as err:  # a read-only home: scanning still works, only slower next time
            LOGGER.debug("scan cache not written (%s)", err)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (a scan of 100,000 files makes a few hundred thousand
    small objects and no cycles: the collector's passes over them were a third of a cached scan)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
