"""Hugging Face datasets and Parquet files as a split: `--train_path hf:PATH`.

    python main.py --train_path hf:data/digits/train --val_path hf:data/digits/validation
    python main.py --train_path "hf:hub/mnist/**/train-*.parquet" --image_column image --label_column label

PATH is a folder written by `Dataset.save_to_disk` (one split of a `DatasetDict.save_to_disk`
folder: PATH/SPLIT), a folder of Parquet files (searched recursively; one holding the Hub's
`SPLIT-00000-of-00001.parquet` files of several splits takes PATH/SPLIT for one of them), one
.parquet file, or a glob of them. Nothing is downloaded: the datasets package is told to stay offline.

A sample is named `hf:PATH#ROW` (`hf:PATH#COLUMN:ROW` when --image_column names another column
than the one the dataset's own default would give), so the loaders, the caches, audit's checks and
the reports read it like a file (utils.data.containers). `read_member` opens the dataset once per
process (the loader's workers included) and returns the row's encoded image bytes, never decoded
by the datasets package: a saved dataset through its memory-mapped Arrow files (random access
costs tens of microseconds), Parquet through pyarrow, one row group at a time, the last ones read
kept per process (MAX_CACHED_BYTES): a row group of the Hub's image datasets is 100 rows, so a
shuffled epoch reads each group once per row that lands in it unless the group is still cached.

The labels: a ClassLabel column gives the class names in its order; other values (ints or strings)
are the classes, naturally sorted; a column of lists makes a multi-label set. With the model's
class names (val, test) a label maps by name, and an integer without names by index.
`datasets` and `pyarrow` are optional (requirements/extras.txt); without them `hf:` says what to install.
"""
from __future__ import annotations

import bisect
import glob
import hashlib
import importlib
import io
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

from utils.core.log import UserError
from utils.core.task import MULTICLASS, MULTILABEL
from utils.data.containers import member_name
from utils.data.decode import HeaderError, read_header
from utils.data.imageset import ImageSet, natural_key, read_label_file
from utils.data.lists import label_index
from utils.data.scan_cache import ScanCache

LOGGER = logging.getLogger(__name__)

PREFIX = "hf:"
DEFAULT_IMAGE_COLUMN = "image"
INSTALL = "pip install 'datasets>=4.0' 'pyarrow>=15' (or pip install -r requirements/extras.txt)"
MAX_CACHED_BYTES = 64 << 20  # Parquet row groups kept per process
# The Hub's file names of a split: train-00000-of-00003.parquet
HUB_SPLIT_FILE = re.compile(r"^(?P<split>[A-Za-z][\w.]*?)-\d{5}-of-\d{5}\.parquet$")


def is_hf(path: str | Path) -> bool:
    """Whether a split path names a Hugging Face dataset or Parquet files (`hf:PATH`)."""
    return str(path).startswith(PREFIX)


def _package(name: str) -> Any:
    """datasets or pyarrow.parquet, imported offline; one line naming the install when missing."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read before datasets is imported: never the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.getLogger("datasets").setLevel(logging.WARNING)  # its import logs "JAX version ... available" at INFO
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise UserError(f"hf: splits need the datasets and pyarrow packages ({err}): {INSTALL}") from None


def _hub_splits(files: Sequence[Path]) -> dict[str, list[Path]]:
    """The Parquet files by the split their Hub file name says ({} when a file's name says none)."""
    splits: dict[str, list[Path]] = {}
    for f in files:
        found = HUB_SPLIT_FILE.match(f.name)
        if found is None:
            return {}
        splits.setdefault(found["split"], []).append(f)
    return splits


def _example_split(splits: Sequence[str], what: str) -> str:
    """The split to suggest: for a train split the one named train (or training), else the first."""
    if "train" in what:
        for name in ("train", "training"):
            if name in splits:
                return name
    return splits[0] if splits else "train"


def parquet_files(spec: str) -> list[Path]:
    """The Parquet files of PATH (without 'hf:'): a file, a folder (recursive), PATH/SPLIT of a folder
    of the Hub's split files, or a glob; [] when there are none."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.rglob("*.parquet"), key=lambda p: natural_key(str(p)))
    if path.parent.is_dir() and not glob.has_magic(spec):
        return _hub_splits(parquet_files(str(path.parent))).get(path.name, [])
    return sorted((Path(p) for p in glob.glob(spec, recursive=True) if p.endswith(".parquet")),
                  key=lambda p: natural_key(str(p)))


def exists(path: str | Path) -> bool:
    """Whether `hf:PATH` names something to read (a saved dataset, Parquet files)."""
    spec = str(path)[len(PREFIX):]
    return Path(spec).exists() or bool(parquet_files(spec))


class HfTable:
    """One split opened: a saved dataset (its Arrow files, memory-mapped) or Parquet files.

    Attributes:
        spec: PATH, as given after 'hf:'.
        kind: 'saved dataset' or 'Parquet'.
        features: the datasets Features (ClassLabel names, Image columns).
        columns: the column names.
        num_rows: rows in the split.
        files: the files read (their sizes and times make the signature).
    """

    def __init__(self, spec: str, what: str = "dataset") -> None:
        self.spec = spec
        path = Path(spec)
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            raise UserError(f"hf:{spec} is a DatasetDict with the splits {', '.join(splits)}: pass one of them, "
                            f"e.g. hf:{(path / _example_split(splits, what)).as_posix()}")
        self.groups: OrderedDict[tuple[int, int, str], Any] = OrderedDict()
        self.cached_bytes = 0
        if (path / "state.json").is_file():
            self._open_saved(path)
        else:
            self._open_parquet(spec, what)
        self.columns = list(self.features)

    def _open_saved(self, path: Path) -> None:
        datasets = _package("datasets")
        try:
            dataset = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as err:
            raise UserError(f"hf:{self.spec}: not a dataset saved with save_to_disk ({err})") from None
        self.kind, self.features, self.num_rows = "saved dataset", dataset.features, len(dataset)
        self.arrow = dataset.with_format("arrow")  # rows and columns as pyarrow, the indices mapping applied
        self.files = [Path(f["filename"]) for f in dataset.cache_files] + [path / "state.json"]

    def _open_parquet(self, spec: str, what: str) -> None:
        pq = _package("pyarrow.parquet")
        datasets = _package("datasets")
        self.files = parquet_files(spec)
        if not self.files:
            folder = Path(spec)
            splits = _hub_splits(parquet_files(spec)) if folder.is_dir() else {}
            hint = f" (its splits: {', '.join(f'hf:{folder.as_posix()}/{s}' for s in splits)})" if splits else ""
            raise UserError(f"hf:{spec}: no saved dataset (save_to_disk), .parquet file or folder of them there{hint}")
        splits = _hub_splits(self.files)
        if len(splits) > 1 and Path(spec).is_dir():
            raise UserError(f"hf:{spec} holds the Parquet files of several splits ({', '.join(sorted(splits))}): pass one, "
                            f"e.g. hf:{Path(spec).as_posix()}/{_example_split(sorted(splits), what)}")
        try:
            self.parquet = [pq.ParquetFile(f) for f in self.files]
        except (OSError, ValueError) as err:
            raise UserError(f"hf:{spec}: a Parquet file cannot be read ({err})") from None
        self.kind = "Parquet"
        self.features = datasets.Features.from_arrow_schema(self.parquet[0].schema_arrow)
        self.starts: list[int] = []  # the first row of each (file, row group), in order
        self.where: list[tuple[int, int]] = []
        rows = 0
        for i, f in enumerate(self.parquet):
            for g in range(f.metadata.num_row_groups):
                self.starts.append(rows)
                self.where.append((i, g))
                rows += f.metadata.row_group(g).num_rows
        self.num_rows = rows

    def column(self, name: str) -> list[Any]:
        """A whole column as Python values (the labels)."""
        if self.kind == "saved dataset":
            return self.arrow[name].to_pylist()
        return [v for f in self.parquet for v in f.read(columns=[name]).column(0).to_pylist()]

    def batches(self, name: str, size: int = 256) -> Iterator[list[Any]]:
        """A column in batches of rows, in row order (the image column, for the header checks)."""
        if self.kind == "saved dataset":
            for start in range(0, self.num_rows, size):
                yield self.arrow[start:start + size][name].to_pylist()
            return
        for f in self.parquet:
            for batch in f.iter_batches(batch_size=size, columns=[name]):
                yield batch.column(0).to_pylist()

    def cell(self, name: str, row: int) -> Any:
        """One row's value of a column (a Parquet row group read once, then kept while there is room)."""
        if self.kind == "saved dataset":
            return self.arrow[row][name][0].as_py()
        group = bisect.bisect_right(self.starts, row) - 1
        key = (*self.where[group], name)
        values = self.groups.get(key)
        if values is None:
            values = self.parquet[key[0]].read_row_group(key[1], columns=[name]).column(0)
            self.groups[key] = values
            self.cached_bytes += values.nbytes
            while self.cached_bytes > MAX_CACHED_BYTES and len(self.groups) > 1:
                self.cached_bytes -= self.groups.popitem(last=False)[1].nbytes
        else:
            self.groups.move_to_end(key)
        return values[row - self.starts[group]].as_py()

    def image_columns(self) -> list[str]:
        """The columns whose feature is an Image."""
        image_type = _package("datasets").Image
        return [c for c, f in self.features.items() if isinstance(f, image_type)]

    def signature(self) -> str:
        """The files read, with their sizes and modification times."""
        stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]
        return hashlib.sha1(repr(stats).encode("utf-8", "surrogateescape")).hexdigest()


_OPEN: dict[tuple[int, str], HfTable] = {}


def open_table(spec: str, what: str = "dataset") -> HfTable:
    """The split `hf:spec` opened once per process (a loader's workers each open their own); `what`
    names the split in messages."""
    key = (os.getpid(), spec)
    if key not in _OPEN:
        _OPEN[key] = HfTable(spec, what)
    return _OPEN[key]


def image_bytes(value: Any, table: HfTable) -> bytes | None:
    """The encoded image of a cell: an Image feature's {bytes, path}, raw bytes, or a path (relative
    ones against the dataset's folder too); None when the row has none."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None or isinstance(value, bytes):
        return value
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = Path(table.spec if Path(table.spec).is_dir() else Path(table.spec).parent) / path
    return path.read_bytes()


def read_member(container: str, member: str) -> bytes:
    """The encoded bytes of the image of row `member` ('ROW' or 'COLUMN:ROW') of `container` ('hf:PATH').

    Raises:
        OSError: no such row, or a row without an image, naming the split.
    """
    column, _, row = member.rpartition(":")
    try:
        table = open_table(container[len(PREFIX):])
        column = column or image_column(table, DEFAULT_IMAGE_COLUMN)
        if not row.isdigit() or int(row) >= table.num_rows:
            raise OSError(f"{container} has no row {row} (it holds {table.num_rows})")
        data = image_bytes(table.cell(column, int(row)), table)
    except UserError as err:
        raise OSError(str(err)) from None
    if data is None:
        raise OSError(f"{container} row {row}: no image in column '{column}'")
    return data


def image_column(table: HfTable, wanted: str) -> str:
    """The image column: `wanted`, else (for the default name) the one Image column there is.

    Raises:
        UserError: no such column, naming the columns there are.
    """
    if wanted in table.columns:
        return wanted
    images = table.image_columns()
    if wanted == DEFAULT_IMAGE_COLUMN and len(images) == 1:
        return images[0]
    raise UserError(f"hf:{table.spec} has no image column '{wanted}' (its columns: {', '.join(table.columns)}); "
                    "pass --image_column NAME")


def _holds_images(feature: Any) -> bool:
    """Whether a column's feature can hold encoded images: an Image, bytes or paths, or a {bytes, path} struct."""
    if isinstance(feature, _package("datasets").Image):
        return True
    if isinstance(feature, dict):
        return "bytes" in feature or "path" in feature
    return getattr(feature, "dtype", None) in ("binary", "large_binary", "string", "large_string")


def _check_image_column(table: HfTable, column: str, what: str) -> None:
    """Refuse an image column that holds something else (numbers, labels, lists) in one line.

    Raises:
        UserError: naming what the column holds and the columns that could hold images.
    """
    feature = table.features[column]
    if _holds_images(feature):
        return
    held = getattr(feature, "dtype", None) or type(feature).__name__
    images = [c for c, f in table.features.items() if _holds_images(f)]
    raise UserError(f"{what} hf:{table.spec}: column '{column}' holds {held}, not images; image columns: "
                    f"{', '.join(images) or 'none'} (pass --image_column NAME)")


def label_feature(table: HfTable, column: str) -> tuple[list[str] | None, bool]:
    """(the ClassLabel names of a label column or None, whether it holds lists of labels)."""
    datasets = _package("datasets")
    feature = table.features[column]
    multi = isinstance(feature, (getattr(datasets, "List", list), getattr(datasets, "Sequence", list), list))
    inner = feature[0] if isinstance(feature, list) else getattr(feature, "feature", feature) if multi else feature
    return (list(inner.names) if isinstance(inner, datasets.ClassLabel) else None), multi


def class_names_of(values: Sequence[Any], feature_names: list[str] | None, label_path: str | Path | None) -> list[str]:
    """A training split's class names: the ClassLabel's, a label file's (integer labels), else the labels found."""
    if feature_names is not None:
        return feature_names
    found = {v for labels in values for v in labels}
    if label_path and Path(label_path).is_file() and all(isinstance(v, int) for v in found):
        return read_label_file(label_path)
    if not found:
        raise UserError("the split holds no labelled row")
    return sorted((str(v) for v in found), key=natural_key)


def row_labels(table: HfTable, column: str) -> tuple[list[list[str]], list[str] | None, bool]:
    """Each row's labels as text (a ClassLabel's names; no label for a missing value or -1), the
    ClassLabel names, and whether the column holds lists (a multi-label split).

    Raises:
        UserError: no such column, naming the columns there are.
    """
    if column not in table.columns:
        raise UserError(f"hf:{table.spec} has no label column '{column}' (its columns: {', '.join(table.columns)}); "
                        "pass --label_column NAME")
    feature_names, multi = label_feature(table, column)
    rows = []
    for value in table.column(column):
        values = value if isinstance(value, list) else [value]
        if feature_names is not None:
            rows.append([feature_names[v] for v in values if v is not None and 0 <= v < len(feature_names)])
        else:
            rows.append([str(v) for v in values if v is not None and str(v) != ""])
    return rows, feature_names, multi


def bad_images(table: HfTable, column: str, cache: ScanCache | None) -> dict[int, str]:
    """The rows whose image header is unreadable, with the reason (kept in the scan cache by the
    files' signature: a second scan of unchanged files reads no image)."""
    key = f"hf_headers:v1:{table.signature()}:{column}"
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return {int(row): reason for row, reason in cached}
    bad: dict[int, str] = {}
    row = 0
    for values in table.batches(column):
        for value in values:
            try:
                data = image_bytes(value, table)
                if data is None:
                    bad[row] = f"no image in column '{column}'"
                else:
                    read_header(io.BytesIO(data))
            except HeaderError as err:
                bad[row] = str(err)
            except OSError as err:
                bad[row] = f"unreadable ({err})"
            row += 1
    if cache is not None:
        cache.put(key, sorted(bad.items()))
    return bad


def _unknown_label(label: str, names: Sequence[str], model: bool, what: str, root: str | Path, row: int) -> None:
    """Stop on a label outside the classes, as folders and shards do: one line, not one per row."""
    owner = "that the model does not know (its classes" if model else "outside the classes (they are"
    raise UserError(f"{what} {root} has class '{label}' (row {row}) {owner}: "
                    f"{', '.join(list(names)[:20])}{' ...' if len(names) > 20 else ''})")


def scan_hf(root: str | Path, class_names: Sequence[str] | None = None, label_path: str | Path | None = None,
            check_headers: bool = True, what: str = "dataset", use_cache: bool = True,
            image_column_name: str = DEFAULT_IMAGE_COLUMN, label_column: str = "label") -> ImageSet:
    """The images and labels of `hf:PATH`, as an ImageSet of `hf:PATH#ROW` samples.

    Args:
        root: 'hf:PATH'.
        class_names: the model's classes (val/test); None to take them from the split.
        label_path: class names of integer labels without ClassLabel names.
        check_headers: read each image's header to skip the unreadable ones.
        what: the split's name in messages.
        use_cache: keep the header checks and the mean/std in the scan cache.
        image_column_name: the column of the images.
        label_column: the column of the labels (a list per row: a multi-label split).

    Raises:
        UserError: no such PATH or column, datasets/pyarrow missing, no usable row.
    """
    spec = str(root)[len(PREFIX):]
    if not exists(root):
        raise UserError(f"{what} {root}: {spec} not found (pass hf:PATH of a dataset saved with save_to_disk, "
                        "a .parquet file, a folder or a glob of them)")
    table = open_table(spec, what)
    column = image_column(table, image_column_name)
    _check_image_column(table, column, what)
    if column != image_column_name:
        LOGGER.info("%s %s: no column '%s'; the images are its one Image column, '%s'", what, root, image_column_name, column)
    labels, feature_names, multi = row_labels(table, label_column)
    names = list(class_names) if class_names is not None else class_names_of(labels, feature_names, label_path)
    by_name = {n: i for i, n in enumerate(names)}
    cache = ScanCache(Path(spec)) if use_cache and check_headers else None
    bad = bad_images(table, column, cache) if check_headers else {}
    try:
        default = image_column(table, DEFAULT_IMAGE_COLUMN)
    except UserError:
        default = None
    prefix = "" if column == default else f"{column}:"
    task = MULTILABEL if multi else MULTICLASS
    samples: list[tuple[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for row, texts in enumerate(labels):
        name = member_name(f"{PREFIX}{spec}", f"{prefix}{row}")
        indices = [label_index(t, names, by_name) for t in texts]
        reason = bad.get(row) or ("no label" if not texts else None)
        if reason is None and None in indices:
            _unknown_label(texts[indices.index(None)], names, class_names is not None, what, root, row)
        if reason:
            skipped.append((name, f"row {row}: {reason}"))
        else:
            samples.append((name, task.encode(indices)))
    if not samples:
        raise UserError(f"{what} {root} has no usable row (first problem: {skipped[0][1] if skipped else 'it is empty'})")
    text = "".join(f"{n}\0{t}\n" for n, t in samples) + f"{table.signature()}\0{column}\0{label_column}"
    return ImageSet(root=Path(spec), samples=samples, class_names=names, skipped=skipped, cache=cache, task=task,
                    signature=hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest(), source=Path(str(root)))
