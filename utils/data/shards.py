"""WebDataset tar shards read from local files: which shards a split names, their member index, their
samples as an ImageSet, and one member's bytes.

    paths = expand_shards("dataset/train/train-{000000..000003}.tar")  # also a folder, a .tar, a glob
    image_set = scan_shards("dataset/train", what="train set")          # samples 'SHARD#00000012.jpg'
    data = read_member("dataset/train/train-000000.tar", "00000012.jpg")  # bytes (utils.data.containers)

The format (processing.py --write_shards writes it: utils.data.shard_writer): a sample is the members
KEY.EXT (the image's own bytes), KEY.cls (its class index as text; several, space-separated, for a
multi-label sample) and KEY.json ({"path": where it came from}); KEY is the sample's serial in its
split. Beside the shards, shards.json (INDEX_NAME) gives the class names, the task type and each
shard's samples and bytes; shards without one (another tool's) are read too, their class names then
from a label.txt beside or above them, or --label_path.

A shard's member index (name, data offset, size; and the .cls texts) comes from one walk over its
512-byte tar headers, which also finds a truncated or corrupt shard (ShardError, naming the shard and
the byte); it is cached per shard, keyed by the shard's size and modification time (cache_dir()/shards),
so a second scan opens no shard. read_member keeps the index and a few open files per process
(DataLoader workers fork: a child opens its own) and reads with os.pread.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.core.files import atomic_write_text
from utils.core.log import UserError
from utils.core.task import MULTICLASS, MULTILABEL, TaskType
from utils.data.containers import member_name
from utils.data.decode import IMG_EXTENSIONS
from utils.data.imageset import ImageSet, read_label_file
from utils.data.scan_cache import ScanCache, cache_dir, gc_paused

LOGGER = logging.getLogger(__name__)

INDEX_NAME = "shards.json"
FORMAT = "webdataset"
VERSION = 1
BLOCK = 512
REMOTE = ("http://", "https://", "pipe:", "file://", "s3://", "gs://")  # streamed, not read here
_CACHE_VERSION = 1
_OPEN_FILES = 32  # open shard files kept per process


class ShardError(UserError):
    """A shard that cannot be read as a tar file (truncated, corrupt), in one line naming it."""


# ------------------------------------------------------------------------------ which shards
def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as the shell and WebDataset do it: 'a-{000..002}.tar' -> a-000.tar, a-001.tar,
    a-002.tar (numbers keep the width of the first); 'x{a,b}' -> xa, xb; nested and several braces too."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        step = 1 if int(hi) >= int(lo) else -1
        parts = [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + step, step)]
    else:
        parts = body.split(",")
    return [out for part in parts for out in expand_braces(head + part + tail)]


def is_remote(spec: str) -> bool:
    """Whether a split names streamed shards (a URL or a pipe) rather than local files."""
    return str(spec).startswith(REMOTE)


def names_shards(spec: str | Path) -> bool:
    """Whether a --train_path/--val_path/--test_path value names local tar shards: a .tar file, a glob
    or brace pattern of .tar files, or a folder holding .tar files (and no class folders)."""
    text = str(spec)
    if is_remote(text):
        return False
    if any(c in text for c in "*?[{"):
        return text.endswith((".tar", ".tar}"))
    path = Path(text)
    if path.is_file():
        return path.suffix == ".tar"
    if path.is_dir():
        with os.scandir(path) as entries:
            kinds = [(e.name.endswith(".tar") and e.is_file(), e.is_dir() and not e.name.startswith(".")) for e in entries]
        return any(tar for tar, _ in kinds) and not any(folder for _, folder in kinds)
    return False


def expand_shards(spec: str | Path) -> list[Path]:
    """The local shard files a split names, in order (a folder's and a glob's in name order, a brace
    pattern's in its own order).

    Raises:
        UserError: a pattern that matches no file, a brace pattern naming a missing shard.
    """
    text = str(spec)
    if Path(text).is_dir():
        found = sorted(Path(text).glob("*.tar"))
    elif "{" in text:
        found = [Path(p) for p in expand_braces(text)]
        missing = [p for p in found if not p.is_file()]
        if missing:
            raise UserError(f"shard {missing[0]} of {text} not found ({len(missing)} of {len(found)} missing): "
                            "check the pattern's numbers")
    elif any(c in text for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(text))
    else:
        found = [Path(text)] if Path(text).is_file() else []
    if not found:
        raise UserError(f"no tar shards found at {text}: pass a folder of .tar files, a .tar file, a glob "
                        "(dataset/train/*.tar) or a brace pattern (dataset/train/train-{000000..000009}.tar)")
    return found


# ------------------------------------------------------------------------------- header walk
@dataclass
class ShardIndex:
    """What one walk over a shard's headers found.

    Attributes:
        members: member name -> (data offset, size), in the shard's order.
        labels: KEY -> the text of its .cls member.
    """

    members: dict[str, tuple[int, int]]
    labels: dict[str, str]


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes over 8 GB
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").lstrip(b" ")
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, keyval = record.partition(" ")
        key, eq, value = keyval.partition("=")
        if eq and key == "path":
            return value
    return None


def walk_shard(path: Path) -> ShardIndex:
    """Read a shard's member index from its tar headers (ustar, GNU long names and pax paths).

    Raises:
        ShardError: a truncated shard (a header or a member's data past the end of the file, or no
            end-of-archive blocks), a corrupt header (bad checksum), naming the shard, member and byte.
    """
    members: dict[str, tuple[int, int]] = {}
    labels: dict[str, str] = {}
    fix = "write it again (processing.py --write_shards --force) or copy it again from its source"
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        pos, long_name = 0, None
        while True:
            block = f.read(BLOCK)
            if len(block) < BLOCK:
                last = f" after member {next(reversed(members))}" if members else ""
                how = "in the middle of a tar header" if block else "without the tar's end-of-archive blocks"
                raise ShardError(f"shard {path} is truncated: it ends at byte {total}{last}, {how}; {fix}")
            if block == bytes(BLOCK):
                break
            stored = _octal(block[148:156])
            if stored != sum(block[:148]) + 256 + sum(block[156:]):
                raise ShardError(f"shard {path} is corrupt: the tar header at byte {pos} has a bad checksum; {fix}")
            size, kind = _octal(block[124:136]), block[156:157]
            name = long_name or block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if not long_name and block[257:262] == b"ustar" and block[345:346] != b"\0":
                name = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            start = pos + BLOCK
            if start + size > total:
                raise ShardError(f"shard {path} is truncated: member {name} needs bytes {start}-{start + size} but "
                                 f"the file ends at byte {total}; {fix}")
            long_name = None
            if kind in (b"L", b"x") or (kind in (b"0", b"\0") and name.endswith(".cls")):
                data = f.read(size)
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    long_name = _pax_path(data)
                else:
                    labels[name.rsplit("/", 1)[-1].split(".", 1)[0]] = data.decode("ascii", "replace").strip()
            if kind in (b"0", b"\0", b"7"):
                members[name] = (start, size)
            pos = start + (size + BLOCK - 1) // BLOCK * BLOCK
            f.seek(pos)
    return ShardIndex(members, labels)


def _cache_file(path: Path) -> Path:
    digest = hashlib.sha1(str(path.absolute()).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return cache_dir() / "shards" / f"{digest}.json"


def shard_index(path: str | Path, use_cache: bool = True) -> ShardIndex:
    """A shard's member index: this process's, else the cached one (same size and modification
    time), else a fresh walk (cached for the next scan).

    Raises:
        ShardError: see walk_shard; UserError: the shard cannot be opened.
    """
    key = str(path)
    if key in _INDEXES:
        return _INDEXES[key]
    path = Path(path)
    try:
        st = path.stat()
    except OSError as err:
        raise UserError(f"shard {path} cannot be read ({err.strerror or err})") from None
    stamp = [st.st_size, st.st_mtime_ns]
    cache = _cache_file(path)
    enabled = use_cache and str(cache_dir()).lower() not in ("off", "0", "none")
    index = None
    if enabled:
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            if data["version"] == _CACHE_VERSION and data["path"] == str(path.absolute()) and data["stamp"] == stamp:
                index = ShardIndex({n: (o, s) for n, o, s in data["members"]}, data["labels"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache yet, or an unreadable one
    if index is None:
        index = walk_shard(path)
        if enabled:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cache, json.dumps({"version": _CACHE_VERSION, "path": str(path.absolute()), "stamp": stamp,
                                                     "members": [[n, o, s] for n, (o, s) in index.members.items()],
                                                     "labels": index.labels}))
            except OSError as err:  # a read-only home: scanning works, only slower next time
                LOGGER.debug("shard index not cached (%s)", err)
    _INDEXES[key] = index
    return index


# ---------------------------------------------------------------------------- member reading
_INDEXES: dict[str, ShardIndex] = {}  # shard path -> index; inherited by forked workers (read only)
_FILES: OrderedDict[str, int] = OrderedDict()  # shard path -> this process's descriptor
_FILES_PID = [os.getpid()]


def _descriptor(container: str) -> int:
    if _FILES_PID[0] != os.getpid():  # a forked worker: the parent's descriptors stay the parent's
        _FILES.clear()
        _FILES_PID[0] = os.getpid()
    fd = _FILES.get(container)
    if fd is None:
        fd = os.open(container, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        _FILES[container] = fd
        while len(_FILES) > _OPEN_FILES:
            os.close(_FILES.popitem(last=False)[1])
    else:
        _FILES.move_to_end(container)
    return fd


def read_member(container: str, member: str) -> bytes:
    """The bytes of one member of a local tar shard (utils.data.containers' reader of '.tar').

    Raises:
        OSError: the shard or the member cannot be read, naming the shard.
    """
    try:
        where = shard_index(container).members.get(member)
    except UserError as err:
        raise OSError(str(err)) from None
    if where is None:
        raise OSError(f"shard {container} has no member {member}")
    offset, size = where
    fd = _descriptor(container)
    if hasattr(os, "pread"):
        data = os.pread(fd, size, offset)
    else:  # Windows: no pread, and no fork either
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, size)
    if len(data) != size:
        raise OSError(f"shard {container}: member {member} is cut short at byte {offset + len(data)} (the shard changed "
                      "or was truncated after it was scanned)")
    return data


def shard_images(spec: str | Path) -> list[str]:
    """Every image member of a set of local shards, named 'SHARD#KEY.EXT' (labels not needed:
    predict.py --source).

    Raises:
        UserError: no shard; ShardError: a truncated or corrupt shard.
    """
    names = []
    for shard in expand_shards(spec):
        names += [member_name(str(shard), name) for name in shard_index(shard).members
                  if "." + name.rpartition(".")[2].lower() in IMG_EXTENSIONS]
    return names


# ------------------------------------------------------------------------------------ scan
def read_shard_index_file(folder: Path) -> dict[str, Any] | None:
    """The shards.json of a folder of shards (written by processing.py), or None."""
    try:
        data = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def shard_class_names(folder: Path, label_path: str | Path | None, what: str) -> tuple[list[str], TaskType | None]:
    """The class names of shards in `folder`: shards.json's, else a label.txt beside or above
    them, else --label_path; with the task type shards.json states (None when it states none).

    Raises:
        UserError: no class names anywhere.
    """
    meta = read_shard_index_file(folder)
    if meta and meta.get("class_names"):
        task = MULTILABEL if meta.get("task_type") == MULTILABEL.name else MULTICLASS
        return [str(n) for n in meta["class_names"]], task
    for candidate in (folder / "label.txt", folder.parent / "label.txt", label_path):
        if candidate and Path(candidate).is_file():
            return read_label_file(candidate), None
    raise UserError(f"{what} shards in {folder} come without class names (no {INDEX_NAME}, no label.txt beside or above "
                    "them): pass --label_path FILE (one class name per line, in index order)")


def _remap(own: list[str], class_names: Sequence[str] | None, spec: str, what: str) -> tuple[list[str], list[int]]:
    """The names the ImageSet carries and each own index's index among them (the model's, by name)."""
    if class_names is None:
        return own, list(range(len(own)))
    by_name = {n: i for i, n in enumerate(class_names)}
    lacking = [n for n in own if n not in by_name]
    if lacking:
        raise UserError(f"{what} {spec} has class '{lacking[0]}' that the model does not know (its classes: "
                        f"{', '.join(list(class_names)[:20])}{' ...' if len(class_names) > 20 else ''})")
    return list(class_names), [by_name[n] for n in own]


def _shard_samples(shard: Path, index: ShardIndex, mapping: list[int], samples: list[tuple[str, Any]],
                   skipped: list[tuple[str, str]]) -> bool:
    """Add one shard's samples (image member, [class indices as the model numbers them]); returns
    whether any sample holds several labels."""
    images: dict[str, str] = {}
    for name in index.members:
        key, dot, ext = name.rpartition("/")[2].partition(".")
        if dot and "." + ext.lower() in IMG_EXTENSIONS and key not in images:
            images[key] = name
    multi = False
    container = str(shard)
    for key, name in images.items():
        text = index.labels.get(key)
        if text is None:
            skipped.append((member_name(container, name), "no .cls member: the sample has no label"))
            continue
        try:
            own = [int(t) for t in text.split()]
            labels = sorted({mapping[i] for i in own})
        except (ValueError, IndexError):
            skipped.append((member_name(container, name), f"label '{text}' is not a class index below {len(mapping)}"))
            continue
        if not labels:
            skipped.append((member_name(container, name), "empty .cls member: the sample has no label"))
            continue
        multi = multi or len(labels) > 1
        samples.append((member_name(container, name), labels))
    return multi


@gc_paused()
def scan_shards(spec: str | Path, class_names: Sequence[str] | None = None, label_path: str | Path | None = None,
                what: str = "dataset", use_cache: bool = True) -> ImageSet:
    """The samples of a set of local shards, as an ImageSet (root: the first shard's folder).

    Args:
        spec: a folder of .tar files, a .tar file, a glob or a brace pattern.
        class_names: the model's classes (val/test): the shards' own are matched to them by name.
        label_path: class names of shards without shards.json or label.txt.
        what: the split's name in messages.
        use_cache: reuse each shard's cached member index (cache_dir()/shards).

    Returns:
        The ImageSet: samples 'SHARD#KEY.EXT' in shard order; multilabel when shards.json says so
        or a sample has several labels.

    Raises:
        UserError: no shard, no class names, a class the model lacks, no sample;
            ShardError: a truncated or corrupt shard.
    """
    paths = expand_shards(spec)
    own, task = shard_class_names(paths[0].parent, label_path, what)
    names, mapping = _remap(own, class_names, str(spec), what)
    samples: list[tuple[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    multi = False
    stamps = []
    for shard in paths:
        st = shard.stat()
        stamps.append(f"{shard.absolute()}\0{st.st_size}\0{st.st_mtime_ns}")
        multi = _shard_samples(shard, shard_index(shard, use_cache), mapping, samples, skipped) or multi
    if not samples:
        raise UserError(f"{what} {spec} holds no labelled image ({len(paths)} shard(s); first problem: "
                        f"{skipped[0][1] if skipped else 'no image members'})")
    task = task or (MULTILABEL if multi else MULTICLASS)
    if task is MULTICLASS and multi:
        raise UserError(f"{what} {spec}: its {INDEX_NAME} says multiclass but a sample holds several labels")
    samples = [(p, task.encode(labels)) for p, labels in samples]
    signature = hashlib.sha1("\n".join(stamps + [json.dumps(own), json.dumps(names)]).encode(
        "utf-8", "surrogateescape")).hexdigest()
    cache = ScanCache(paths[0].parent) if use_cache else None  # the mean/std of the images, kept between runs
    return ImageSet(root=paths[0].parent, samples=samples, class_names=names, skipped=skipped, signature=signature,
                    cache=cache, task=task, source=Path(str(spec)))
