"""Datasets, the epoch sampler and loaders of training and evaluation, and the train set's mean/std.

    dataset = ImageDataset(samples, eval_transform(spec), channels=3)
    loader = build_loader(dataset, 64, EpochSampler(len(samples), shuffle=False), workers=0)

A file that fails to decode comes back as a failure with its reason (collate drops it from the
batch and the caller reports it), never an exception in a loader process. EpochSampler shards an
epoch's order over the processes of a torchrun job and can skip to a position (--resume mid-epoch).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from utils.core.log import UserError
from utils.core.schema import PreprocessSpec
from utils.core.task import MULTICLASS, TaskType
from utils.data.decode import load_image
from utils.data.transforms import eval_transform


# ---------------------------------------------------------------------------------- dataset
def _unchanged(item: Any) -> Any:
    return item


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """A seed per (run, epoch, image): augmentation does not depend on workers or on resume."""
    return (base_seed * 1_000_003 + epoch * 7_919_993 + index * 2_654_435_761) % (2**63 - 1)


class ImageDataset(Dataset):
    """Images of an ImageSet through a transform; keys are indices or (epoch, index) pairs.

    An image that fails to decode (a truncated JPEG, say) is returned as None with the reason;
    `collate` drops it from the batch and reports it, so nothing is silently trained on. The
    samples' targets are encoded for `task` (ImageSet.as_task): a multilabel target (a tuple of
    class indices) comes out multi-hot (`num_classes` floats).
    With a `cache` (utils.data.image_cache), a cached image skips the decoding and the transform's first
    `cache.steps` steps, which it has been through already; the pixels are the same.
    """

    def __init__(self, samples: Sequence[tuple[str, Any]], transform: Any, channels: int = 3, seed: int | None = None,
                 num_classes: int | None = None, cache: Any = None, task: TaskType = MULTICLASS) -> None:
        if task.multilabel and num_classes is None:
            raise ValueError("a multilabel ImageDataset needs num_classes")
        self.samples = list(samples)
        self.transform = transform
        self.channels = channels
        self.seed = seed  # None: deterministic transform, no reseeding needed
        self.num_classes = num_classes
        self.task = task
        self.cache = cache
        if cache is not None:
            rest = transform.transforms[cache.steps:]
            self.rest = v2.Compose(rest) if rest else _unchanged

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, str, str | None]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path, target = self.samples[index]
        if self.task.multilabel:
            hot = torch.zeros(self.num_classes)
            hot[list(target)] = 1.0
            target = hot
        img = self.cache.get(index) if self.cache is not None else None
        transform = self.transform if img is None else self.rest
        if img is None:
            try:
                img = load_image(path, self.channels)
            except Exception as err:  # noqa: BLE001 - any decoder failure means 'skip and report'
                return None, target, path, f"{type(err).__name__}: {err}"
        if self.seed is None:
            return transform(img), target, path, None
        return seeded_transform(transform, img, sample_seed(self.seed, epoch, index)), target, path, None


def seeded_transform(transform: Any, img: Any, seed: int) -> Any:
    """`transform(img)` with the default CPU generator seeded for this image and restored after (a random
    augmentation then depends on the image, not on the worker or the order): torch.manual_seed and fork_rng
    cost ~1.8 ms per image here (they also touch every accelerator), this ~10 us."""
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(img)
    finally:
        generator.set_state(saved)


def collate(batch: Sequence[tuple[Any, int, str, str | None]]) -> dict[str, Any]:
    """Stack the good images; keep the failures as (path, reason)."""
    good = [b for b in batch if b[0] is not None]
    images = torch.stack([b[0] for b in good]) if good else torch.empty(0, dtype=torch.uint8)
    targets = [b[1] for b in good]
    return {
        "images": images,
        "targets": torch.stack(targets) if targets and isinstance(targets[0], torch.Tensor)  # multi-hot rows
        else torch.tensor(targets, dtype=torch.long),
        "paths": [b[2] for b in good],
        "failed": [(b[2], b[3]) for b in batch if b[0] is None],
    }


class EpochSampler(Sampler):
    """Yields (epoch, index) keys: a seeded permutation per epoch, sharded by rank.

    `set_epoch` chooses the epoch; `skip` drops the first n keys of the epoch's whole order (all
    processes together), so a run stopped mid-epoch resumes where it was, with any number of
    processes. The order depends only on (seed, epoch), never on how many epochs ran in this process.

    Args:
        size: images in the split.
        shuffle: a new seeded order each epoch (training), or the split's order (evaluation).
        seed: the run's seed.
        rank, world_size: this process and how many share the split (utils.core.distributed.world_info).
        pad: repeat a few images so every process gets as many (training: the processes step
            together); without it each image is seen once in all (evaluation: no duplicate counted).
        weights: --sampler balanced: each epoch draws `size` images with replacement, with these
            probabilities (seeded by seed and epoch, so a resumed run draws the same ones).
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, pad: bool = True,
                 weights: Sequence[float] | None = None) -> None:
        self.size = size
        self.weights = torch.as_tensor(weights, dtype=torch.float64) if weights is not None else None
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch, and how many keys of its whole order (all processes) are done already."""
        self.epoch = epoch
        self.start = min(skip, self.size)

    def _indices(self) -> list[int]:
        if self.weights is not None:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=gen).tolist()
        elif self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        order = order[self.start:]
        if self.pad and order:
            per_rank = math.ceil(len(order) / self.world_size)
            order += (order * self.world_size)[: per_rank * self.world_size - len(order)]  # every rank as many
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._indices():
            yield (self.epoch, index)

    def __len__(self) -> int:
        left = self.size - self.start
        if self.pad:
            return math.ceil(left / self.world_size)
        return len(range(self.rank, left, self.world_size))


def build_loader(
    dataset: ImageDataset,
    batch_size: int,
    sampler: Sampler,
    workers: int,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with persistent workers (restarting them every epoch costs on small machines).

    Args:
        dataset: the ImageDataset.
        batch_size: images per batch.
        sampler: where keys come from (an EpochSampler; a distributed run passes its rank's).
        workers: worker processes; 0 loads in the main process.
        pin_memory: pin host memory for faster CUDA copies.
        drop_last: drop the last incomplete batch.

    Returns:
        The loader.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def compute_mean_std(
    samples: Sequence[tuple[str, int]], image_size: int, channels: int, workers: int = 0, max_images: int = 5000, seed: int = 0
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images at the model's input size, in [0, 1].

    Uses at most `max_images` images, drawn at random (seeded) when there are more.

    Returns:
        (mean, std), one value per channel.
    """
    if len(samples) > max_images:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(samples), generator=gen)[:max_images].tolist()
        samples = [samples[i] for i in sorted(pick)]
    spec = PreprocessSpec.create(image_size, channels, [0.0] * channels, [1.0] * channels)
    dataset = ImageDataset([(path, 0) for path, _ in samples], eval_transform(spec), channels)  # labels unused
    # a generator of its own: the pass must not draw from the global RNG, so a run whose mean/std
    # come from the scan cache initialises its model exactly like one that computed them
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=collate, generator=torch.Generator())
    return mean_std_of(loader, channels)


def mean_std_of(batches: Iterable[dict[str, Any]], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std, in [0, 1], of the uint8 images of some batches (collate's dicts).

    Raises:
        UserError: no image in them.
    """
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for batch in batches:
        x = batch["images"].to(torch.float64) / 255.0
        if not len(x):
            continue
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        raise UserError("no training image could be decoded to compute the mean/std")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()
