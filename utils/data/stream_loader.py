"""The training loader of a streamed split (utils.data.stream): shards shuffled and shared out per epoch,
a shuffle buffer, decoding and the train transform, whole batches.

    loader = StreamLoader(StreamDataset(index, transform, 3, seed=0, batch_size=64, workers=2, buffer=1000), workers=2)
    loader.set_epoch(epoch, skip=0)        # as EpochSampler: the epoch, and the samples (all processes) done already
    for batch in loader: ...               # collate's batches, as ImageDataset's loaders give them

Per epoch the shards are put in a seeded order of (seed, epoch) and given to the reader slots (process
rank x loader worker), balanced by the index's counts; each slot streams its shards through a seeded
buffer and yields whole batches, as many as the round-robin of its process's workers takes, so every
process takes the same number of steps (DDP waits for all) and no sample comes twice in an epoch.
The stream is deterministic, so a resume mid-epoch reads and drops (without decoding) what each slot gave
before the stop: exact, with the same processes, --workers, --batch_size and --shard_buffer.
"""
from __future__ import annotations

import io
import random
from itertools import islice
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from utils.core.log import UserError
from utils.core.schema import PreprocessSpec
from utils.core.task import MULTICLASS, TaskType
from utils.data.decode import load_image
from utils.data.loaders import collate, mean_std_of, sample_seed, seeded_transform
from utils.data.stream import (SlotPlan, StreamError, StreamIndex, buffer_shuffled, epoch_plan, round_robin,
                               slot_samples)
from utils.data.transforms import eval_transform

MEAN_STD_IMAGES = 2000  # the first images of a stream that give its mean/std (train shards are written in a seeded random order)


def _unchanged(item: Any) -> Any:
    return item


class StreamDataset(IterableDataset):
    """One process's share of a streamed split, per epoch, as whole batches (collate's dicts).

    Args:
        index: the split (utils.data.stream.read_stream_index).
        transform: the train transform (random steps seeded per sample, as ImageDataset's).
        channels: 3 or 1.
        seed: the run's seed.
        batch_size: images per batch.
        rank, world_size: this process and how many share the split.
        workers: loader worker processes of each process (0: the process itself reads, one slot).
        buffer: --shard_buffer, samples in each slot's shuffle buffer.
        num_classes, task: targets encoded as ImageDataset's (multi-hot for multilabel).
    """

    def __init__(self, index: StreamIndex, transform: Any, channels: int, seed: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, workers: int = 0, buffer: int = 1000, num_classes: int | None = None,
                 task: TaskType = MULTICLASS) -> None:
        self.index, self.transform, self.channels, self.seed = index, transform, channels, seed
        self.batch_size, self.rank, self.world_size, self.slots_per_rank = batch_size, rank, world_size, max(1, workers)
        self.buffer, self.num_classes, self.task, self.workers = buffer, num_classes, task, workers
        self.epoch = 0
        self.skip_steps = 0

    def plans(self) -> tuple[list[SlotPlan], list[list[int]]]:
        """This epoch's slot plans and [rank][worker] batches (the same in every process)."""
        return epoch_plan(self.index.counts, self.seed, self.epoch, self.world_size, self.slots_per_rank, self.batch_size)

    def steps(self) -> int:
        """Batches each process takes in a whole epoch."""
        return sum(self.plans()[1][self.rank])

    def decode(self, sample: tuple[int, str, bytes, Any]) -> tuple[Any, Any, str, str | None]:
        """One streamed sample as ImageDataset gives it: (image, target, name, None), or (None, target, name,
        reason) for an image that fails to decode (collate leaves it out, the trainer reports it)."""
        number, name, data, target = sample
        if self.task.multilabel:
            hot = torch.zeros(self.num_classes)
            hot[list(target if isinstance(target, tuple) else (target,))] = 1.0
            target = hot
        elif isinstance(target, tuple):
            return None, 0, name, f"{len(target)} labels in a multiclass run (train it with --task_type multilabel)"
        try:
            img = load_image(io.BytesIO(data), self.channels)
        except Exception as err:  # noqa: BLE001 - any decoder failure means 'skip and report'
            return None, target, name, f"{type(err).__name__}: {err}"
        return seeded_transform(self.transform, img, sample_seed(self.seed, self.epoch, number)), target, name, None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plans, batches = self.plans()
        slot = self.rank * self.slots_per_rank + worker
        mine, skip = batches[self.rank][worker], round_robin(batches[self.rank], self.skip_steps)[worker]
        plan = plans[slot]
        rng = random.Random(f"buffer:{self.seed}:{self.epoch}:{slot}")
        samples = buffer_shuffled(slot_samples(self.index.urls, self.index.counts, plan), self.buffer, rng)
        try:
            for step in range(mine):
                chunk = list(islice(samples, self.batch_size))
                if step >= skip:  # the batches given before a resume are read again, not decoded
                    yield collate([self.decode(s) for s in chunk])
        except StreamError as err:  # raised in the main process by StreamLoader, as one line
            yield {"stream_error": str(err)}


def _slots(layout: dict[str, int]) -> dict[str, int]:
    """A layout as its reader slots: --workers 0 and 1 both give each process one reader (the same stream)."""
    return layout | {"workers": max(1, int(layout["workers"]))}


def _processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes"


class StreamLoader:
    """The training loader of a stream, and its sampler: `set_epoch(epoch, skip)`, `len`, iteration; its
    `state_dict` (kept in last.pt) is the reader layout a mid-epoch resume needs again.

    Args:
        dataset: the StreamDataset.
        workers: loader worker processes (new ones each epoch: they take the epoch with the dataset).
        pin_memory: pin host memory for faster CUDA copies.
    """

    def __init__(self, dataset: StreamDataset, workers: int, pin_memory: bool = False) -> None:
        self.dataset, self.workers, self.pin_memory = dataset, workers, pin_memory
        self.stopped: dict[str, int] | None = None

    def layout(self) -> dict[str, int]:
        """What decides who reads what: processes, reader slots per process, batch size, buffer."""
        d = self.dataset
        return {"processes": d.world_size, "workers": d.workers, "batch_size": d.batch_size, "shard_buffer": d.buffer}

    def state_dict(self) -> dict[str, int]:
        return self.layout()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stopped = dict(state)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch, and how many samples of it all processes together trained already.

        Raises:
            UserError: a resume mid-epoch with another reader layout than the one that stopped (not exact).
        """
        d = self.dataset
        if skip and self.stopped is not None and _slots(self.stopped) != _slots(self.layout()):
            was, now = self.stopped, self.layout()
            raise UserError(f"--resume mid-epoch of a streamed split is exact only with the reader layout it stopped with "
                            f"({_processes(was['processes'])}, --workers {was['workers']}, --batch_size {was['batch_size']}, "
                            f"--shard_buffer {was['shard_buffer']}), not {_processes(now['processes'])}, --workers "
                            f"{now['workers']}: resume it "
                            f"with {_processes(was['processes'])} and --workers {was['workers']}")
        d.epoch, d.skip_steps = epoch, skip // (d.batch_size * d.world_size)

    def __len__(self) -> int:
        return self.dataset.steps() - self.dataset.skip_steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers, collate_fn=_unchanged,
                            pin_memory=self.pin_memory, prefetch_factor=2 if self.workers > 0 else None)
        for batch in loader:
            if "stream_error" in batch:
                raise UserError(batch["stream_error"])
            yield batch


def stream_mean_std(index: StreamIndex, image_size: int, channels: int, images: int = MEAN_STD_IMAGES) -> tuple[list[float], list[float]]:
    """Per-channel mean/std, in [0, 1], of the first `images` images of a stream in its index order (the
    writer puts the training images in a seeded random order, so they are a random sample)."""
    spec = PreprocessSpec.create(image_size, channels, [0.0] * channels, [1.0] * channels)
    dataset = StreamDataset(index, eval_transform(spec), channels, seed=0, batch_size=64)
    everything = SlotPlan(tuple(range(len(index.urls))), 1, 0, index.total)

    def batches() -> Iterator[dict[str, Any]]:
        samples = islice(slot_samples(index.urls, index.counts, everything), images)
        try:
            while chunk := list(islice(samples, 64)):
                yield collate([dataset.decode((n, name, data, 0)) for n, name, data, _ in chunk])  # labels unused
        except StreamError as err:
            raise UserError(str(err)) from None

    return mean_std_of(batches(), channels)
