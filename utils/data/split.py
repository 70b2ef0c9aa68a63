"""processing.py's split of class folders into train / val / test: stratified, exact, seeded, and
with every group of exact or near copies kept in one split, so no copy of a test image is trained on.

    groups = copy_groups(images, hash_distance=12, workers=2)     # [[path, path ...], ...]
    split = split_dataset(images, 0.2, 0.2, seed=0, groups=groups)  # {split: {class folder: [paths]}}

Per class: val and test get round(n * size) images, train the rest (at least one). The single
images of a class are shuffled by a generator seeded with the seed and the class name (adding a
class does not reshuffle the others) and cut into train, val, test in that order. A group of copies
is placed whole, before the single images, largest first: into a split that still has room for
all of it, chosen at random (its own seeded generator) in proportion to the room left, so copies
are not all pushed into train. The single images then fill each split up to its count, so the
counts are exact, unless a group is larger than the room of every split: it then goes where the
room is largest and that split is over by the difference (the others under, val before test
filled first). A group counts toward the class of its first image (in scan order); its images
whose class folder differs (a label conflict) go into the same split, each under its own folder.
Without groups the split is the per-image split of earlier versions, image for image.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from utils.data.imageset import natural_key

SPLITS = ("train", "val", "test")


def split_counts(n: int, val_size: float, test_size: float) -> tuple[int, int, int]:
    """Images of one class per split: val and test rounded, train the rest (at least one)."""
    n_val = int(round(n * val_size))
    n_test = int(round(n * test_size))
    while n_val + n_test >= n and (n_val or n_test):  # keep at least one training image
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def _place_groups(groups: Sequence[Sequence[Path]], room: list[int], rng: random.Random) -> list[int]:
    """The split index of each group (room is updated): largest first, into a split with room for
    all of it chosen in proportion to its room, else where the room is largest."""
    choice = [0] * len(groups)
    order = list(range(len(groups)))
    rng.shuffle(order)
    for g in sorted(order, key=lambda i: -len(groups[i])):
        size = len(groups[g])
        fits = [s for s in range(len(SPLITS)) if room[s] >= size]
        if fits:
            s = rng.choices(fits, weights=[room[f] for f in fits])[0]
        else:
            s = max(range(len(SPLITS)), key=lambda k: room[k])
        room[s] -= size
        choice[g] = s
    return choice


def split_dataset(images: dict[str, list[Path]], val_size: float, test_size: float, seed: int,
                  groups: Sequence[Sequence[Path]] = ()) -> dict[str, dict[str, list[Path]]]:
    """Stratified split: {split: {class folder: [paths]}}, each group of `groups` in one split.

    Args:
        images: class folder -> its images.
        val_size, test_size: fractions of each class.
        seed: the split's seed.
        groups: groups of copies (paths of `images`, two or more each, first image first).
    """
    folder_of = {path: folder for folder, paths in images.items() for path in paths}
    grouped = {path for group in groups for path in group}
    homed: dict[str, list[Sequence[Path]]] = {}
    for group in groups:
        homed.setdefault(folder_of[group[0]], []).append(group)
    out: dict[str, dict[str, list[Path]]] = {s: {folder: [] for folder in images} for s in SPLITS}
    for name, paths in images.items():
        singles = sorted((p for p in paths if p not in grouped), key=lambda p: natural_key(str(p)))
        random.Random(f"{seed}:{name}").shuffle(singles)
        own = homed.get(name, [])
        room = list(split_counts(len(singles) + sum(len(g) for g in own), val_size, test_size))
        for group, s in zip(own, _place_groups(own, room, random.Random(f"{seed}:{name}:groups"))):
            for path in group:
                out[SPLITS[s]][folder_of[path]].append(path)
        n_val = min(max(room[1], 0), len(singles))
        n_test = min(max(room[2], 0), len(singles) - n_val)
        n_train = len(singles) - n_val - n_test
        out["train"][name] += singles[:n_train]
        out["val"][name] += singles[n_train:n_train + n_val]
        out["test"][name] += singles[n_train + n_val:]
    return out


def copy_groups(images: dict[str, list[Path]], hash_distance: int, workers: int) -> list[list[Path]]:
    """Groups of exact or near copies among the images of the class folders (utils.data.duplicates,
    the thresholds of audit.py), each in scan order; images that cannot be decoded are in none.

    Args:
        images: class folder -> its images.
        hash_distance: pHash bits within which two images are near copies.
        workers: processes that decode and hash (0: this one).
    """
    from utils.data.duplicates import duplicate_groups
    from utils.data.quality import inspect_images

    items = [(str(path), folder, folder) for folder, paths in images.items() for path in paths]
    records = inspect_images(items, workers)
    return [[Path(records[i].path) for i in group]
            for group in duplicate_groups([r.fingerprint for r in records], hash_distance)]
