"""Images and class folders, without torch: finding the images of a split, and loading them correctly.

    image_set = scan_folder("dataset/train")           # samples [(path, class index)], class names, skipped
    img = load_image("cat.jpg", channels=3)            # 8-bit RGB, EXIF orientation applied

Rules:
- class folders may have any names; the class order is a natural sort of the names. The old
  pytorch-classifier layout (folders 0, 1, 2 ... plus a label.txt of names) still works.
- hidden files/folders, non-image files and unreadable images are skipped and reported
  (path and reason); an empty class folder is an error naming it.
- images: EXIF orientation applied, every PIL mode converted correctly, a decompression-bomb limit.

processing.py, the training data (utils.data), prediction and the deployment predictor all read
images through this module; it imports only Pillow and numpy.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.files import atomic_write_text
from utils.log import UserError

LOGGER = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
# Pillow's own default limit (~89 Mpx) only warns; here an image above the limit is refused.
MAX_IMAGE_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

def natural_key(text: str) -> list[Any]:
    """Sort key where digit runs compare as numbers: 2 < 10, img2 < img10."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok.casefold()) for tok in re.split(r"(\d+)", text) if tok]


# ----------------------------------------------------------------------------------- images
def load_image(path: str | Path, channels: int = 3) -> Image.Image:
    """Open an image file as 8-bit RGB (channels=3) or L (channels=1), orientation applied.

    Args:
        path: the image file.
        channels: 3 or 1.

    Returns:
        A loaded PIL image in mode RGB or L.

    Raises:
        OSError, ValueError, Image.DecompressionBombError, UnidentifiedImageError for bad files.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # turned in place: no copy of the pixels
    return to_mode(img, channels)


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (16-bit, float, palette, alpha, CMYK...) to 8-bit RGB or L."""
    target = "RGB" if channels == 3 else "L"
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif arr.size and arr.max() > 255:
            arr = arr / (65535.0 if arr.max() <= 65535 else arr.max()) * 255.0
        elif mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have no defined colour: composite onto white, as viewers show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
        mode = img.mode
    if mode == "1":
        img = img.convert("L")
    return img.convert(target) if img.mode != target else img


def check_image_header(path: Path) -> str | None:
    """Cheap check that a file is an image Pillow can read (header only).

    Returns:
        None when it looks readable, else the reason it is not.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
        if width < 1 or height < 1:
            return "image has no pixels"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"larger than the decompression-bomb limit of {MAX_IMAGE_PIXELS} pixels"
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except (OSError, ValueError, SyntaxError) as err:
        return f"unreadable image ({err})"
    return None


# ----------------------------------------------------------------------------- class folders
@dataclass
class ImageSet:
    """The images of one split: samples, class names and what was skipped.

    A sample's target is its class index, or for a multi-label set (`multilabel`) the tuple of
    its class indices. `signature` identifies the samples with their sizes and modification times
    (it changes when a file is added, removed, relabelled or edited); `cache` holds values derived
    from them (the mean/std of the images), kept between runs.
    """

    root: Path
    samples: list[tuple[str, Any]]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    signature: str = ""
    cache: "ScanCache | None" = None
    multilabel: bool = False

    @property
    def targets(self) -> list[Any]:
        return [t for _, t in self.samples]

    def class_counts(self) -> list[int]:
        """Images per class (for a multi-label set, images carrying each label)."""
        counts = [0] * len(self.class_names)
        for _, t in self.samples:
            for c in (t if isinstance(t, tuple) else (t,)):
                counts[c] += 1
        return counts


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


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


def _identity(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class FileStat(NamedTuple):
    """What one stat call tells the scan about a file (links followed)."""
    dev: int
    ino: int
    size: int
    mtime_ns: int


def walk_files(folder: Path, seen_dirs: set[tuple[int, int]] | None = None, cache: ScanCache | None = None
               ) -> tuple[list[tuple[str, FileStat | None]], list[tuple[str, str]]]:
    """All image files under `folder` with their stat, as list_files finds them (paths as strings:
    a scan of 100,000 files makes no Path objects and stats each file once). With a `cache`, an
    unchanged folder's listing comes from it (ScanCache.listing) and new listings go into it."""
    seen = set() if seen_dirs is None else seen_dirs
    images: list[tuple[str, FileStat | None]] = []
    skipped: list[tuple[str, str]] = []
    pending = [(os.fspath(folder), True)]
    while pending:
        current, top = pending.pop()
        try:
            st = os.stat(current)
            key = st.st_dev, st.st_ino
            if key in seen and not top:
                skipped.append((current, "a link to a folder that is scanned already (a symlink loop?): not read again"))
                continue
            seen.add(key)
            listing = cache.listing(current, st.st_mtime_ns) if cache is not None else None
            if listing is None:
                listing = _list_folder(current)
                if listing is None:
                    listing = _list_folder(current, with_links=True)
                elif cache is not None:
                    cache.put_listing(current, st.st_mtime_ns, listing)
        except OSError as err:
            skipped.append((current, f"folder cannot be read ({err.strerror or err})"))
            continue
        subfolders = []
        prefix = os.path.join(current, "")
        for name, kind in listing:
            path = prefix + name
            if kind == "f":
                try:
                    fst = os.stat(path)
                    images.append((path, FileStat(fst.st_dev, fst.st_ino, fst.st_size, fst.st_mtime_ns)))
                except OSError:
                    images.append((path, None))  # gone since the listing: reported when read
            elif kind == "d":
                subfolders.append(path)
            else:
                skipped.append((path, kind))
        pending.extend((sub, False) for sub in reversed(subfolders))
    return images, skipped


def _list_folder(folder: str, with_links: bool = False) -> list[list[str]] | None:
    """A folder's entries in natural order as [name, kind]: kind "f" an image file, "d" a folder,
    else why the entry is skipped. None (unless `with_links`) when it holds a symbolic link:
    where a link points can change without the folder changing, so such a listing is not cached."""
    with os.scandir(folder) as found:
        entries = sorted(found, key=lambda e: natural_key(e.name))
    listing = []
    for entry in entries:
        if not with_links and entry.is_symlink():
            return None
        try:
            is_dir = entry.is_dir()
            exists = is_dir or entry.is_file()
        except OSError:
            is_dir, exists = False, False
        suffix = os.path.splitext(entry.name)[1]
        if is_hidden(entry.name):
            kind = "hidden folder" if is_dir else "hidden file"
        elif not exists:
            kind = "broken link or not a regular file"
        elif is_dir:
            kind = "d"
        elif suffix.lower() not in IMG_EXTENSIONS:
            kind = f"not an image file ({suffix or 'no extension'})"
        else:
            kind = "f"
        listing.append([entry.name, kind])
    return listing


def list_files(folder: Path, seen_dirs: set[tuple[int, int]] | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """All image files under `folder` (recursive, naturally sorted: a folder's files, then its
    sub-folders), and the skipped entries.

    Symbolic links are followed, but each real folder is entered once (by device and inode): a
    link back up the tree (a loop) or a second link to a folder already scanned is reported, not
    read again.

    Args:
        folder: where to look.
        seen_dirs: folders (device, inode) not to enter again, shared by the calls of one scan
            (`folder` itself is entered even when listed).

    Returns:
        (image paths, [(path, reason), ...]) -- hidden entries, non-image files, broken links,
        unreadable folders and repeated folders are skipped.
    """
    files, skipped = walk_files(folder, seen_dirs)
    return [Path(p) for p, _ in files], skipped


def drop_repeated_files(paths: Sequence[str | Path], identities: Sequence[tuple[int, int] | None] | None = None
                        ) -> tuple[list, list[tuple[str, str]]]:
    """Each real file once: of the paths that reach the same file (symbolic or hard links), keep
    the one that is not reached through a link (else the first), and skip the others.

    Args:
        paths: the files, in order.
        identities: each file's (device, inode) when known (None: stat'ed here).

    Returns:
        (paths kept, in their order; [(path, reason), ...] for the others).
    """
    if identities is not None and None not in identities and len(set(identities)) == len(paths):
        return list(paths), []  # every file once, as the scan's own stats tell
    groups: dict[tuple[int, int], list[int]] = {}
    for i, path in enumerate(paths):
        known = identities[i] if identities is not None else None
        try:
            groups.setdefault(known or _identity(path), []).append(i)
        except OSError:
            groups.setdefault((-1, i), []).append(i)
    if len(groups) == len(paths):
        return list(paths), []  # no file reached twice: the common case, with no further file-system call
    keep: set[int] = set()
    skipped: list[tuple[str, str]] = []
    for members in groups.values():
        if len(members) == 1:
            keep.add(members[0])
            continue
        direct = [i for i in members if os.path.realpath(paths[i]) == os.path.abspath(paths[i])]
        chosen = direct[0] if direct else members[0]
        keep.add(chosen)
        skipped.extend((str(paths[i]), f"the same file as {paths[chosen]} (linked twice): counted once") for i in members
                       if i != chosen)
    return [p for i, p in enumerate(paths) if i in keep], skipped


def read_label_file(path: str | Path) -> list[str]:
    """Class names from a label.txt: one per line, in index order."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


def class_folders(root: Path) -> list[str]:
    """Names of the visible sub-folders of `root`, naturally sorted."""
    return sorted((p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)), key=natural_key)


def resolve_class_names(folders: list[str], label_path: str | Path | None) -> tuple[list[str], dict[str, int]]:
    """Decide the class names and which folder holds which index.

    Folder names in natural order are the class names, unless the folders are pytorch-classifier's
    numbered ones (0, 1, 2 or 00, 01 ...) and a label.txt lists a name per index.

    Returns:
        (class_names, {folder name: class index})
    """
    numbered = bool(folders) and all(f.isdigit() for f in folders)
    if numbered and label_path and Path(label_path).is_file():
        names = read_label_file(label_path)
        idx = {f: int(f) for f in folders}
        if max(idx.values()) < len(names) and names != [str(i) for i in range(len(names))]:
            return names, idx
    return list(folders), {f: i for i, f in enumerate(folders)}


def map_class_folders(root: Path, folders: list[str], class_names: Sequence[str] | None, label_path: str | Path | None,
                      what: str) -> tuple[list[str], dict[str, int]]:
    """The class names and each folder's class index: from the folders (and a label.txt) when
    `class_names` is None, else the folders are matched to the model's classes by name (or by
    number in the old numbered layout).

    Raises:
        UserError: a folder that is not one of `class_names`.
    """
    if class_names is None:
        return resolve_class_names(folders, label_path)
    names = list(class_names)
    by_name = {n: i for i, n in enumerate(names)}
    folder_index = {}
    for f in folders:
        if f in by_name:
            folder_index[f] = by_name[f]
        elif f.isdigit() and int(f) < len(names):
            folder_index[f] = int(f)  # numbered folders of the old layout
        else:
            raise UserError(f"{what} {root} has a class folder '{f}' that the model does not know "
                            f"(its classes: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''})")
    return names, folder_index


def scan_class_folder(folder: Path, check_headers: bool = True, seen_dirs: set[tuple[int, int]] | None = None,
                      cache: ScanCache | None = None, stamps: dict[str, tuple[int, int]] | None = None
                      ) -> tuple[list[tuple[str, FileStat | None]], list[tuple[str, str]]]:
    """The readable images of one class folder (recursive, natural order) and the skipped files.

    Args:
        folder: the class folder.
        check_headers: open each file's header to skip non-images early.
        seen_dirs: folders already scanned (see list_files).
        cache: earlier header checks to reuse (and to add to).
        stamps: filled with each kept file's (size, mtime_ns) when a cache is given.

    Returns:
        ([(image path, its stat), ...], [(path, reason), ...]).
    """
    files, skipped = walk_files(folder, seen_dirs, cache)
    good = []
    for path, st in files:
        reason = None
        if check_headers and cache is not None:
            try:
                reason, stamp = cache.check(path, (st.size, st.mtime_ns) if st is not None else None)
            except OSError as err:
                reason, stamp = f"unreadable ({err.strerror or err})", (0, 0)
            if stamps is not None:
                stamps[path] = stamp
        elif check_headers:
            reason = check_image_header(Path(path))
        if reason:
            skipped.append((path, reason))
        else:
            good.append((path, st))
    return good, skipped


def scan_class_folders(root: Path, folders: Sequence[str], check_headers: bool = True, cache: ScanCache | None = None,
                       stamps: dict[str, tuple[int, int]] | None = None) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """The readable images of each class folder of `root`, each real file and folder once
    (links to the root, to a class folder or to a file already found are reported, not followed),
    and everything skipped -- hidden and stray entries of `root` included.

    Returns:
        ({folder: [image paths]}, [(path, reason), ...]).
    """
    ids = {f: _identity(root / f) for f in folders}
    seen_dirs = {_identity(root)} | set(ids.values())
    found: dict[str, list[tuple[str, FileStat | None]]] = {}
    skipped: list[tuple[str, str]] = []
    for i, f in enumerate(folders):
        if ids[f] == _identity(root) or ids[f] in [ids[g] for g in folders[:i]]:
            skipped.append((str(root / f), "a link to the split folder or to another class folder: not read"))
            found[f] = []
            continue
        found[f], skip = scan_class_folder(root / f, check_headers, seen_dirs, cache, stamps)
        skipped.extend(skip)
    order = [item for f in folders for item in found[f]]
    kept, repeated = drop_repeated_files([p for p, _ in order], [(st.dev, st.ino) if st else None for _, st in order])
    skipped.extend(repeated)
    if repeated:
        kept_set = set(kept)
        paths = {f: [p for p, _ in found[f] if p in kept_set] for f in folders}
    else:
        paths = {f: [p for p, _ in found[f]] for f in folders}
    for p in sorted(root.iterdir(), key=lambda q: natural_key(q.name)):
        if is_hidden(p.name):
            skipped.append((str(p), "hidden folder" if p.is_dir() else "hidden file"))
        elif not p.is_dir():
            skipped.append((str(p), "file outside the class folders"))
    return paths, skipped


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


@gc_paused()
def scan_folder(
    root: str | Path,
    class_names: Sequence[str] | None = None,
    label_path: str | Path | None = None,
    check_headers: bool = True,
    what: str = "dataset",
    use_cache: bool = True,
) -> ImageSet:
    """Find the images of one split folder: root/<class>/**/image.

    Args:
        root: the split folder.
        class_names: the model's classes (for val/test); None to derive them from the folders.
        label_path: a pytorch-classifier label.txt, used when the folders are numbered.
        check_headers: open each file's header to skip non-images early.
        what: how the split is called in messages ("train set", "val set" ...).
        use_cache: reuse the header checks of an earlier scan of unchanged files (ScanCache).

    Returns:
        The ImageSet.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"{what} folder not found: {root} (split a dataset with processing.py, or pass the right path)")
    if not root.is_dir():
        raise UserError(f"{what} path is not a folder: {root} (a list file is read by utils.lists.scan_split)")
    folders = class_folders(root)
    if not folders:
        raise UserError(f"{what} folder {root} has no class folders: expected {root}/<class name>/<images>")
    names, folder_index = map_class_folders(root, folders, class_names, label_path, what)
    cache = ScanCache(root) if use_cache and check_headers else None
    stamps: dict[str, tuple[int, int]] = {}
    found, skipped = scan_class_folders(root, folders, check_headers, cache, stamps)
    samples: list[tuple[str, int]] = []
    for f in folders:
        if not found[f] and class_names is None:
            raise UserError(f"class folder {root / f} holds no readable images: add images or remove the folder")
        samples.extend((path, folder_index[f]) for path in found[f])
    if not samples:
        raise UserError(f"{what} folder {root} holds no readable images")
    if cache is not None:
        cache.save(keep=set(stamps) | {p for p, _ in skipped})
    return ImageSet(root=root, samples=samples, class_names=names, skipped=skipped,
                    signature=samples_signature(samples, stamps), cache=cache)


def samples_signature(samples: Sequence[tuple[str, Any]], stamps: dict[str, tuple[int, int]]) -> str:
    """A hash of the samples with their labels, sizes and modification times."""
    text = "".join(f"{path}\0{target}\0{stamps.get(path)}\n" for path, target in samples)
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()


def report_skipped(skipped: Sequence[tuple[str, str]], what: str, limit: int = 20) -> None:
    """Log the skipped files (path and reason), the first `limit` in full."""
    if not skipped:
        return
    LOGGER.warning("%s: skipped %d file(s):", what, len(skipped))
    for path, reason in skipped[:limit]:
        LOGGER.warning("  %s: %s", path, reason)
    if len(skipped) > limit:
        LOGGER.warning("  ... and %d more", len(skipped) - limit)
