"""The datasets a split can be given as, behind one call: a folder of class folders, a list file,
WebDataset tar shards (local, or a URL: utils.data.stream), or a Hugging Face dataset / Parquet files (`hf:PATH`).

    train = scan_split("dataset/train")                               # a folder: <root>/<class>/<images>
    val = scan_split("lists/val.csv", class_names=train.class_names)  # a CSV or text list of path,label rows
    test = scan_split("shards/test/test-{000000..000003}.tar", class_names=train.class_names)  # local shards
    test = scan_split("hf:data/digits/test", reading=SourceOptions(label_column="digit"))
    reading = source_options(args, run_args)   # the flags of how to read a source, else the run's own

A new dataset format is one scanner that returns an ImageSet (utils.data.imageset) and one entry in
SOURCES; every script that reads a split (main.py, metrice.py, audit.py, export.py's parity and
calibration images) goes through scan_split, with the SourceOptions of its flags (or of the run's args.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from utils.data import hf
from utils.data.folders import scan_folder
from utils.data.imageset import ImageSet
from utils.data.lists import scan_list
from utils.data.shards import names_shards, scan_shards
from utils.data.stream import is_stream_url, local_split


@dataclass(frozen=True)
class SourceOptions:
    """How a split's source is read beyond its path (main.py, metrice.py and audit.py flags of the same names).

    Attributes:
        list_sep: the separator of a text list (None: any whitespace).
        image_column: the image column of an `hf:` split.
        label_column: the label column of an `hf:` split.
    """

    list_sep: str | None = None
    image_column: str = hf.DEFAULT_IMAGE_COLUMN
    label_column: str = "label"


def source_options(args: Any, run_args: Mapping[str, Any] | None = None) -> SourceOptions:
    """The SourceOptions of a script's options: each flag given, else the run's own (its args.yaml), else the default."""
    values = {}
    for name in ("list_sep", "image_column", "label_column"):
        value = getattr(args, name, None)
        if value is None and run_args:
            value = run_args.get(name)
        if value is not None:
            values[name] = value
    return SourceOptions(**values)


def split_exists(value: str | Path) -> bool:
    """Whether a --train_path/--val_path/--test_path value names something here: an existing path, an
    `hf:` dataset or Parquet files, a glob or brace pattern of local tar shards (checked when scanned), or a
    URL of shards (streamed or copied: utils.data.stream)."""
    if hf.is_hf(value):
        return hf.exists(value)
    return is_stream_url(value) or Path(value).exists() or names_shards(value)


@dataclass(frozen=True)
class SplitSource:
    """One way a split can be given.

    Attributes:
        name: how it is called in messages.
        matches: whether a --train_path / --val_path / --test_path value is of this kind (a Path; a
            pattern's text is kept: Path("a/*.tar"), Path("a/b-{0..3}.tar")).
        scan: (path, class_names, label_path, check_headers, what, use_cache, reading) -> ImageSet.
    """

    name: str
    matches: Callable[[Path], bool]
    scan: Callable[..., ImageSet]


def _scan_list(path: Path, class_names: Sequence[str] | None, label_path: str | Path | None, check_headers: bool,
               what: str, use_cache: bool, reading: SourceOptions) -> ImageSet:
    return scan_list(path, class_names=class_names, label_path=label_path, check_headers=check_headers, what=what,
                     use_cache=use_cache, sep=reading.list_sep)


def _scan_folder(path: Path, class_names: Sequence[str] | None, label_path: str | Path | None, check_headers: bool,
                 what: str, use_cache: bool, reading: SourceOptions) -> ImageSet:
    return scan_folder(path, class_names=class_names, label_path=label_path, check_headers=check_headers, what=what,
                       use_cache=use_cache)


def _scan_shards(path: Path, class_names: Sequence[str] | None, label_path: str | Path | None, check_headers: bool,
                 what: str, use_cache: bool, reading: SourceOptions) -> ImageSet:
    return scan_shards(path, class_names=class_names, label_path=label_path, what=what, use_cache=use_cache)


def _scan_hf(path: Path, class_names: Sequence[str] | None, label_path: str | Path | None, check_headers: bool,
             what: str, use_cache: bool, reading: SourceOptions) -> ImageSet:
    return hf.scan_hf(path, class_names=class_names, label_path=label_path, check_headers=check_headers, what=what,
                      use_cache=use_cache, image_column_name=reading.image_column, label_column=reading.label_column)


# First match wins; shards before lists (a .tar is a file too); the folder is last: a path that is nothing else is
# read (or refused) as a folder.
SOURCES: tuple[SplitSource, ...] = (
    SplitSource("tar shards", names_shards, _scan_shards),
    SplitSource("list file", Path.is_file, _scan_list),
    SplitSource("Hugging Face dataset or Parquet files", hf.is_hf, _scan_hf),
    SplitSource("folder of class folders", lambda path: True, _scan_folder),
)


def scan_split(root: str | Path, class_names: Sequence[str] | None = None, label_path: str | Path | None = None,
               check_headers: bool = True, what: str = "dataset", use_cache: bool = True,
               reading: SourceOptions | None = None) -> ImageSet:
    """The images of one split, from the first of SOURCES that matches `root`.

    Args:
        root: the split as given (a folder of class folders, a CSV or text list, hf:PATH, a folder of .tar
            shards, a .tar, a glob or a brace pattern of them, a URL of tar shards: copied once into the cache).
        class_names: the model's classes (val/test); None to take them from the split (train).
        label_path: class names of numbered class folders or of a list's numeric labels.
        check_headers: open each image's header to skip non-images early.
        what: how the split is called in messages ("train set" ...).
        use_cache: reuse the header checks of an earlier scan (utils.data.scan_cache).
        reading: how to read its source (a text list's separator, an hf: split's columns); None: the defaults.

    Returns:
        The ImageSet.
    """
    if is_stream_url(root):  # a URL split: copied once into the cache, then read as local shards; messages name the URL
        what = f"{what} {root}, copied into"
    root = Path(local_split(root))
    source = next(s for s in SOURCES if s.matches(root))
    return source.scan(root, class_names, label_path, check_headers, what, use_cache, reading or SourceOptions())
