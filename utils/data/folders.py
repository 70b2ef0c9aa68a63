"""Splits given as folders of class folders: <root>/<class>/**/<image>.

    image_set = scan_folder("dataset/train")            # samples [(path, class index)], class names, skipped
    files, skipped = list_files(Path("img/"))           # every image file under a folder (predict.py)

Rules: class folders may have any names, ordered by a natural sort; pytorch-classifier's numbered
folders (0, 1, 2 ... plus a label.txt of names) still work. Hidden files and folders, non-image
files and unreadable images are skipped and reported (path and reason); an empty class folder is
an error naming it; a file reached twice through links counts once. A second scan of an unchanged
folder opens no image (utils.data.scan_cache). Imports only Pillow and numpy.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

from utils.core.log import UserError
from utils.data.decode import IMG_EXTENSIONS, check_image_header
from utils.data.imageset import ImageSet, natural_key, read_label_file, samples_signature
from utils.data.scan_cache import ScanCache, gc_paused


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


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
        raise UserError(f"{what} path is not a folder: {root} (a list file is read by utils.data.sources.scan_split)")
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
