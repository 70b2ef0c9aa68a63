"""Decoded images kept in memory between epochs: main.py --cache_images.

    budget = cache_budget("auto", processes=1, workers=2)
    cache = ImageCache.build(paths, channels, transform, "auto", budget, workers=2)   # before training
    dataset = ImageDataset(samples, transform, channels, seed=0, cache=cache)

Every epoch used to open, decode and resize each image again, the same way each time; only what
follows the resize (the random crop, the augmentations) differs between epochs. The cache keeps each
image as it leaves the transform's deterministic first steps (`deterministic_steps`: the resize for
training; the whole transform for validation, down to the uint8 tensor), so the next epochs start
from there. Which pixels come out is unchanged: the same arrays, then the same seeded random steps
(tested against the uncached dataset).

The arrays live in a few large uint8 blocks, filled in the main process before the loader's
workers start (its workers decode the first pass in parallel). On Linux the workers are forked and
read the blocks without copying them; elsewhere (spawn) each worker gets a copy, and the budget is
shared out accordingly.

Budget (`mode`):
  auto  a quarter of the memory available when the run starts, at most 8 GiB, shared by the
        processes that hold a copy; a set whose first images say it will not fit is not cached.
  ram   up to the memory available less 2 GiB: the images that fit are cached, the others are read
        from disk as before.
  off   nothing is cached.
An image that fails to decode is never cached: the dataset reports it every epoch, as without a cache.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from utils.core.log import progress
from utils.core.names import CACHE_MODES
from utils.data.decode import load_image

LOGGER = logging.getLogger(__name__)

AUTO_SHARE = 0.25                  # auto: this share of the available memory ...
AUTO_MAX_BYTES = 8 * 2**30         # ... and never more than this
RAM_RESERVE_BYTES = 2 * 2**30      # ram: what is left to everything else
BLOCK_BYTES = 64 * 2**20           # arrays are packed into blocks of about this size
PROBE_IMAGES = 256                 # auto: the images that estimate the whole set's size
MEMINFO = "/proc/meminfo"
CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),                     # cgroup v2
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))  # v1
MAX_DIMS = 4                       # (H, W), (H, W, C), (C, H, W), TenCrop's (10, C, H, W)


def available_memory() -> int:
    """Bytes of memory available to new allocations: MemAvailable on Linux, and no more than what a
    container's memory limit leaves (cgroup v2 memory.max, or v1 memory.limit_in_bytes, less the
    group's usage); elsewhere physical memory."""
    available = 0
    try:
        with open(MEMINFO, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not available:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return 0
    for limit_file, usage_file in CGROUP_MEMORY:
        try:
            limit = open(limit_file, encoding="ascii").read().strip()
            usage = int(open(usage_file, encoding="ascii").read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            available = min(available, max(int(limit) - usage, 0))
        break
    return available


def copies_per_process(workers: int) -> int:
    """How many copies of a process's cache exist: one, or one per worker too when the workers are
    spawned (they get the dataset pickled) rather than forked (they share the parent's pages)."""
    return 1 if workers == 0 or multiprocessing.get_start_method() == "fork" else workers + 1


def cache_budget(mode: str, processes: int = 1, workers: int = 0) -> int:
    """Bytes one process may cache in `mode` when `processes` processes of this machine each hold
    a cache (torchrun) and each has `workers` loader workers."""
    if mode == "off":
        return 0
    available = available_memory()
    if mode == "auto":
        total = min(available * AUTO_SHARE, AUTO_MAX_BYTES)
    elif mode == "ram":
        total = max(available - RAM_RESERVE_BYTES, 0)
    else:
        raise ValueError(f"unknown cache mode {mode!r}; choose one of {', '.join(CACHE_MODES)}")
    return int(total // (max(processes, 1) * copies_per_process(workers)))


def deterministic_steps(transform: Any) -> int:
    """How many of a v2.Compose's first transforms give the same output for the same image every
    time (resizes, centre crops, conversion to a tensor): what may be cached."""
    from torchvision.transforms import v2

    from utils.data.transforms import Letterbox, PILToTensor, _StackCrops

    fixed = (v2.Resize, Letterbox, v2.CenterCrop, v2.TenCrop, v2.PILToTensor, PILToTensor, _StackCrops)
    steps = 0
    for step in getattr(transform, "transforms", []):
        if type(step) not in fixed:
            break
        steps += 1
    return steps


def to_array(item: Image.Image | torch.Tensor) -> np.ndarray:
    """A prefix's output as a uint8 array: a PIL image (L or RGB) as (H, W[, 3]), a tensor as it is."""
    if isinstance(item, Image.Image):
        if item.mode not in ("L", "RGB"):
            raise ValueError(f"cannot cache a PIL image in mode {item.mode}")
        return np.asarray(item)
    return item.numpy()


class _Prefix(Dataset):
    """The first pass: each image through the deterministic steps, as an array (None if it fails)."""

    def __init__(self, paths: Sequence[str], channels: int, prefix: Callable[[Any], Any]) -> None:
        self.paths, self.channels, self.prefix = paths, channels, prefix

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str] | None:
        try:
            item = self.prefix(load_image(self.paths[index], self.channels))
            return np.ascontiguousarray(to_array(item)), "pil" if isinstance(item, Image.Image) else "tensor"
        except Exception:  # noqa: BLE001 - the dataset decodes it again and reports why, every epoch
            return None


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


class ImageCache:
    """Arrays of the images after the first `steps` transforms, by sample index.

    Where each array lies is kept in numpy arrays, not Python objects: a forked worker that reads
    them does not copy the pages they are on (reference counts are never touched).

    Args:
        steps: how many of the dataset transform's first steps the arrays have been through.
        kind: "pil" (handed on as a PIL image, L or RGB) or "tensor" (as a uint8 tensor).
        blocks: the uint8 blocks the arrays are packed in.
        where: per sample index, (block, offset, ndim, *shape) as int64 rows; block -1: not cached.
    """

    def __init__(self, steps: int, kind: str, blocks: list[np.ndarray], where: np.ndarray) -> None:
        self.steps, self.kind, self.blocks, self.where = steps, kind, blocks, where

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def count(self) -> int:
        return int((self.where[:, 0] >= 0).sum())

    def get(self, index: int) -> Image.Image | torch.Tensor | None:
        """Sample `index` as the first `steps` transforms left it, or None if it is not cached."""
        block, offset, ndim, *dims = self.where[index].tolist()
        if block < 0:
            return None
        shape = dims[:ndim]
        arr = self.blocks[block][offset:offset + math.prod(shape)].reshape(shape)
        if self.kind == "pil":
            return Image.fromarray(arr)  # (H, W) -> L, (H, W, 3) -> RGB
        return torch.from_numpy(arr.copy())  # the consumer may write to it; the cache stays as it was

    @classmethod
    def build(cls, paths: Sequence[str], channels: int, transform: Any, mode: str, budget: int, workers: int = 0,
              what: str = "images") -> ImageCache | None:
        """Decode `paths` through `transform`'s deterministic first steps and keep what fits.

        Args:
            paths: the images, in the dataset's order.
            channels: 3 or 1 (as the dataset loads them).
            transform: the dataset's v2.Compose.
            mode: auto, ram or off (see the module docstring).
            budget: the bytes it may take (`cache_budget`, less what other caches of the process took).
            workers: the loader's workers: they decode this first pass in parallel.
            what: how the log line names the images.

        Returns:
            The cache, or None when nothing is to be cached.
        """
        steps = deterministic_steps(transform)
        if mode == "off" or steps == 0 or budget <= 0 or not paths:
            return None
        from torchvision.transforms import v2

        prefix = v2.Compose(transform.transforms[:steps])
        t0 = time.perf_counter()
        loader = DataLoader(_Prefix(paths, channels, prefix), batch_size=64, num_workers=workers, collate_fn=_as_list)
        where = np.full((len(paths), 3 + MAX_DIMS), -1, dtype=np.int64)
        blocks: list[np.ndarray] = []
        pending: list[tuple[int, np.ndarray]] = []
        pending_bytes = total = 0
        stopped, kind = "", "pil"

        def pack() -> None:
            nonlocal pending, pending_bytes
            if pending:
                block, offset = np.empty(pending_bytes, dtype=np.uint8), 0
                for index, arr in pending:
                    block[offset:offset + arr.size] = arr.reshape(-1)
                    where[index, :3 + arr.ndim] = (len(blocks), offset, arr.ndim, *arr.shape)
                    offset += arr.size
                blocks.append(block)
            pending, pending_bytes = [], 0

        index = 0
        for batch in progress(loader, desc=f"caching {what}", unit="batch", leave=False):
            for item in batch:
                if item is not None and item[0].ndim <= MAX_DIMS:
                    arr, kind = item
                    if total + arr.nbytes > budget:
                        stopped = stopped or f"the budget of {budget / 2**20:.0f} MB is full"
                    else:
                        pending.append((index, arr))
                        pending_bytes += arr.nbytes
                        total += arr.nbytes
                index += 1
            if pending_bytes >= BLOCK_BYTES:
                pack()
            if mode == "auto" and index >= PROBE_IMAGES and index < len(paths) and total / index * len(paths) > budget:
                stopped = (f"its first {index} images say the whole set takes about {total / index * len(paths) / 2**20:.0f} "
                           f"MB, more than the {budget / 2**20:.0f} MB left of a quarter of the free memory")
                break
            if stopped:
                break
        del loader
        if mode == "auto" and stopped:
            LOGGER.info("--cache_images auto: %s not cached (%s); --cache_images ram caches what fits", what, stopped)
            return None
        pack()
        if not blocks:
            LOGGER.info("--cache_images %s: no %s cached (%s)", mode, what, stopped or "none could be decoded")
            return None
        cache = cls(steps, kind, blocks, where)
        LOGGER.info("--cache_images %s: %d of %d %s in memory (%.1f MB, %.1f s)%s", mode, cache.count, len(paths), what,
                    cache.nbytes / 2**20, time.perf_counter() - t0, f"; the rest is read from disk: {stopped}" if stopped else "")
        return cache
