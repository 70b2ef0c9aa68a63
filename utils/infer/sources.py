"""What predict.py's --source names: one image, a folder (recursive), a glob pattern, a list file, or
local tar shards (a folder of .tar files, a .tar, a glob or brace pattern of them: their image members).

    source = find_images("img/")          # files in natural order, what was skipped and why, the root
    relative_name(path, source.root)      # where an output for `path` goes (the source tree mirrored)
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from utils.core.log import UserError
from utils.data.decode import IMG_EXTENSIONS
from utils.data.folders import drop_repeated_files, list_files
from utils.data.imageset import natural_key
from utils.data.shards import expand_shards, names_shards, shard_images

GLOB_CHARS = ("*", "?", "[")


NOT_READ = ("http://", "https://", "s3://", "gs://", "pipe:", "hf:")  # URLs and datasets --source does not take
LIST_SUFFIXES = (".csv", ".txt", ".lst", ".list", ".tsv")  # --source given as a list of images (utils.data.lists)


# ------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """What --source names: the image files to predict, what was skipped, and the folder that
    output paths are made relative to."""

    files: list[Path]
    skipped: list[tuple[str, str]]
    root: Path


def find_images(source: str | Path) -> Source:
    """The image files of one file, a folder (recursive, natural order), a glob pattern, a list
    file (a CSV or text list of images, as main.py takes: its labels are ignored here), or local
    tar shards (their image members, 'SHARD#KEY.EXT').

    Hidden files and non-image files are listed as skipped; unreadable images are found later,
    when they are decoded.

    Raises:
        UserError: nothing exists at `source`, a glob matches nothing, or a URL or hf: dataset.
    """
    text = str(source)
    path = Path(text)
    if text.startswith(NOT_READ) and not path.exists():
        raise UserError(f"--source {text}: predict.py reads image files, folders, globs, list files and local tar shards, "
                        "not URLs or hf: datasets (download the images first; metrice.py scores a labelled hf: split)")
    if names_shards(text):  # the image members of local tar shards, 'SHARD#KEY.EXT' (utils.data.shards)
        return Source([Path(name) for name in shard_images(text)], [], expand_shards(text)[0].parent)
    if path.is_dir():
        files, skipped = list_files(path)
        files, repeated = drop_repeated_files(files)
        return Source(files, skipped + repeated, path)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:  # a list file (utils.data.lists): its images
        from utils.data.lists import read_rows

        rows, _ = read_rows(path)
        listed = [(line, path.parent / written if not Path(written).is_absolute() else Path(written))
                  for line, written, _ in rows if written]
        files = [p for _, p in listed if p.is_file()]
        if not files:  # notes, not a list: say so once rather than once per line
            first = f" (line {listed[0][0]}: {listed[0][1]} not found)" if listed else ""
            return Source([], [(str(path), f"not an image file, nor a list of existing images{first}")], path.parent)
        missing = [(str(p), f"{path} line {line}: file not found") for line, p in listed if not p.is_file()]
        files, repeated = drop_repeated_files(files)
        return Source(files, missing + repeated, path.parent)
    if path.is_file():
        if path.suffix.lower() not in IMG_EXTENSIONS:
            return Source([], [(str(path), f"not an image file ({path.suffix or 'no extension'})")], path.parent)
        return Source([path], [], path.parent)
    if any(ch in text for ch in GLOB_CHARS):
        matches = sorted(glob.glob(text, recursive=True), key=natural_key)
        if not matches:
            raise UserError(f"--source {text}: the pattern matches no file")
        files: list[Path] = []
        skipped: list[tuple[str, str]] = []
        for match in map(Path, matches):
            if match.is_dir():
                more, skip = list_files(match)
                files += more
                skipped += skip
            elif match.name.startswith("."):
                skipped.append((str(match), "hidden file"))
            elif match.suffix.lower() not in IMG_EXTENSIONS:
                skipped.append((str(match), f"not an image file ({match.suffix or 'no extension'})"))
            else:
                files.append(match)
        seen: set[Path] = set()
        files = [f for f in files if not (f in seen or seen.add(f))]  # a folder and its files may both match
        files, repeated = drop_repeated_files(files)
        skipped += repeated
        parents = [str(f.parent.resolve()) for f in files] or [os.getcwd()]
        return Source(files, skipped, Path(os.path.commonpath(parents)))
    raise UserError(f"--source {text}: no such file or folder (pass an image, a folder of images, or a quoted glob such as 'img/*.jpg')")


def relative_name(path: Path, root: Path) -> Path:
    """`path` relative to `root` (output files mirror the source tree), or its name when outside.
    Never a name that climbs out (`..`, a list's ../x.png): an output built from it stays in its
    folder, and never lands on a source image."""
    try:
        rel = path.relative_to(root)  # found under root as given: no file-system call
        if ".." not in rel.parts:
            return rel
    except ValueError:
        pass
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return Path(path.name)
