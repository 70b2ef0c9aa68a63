"""processing.py --write_shards: a split written as WebDataset tar shards and their index (shards.json).

    limits = parse_shard_size("500MB")                               # (images, bytes) per shard
    plan = plan_shards("train", items, class_names, seed=0, limits=limits)
    plan.files()            # ['train/train-000000.tar', ..., 'train/shards.json'] (known before writing)
    plan.write(Path("dataset"))                                      # the shards, then shards.json

Each item (an image file, its class indices, its path relative to --data_path) becomes the members
KEY.EXT (the file's own bytes), KEY.cls and KEY.json, KEY its 8-digit serial in the split (the format
and the reader: utils.data.shards). The train split is written in a seeded random order, val and
test in the order given. A shard is complete once it reached the image or byte limit. Shards are
reproducible (member times, owners and modes fixed: the same input gives the same bytes), each written
under a temporary name and renamed, and shards.json is written last.
"""
from __future__ import annotations

import io
import json
import random
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from utils.core.files import atomic_write, atomic_write_text
from utils.core.log import UserError
from utils.data.shards import BLOCK, FORMAT, INDEX_NAME, VERSION

DEFAULT_SHARD_SIZE = "10000,1GB"  # whichever comes first
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_shard_size(text: str) -> tuple[int | None, int | None]:
    """--shard_size: images per shard ("10000"), bytes per shard ("500MB", "1GB"), or both ("10000,1GB").

    Returns:
        (images, bytes): the limits, None for no limit of that kind.

    Raises:
        UserError: a value that is neither.
    """
    images = size = None
    for part in str(text).replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", part)
        unit = match.group(2).upper() if match else ""
        if not match or unit not in _UNITS or float(match.group(1)) <= 0:
            raise UserError(f"--shard_size {text}: give a number of images (10000), of bytes (500MB, 1GB) or both "
                            "(10000,1GB)")
        if unit:
            size = int(float(match.group(1)) * _UNITS[unit])
        elif "." in match.group(1):
            raise UserError(f"--shard_size {text}: a number of images is a whole number")
        else:
            images = int(match.group(1))
    return images, size


def _tar_bytes(size: int) -> int:
    return BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK


@dataclass
class ShardItem:
    """One sample to write: the image file, its class indices, its name in KEY.json."""

    path: Path
    labels: list[int]
    source: str

    def members(self, key: str) -> list[tuple[str, int]]:
        """(member name, size) of its three members, the image's without reading it."""
        ext = self.path.suffix.lower().lstrip(".")
        ext = "jpg" if ext == "jpeg" else ext
        return [(f"{key}.{ext}", self.path.stat().st_size), (f"{key}.cls", len(self.cls_text())),
                (f"{key}.json", len(self.json_text()))]

    def cls_text(self) -> bytes:
        return " ".join(str(i) for i in self.labels).encode("ascii")

    def json_text(self) -> bytes:
        return json.dumps({"path": self.source}, ensure_ascii=False).encode("utf-8")


@dataclass
class SplitShards:
    """One split's shards as planned: which items go into which shard, in order."""

    split: str
    class_names: list[str]
    task_type: str
    shards: list[list[ShardItem]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [f"{self.split}-{i:06d}.tar" for i in range(len(self.shards))]

    def files(self) -> list[str]:
        """The files it writes, relative to the output folder (the shards, then shards.json)."""
        return [f"{self.split}/{name}" for name in self.names()] + [f"{self.split}/{INDEX_NAME}"]

    def write(self, output: Path) -> dict:
        """Write the shards into output/<split>/ and then its shards.json; returns the index written."""
        folder = output / self.split
        folder.mkdir(parents=True, exist_ok=True)
        entries, serial = [], 0
        counts = [0] * len(self.class_names)
        for name, items in zip(self.names(), self.shards):
            atomic_write(folder / name, lambda tmp, items=items, first=serial: _write_tar(tmp, items, first))
            serial += len(items)
            for item in items:
                for label in set(item.labels):
                    counts[label] += 1
            entries.append({"name": name, "samples": len(items), "bytes": (folder / name).stat().st_size})
        index = {"format": FORMAT, "version": VERSION, "split": self.split, "class_names": self.class_names,
                 "task_type": self.task_type, "class_counts": counts, "samples": serial, "shards": entries}
        atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=1, ensure_ascii=False) + "\n")
        return index


def _write_tar(path: str, items: Sequence[ShardItem], first: int) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for serial, item in enumerate(items, start=first):
            key = f"{serial:08d}"
            (image, _), (cls, _), (meta, _) = item.members(key)
            for name, data in ((image, item.path.read_bytes()), (cls, item.cls_text()), (meta, item.json_text())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))


def plan_shards(split: str, items: Sequence[ShardItem], class_names: Sequence[str], seed: int,
                limits: tuple[int | None, int | None], task_type: str = "multiclass") -> SplitShards:
    """Which items go into which shard: train in a random order seeded by `seed`, val and test as
    given; a new shard starts once one holds `limits`' images or bytes (tar headers included).

    Args:
        split: train, val or test.
        items: the split's samples.
        class_names: in index order.
        seed: --seed.
        limits: (images, bytes) per shard, from parse_shard_size.
        task_type: multiclass or multilabel (shards.json says it).
    """
    order = list(items)
    if split == "train":
        random.Random(f"{seed}:shards").shuffle(order)
    max_images, max_bytes = limits
    plan = SplitShards(split, list(class_names), task_type)
    current: list[ShardItem] = []
    size = 0
    for serial, item in enumerate(order):
        current.append(item)
        size += sum(_tar_bytes(n) for _, n in item.members(f"{serial:08d}"))
        if (max_images and len(current) >= max_images) or (max_bytes and size >= max_bytes):
            plan.shards.append(current)
            current, size = [], 0
    if current:
        plan.shards.append(current)
    return plan


def split_shards(split: dict[str, dict[str, list[Path]]], source: Path, class_names: Sequence[str],
                 folder_index: dict[str, int], seed: int, shard_size: str) -> list[SplitShards]:
    """processing.py's split ({split: {class folder: [images]}}) planned as shards, one plan per
    split that holds images.

    Args:
        split: utils.data.split.split_dataset's result.
        source: --data_path (KEY.json's paths are relative to it).
        class_names: in index order.
        folder_index: class folder -> class index.
        seed: --seed (the order of the train split).
        shard_size: --shard_size.
    """
    limits = parse_shard_size(shard_size)
    plans = []
    for name, folders in split.items():
        items = [ShardItem(path, [folder_index[folder]], path.relative_to(source).as_posix())
                 for folder, paths in folders.items() for path in paths]
        if items:
            plans.append(plan_shards(name, items, class_names, seed, limits))
    return plans
