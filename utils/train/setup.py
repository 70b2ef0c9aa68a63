"""What a training run is made of before any model exists: its splits, its task type, and its
options resolved once.

    data = load_data(args, resumed=None)         # the splits (encoded for the task), class names, mean/std, augmentation
    args = resolve_options(args, data, device)   # task type, loss, metric, loader processes, batch size: read-only from here

Everything that depends on the data or the machine is decided here, in one place, and recorded in
args.yaml; the Trainer and everything below it read the options and never write them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from utils.core.device import amp_settings, autobatch, autocast, gpu_workers
from utils.core.distributed import broadcast_object
from utils.core.log import UserError
from utils.core.options import Options
from utils.core.schema import Checkpoint, PreprocessSpec
from utils.core.task import TASK_TYPES, TaskType
from utils.data.augment import train_augment
from utils.data.imageset import ImageSet, report_skipped
from utils.data.loaders import compute_mean_std
from utils.data.sources import scan_split, source_options, split_exists
from utils.data.stream import StreamIndex, is_stream_url, read_stream_index
from utils.data.stream_loader import MEAN_STD_IMAGES, stream_mean_std
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from utils.models.registry import resolve_name

LOGGER = logging.getLogger(__name__)


@dataclass
class TrainData:
    """The splits of a run and what is derived from them before any model exists.

    Attributes:
        train_set / val_set: the scanned splits, their targets encoded for `task` (val_set None without a val folder).
        spec: the test-time preprocessing (size, channels, the train set's or ImageNet's mean/std).
        task: the task type the run trains.
        augment: the training augmentations (torchvision/albumentations transforms) and their description.
        stream: the index of a training split streamed from URLs (utils.data.stream), else None.
    """

    train_set: ImageSet
    val_set: ImageSet | None
    spec: PreprocessSpec
    task: TaskType
    augment: list[Any] = field(default_factory=list)
    augment_note: str = "none"
    stream: StreamIndex | None = None  # a training split streamed from URLs: train_set holds its classes, no samples

    @property
    def train_size(self) -> int:
        """Images in the training split (a stream's: its index's count)."""
        return self.stream.total if self.stream is not None else len(self.train_set.samples)

    @property
    def class_names(self) -> list[str]:
        return self.train_set.class_names

    def fold(self, train_indices: Sequence[int], held_out: ImageSet) -> TrainData:
        """The data of one fold of --kfold (utils.train.kfold): the training images at `train_indices`
        (a subset of the same files, nothing copied), validated on the val split, or without one on
        the `held_out` images. The preprocessing is the whole training set's (its mean/std, computed
        once for every fold), so the K models see their inputs alike.

        Args:
            train_indices: the images of the training set this fold trains on (the other folds').
            held_out: the fold's own images (train_set.subset of the rest).
        """
        return replace(self, train_set=self.train_set.subset(train_indices),
                       val_set=self.val_set if self.val_set is not None else held_out)

    @property
    def num_classes(self) -> int:
        return len(self.train_set.class_names)


def train_mean_std(train_set: ImageSet, image_size: int, channels: int, seed: int) -> tuple[list[float], list[float]]:
    """The train set's per-channel mean/std, computed once per set of files and size (then read
    from the scan cache: a second start-up on the same folder decodes no image)."""
    key = f"mean_std:v1:{train_set.signature}:{image_size}:{channels}:{seed}"
    cached = train_set.cache.get(key) if train_set.cache is not None and train_set.signature else None
    if cached is not None:
        return list(cached[0]), list(cached[1])
    mean, std = compute_mean_std(train_set.samples, image_size, channels, workers=0, seed=seed)
    if train_set.cache is not None and train_set.signature:
        train_set.cache.put(key, [mean, std])
    return mean, std


def task_of(args: Options, train_set: ImageSet, resumed: Checkpoint | None) -> TaskType:
    """The task type of the run: the resumed run's, --task_type, or (auto) what the training split holds
    (a list with several labels per image: multilabel)."""
    if resumed is not None:
        return resumed.meta.task_type
    return train_set.task if args.task_type == "auto" else TASK_TYPES[args.task_type]


def load_data(args: Options, resumed: Checkpoint | None = None) -> TrainData:
    """Scan the splits, check them, encode them for the run's task, and settle the preprocessing (a
    resumed run keeps its own).

    Raises:
        UserError: missing or unusable splits, fewer than two classes, other classes than the resumed
            run's, several labels per image for a multiclass run.
    """
    if resumed is None:  # a model name the light check could not decide (another timm): refused before the scan
        resolve_name(args.model_name)
    reading = source_options(args)
    stream = read_stream_index(str(args.train_path)) if is_stream_url(args.train_path) else None
    train_set = (streamed_set(args, stream) if stream is not None else
                 scan_split(args.train_path, label_path=args.label_path, what="train set", reading=reading))
    class_names = train_set.class_names
    if resumed is not None and list(resumed.meta.class_names) != class_names:
        raise UserError(f"--resume: the classes in {args.train_path} differ from those the run was trained on")
    report_skipped(train_set.skipped, f"train set {args.train_path}")
    if len(class_names) < 2:
        raise UserError(f"train set {args.train_path} has one class ({class_names[0]}): a classifier needs at least two")
    task = task_of(args, train_set, resumed)
    if stream is not None and stream.task_type != task.name and not task.multilabel:
        raise UserError(f"{args.train_path}: its index says {stream.task_type}; train it with --task_type {stream.task_type}")
    train_set = train_set.as_task(task)
    val_set = None
    if args.val_path and split_exists(args.val_path):
        val_set = scan_split(args.val_path, class_names=class_names, what="val set", reading=reading).as_task(task)
        report_skipped(val_set.skipped, f"val set {args.val_path}")
    elif not args.get("kfold"):  # --kfold validates each fold on its held-out images instead (and says so)
        LOGGER.warning("no validation set at '%s': best.pt is chosen on the training metrics", args.val_path)

    if resumed is not None:
        mean, std = resumed.meta.preprocess.mean, resumed.meta.preprocess.std
    elif args.imagenet_meanstd:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if args.image_channel == 1:
            mean, std = [sum(mean) / 3], [sum(std) / 3]
    elif stream is not None:
        mean, std = stream_mean_std(stream, args.image_size, args.image_channel)
        LOGGER.info("mean/std of the first %d images of the stream", min(MEAN_STD_IMAGES, stream.total))
    else:
        mean, std = train_mean_std(train_set, args.image_size, args.image_channel, args.random_seed)
        LOGGER.info("train set mean %s, std %s", [round(m, 4) for m in mean], [round(s, 4) for s in std])
    spec = PreprocessSpec.create(args.image_size, args.image_channel, mean, std, args.resize_mode)
    augment, note = train_augment(args.Augment, args.custom_augment)
    return TrainData(train_set, val_set, spec, task, augment, note, stream)


def streamed_set(args: Options, stream: StreamIndex) -> ImageSet:
    """The ImageSet of a streamed training split: its classes and task type from the index, no samples (they
    are streamed, utils.data.stream_loader); what needs every sample by name is refused in one line.

    Raises:
        UserError: --kfold, --sampler balanced, --cache_images ram, --lr_find with a streamed training split.
    """
    refused = {"kfold": args.get("kfold"), "sampler balanced": args.get("sampler") == "balanced",
               "cache_images ram": args.get("cache_images") == "ram", "lr_find": args.get("lr_find")}
    for flag, given in refused.items():
        if given:
            raise UserError(f"--{flag} needs the training images by name, and {args.train_path} is streamed: copy the "
                            "shards to a local folder and pass it as --train_path (local shards are read by name)")
    task = TASK_TYPES.get(stream.task_type)
    if task is None:
        raise UserError(f"{args.train_path}: its index gives task_type '{stream.task_type}'; expected one of {', '.join(TASK_TYPES)}")
    return ImageSet(Path(stream.urls[0]), [], list(stream.class_names), task=task)


def resolve_options(args: Options, data: TrainData, device: torch.device) -> Options:
    """The run's options with what depends on the data and the machine settled: the task type, the
    loss and --metrice of its task (its defaults when not given), the loader processes of a GPU, and
    --batch_size -1. What the Trainer and args.yaml get; nothing rewrites it afterwards.

    Raises:
        UserError: a loss or metric of the other task, a combination the task cannot train.
    """
    task = data.task
    if task.multilabel and args.rdrop:
        raise UserError("--rdrop compares softmax distributions: it does not apply to a multilabel task")
    changes: dict[str, Any] = {"task_type": task.name, "loss": task.loss(args.loss), "metrice": task.metric(args.metrice)}
    if device.type == "cuda" and "workers" not in args.get("explicit", {"workers"}):
        changes["workers"] = gpu_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # the CPU default starves a GPU
        LOGGER.info("--workers %d (a GPU: the cores shared by this machine's processes; pass --workers to choose)",
                    changes["workers"])
    if args.batch_size == -1:
        changes["batch_size"] = auto_batch_size(args, data, device)
    return args.replace(**changes)


def auto_batch_size(args: Options, data: TrainData, device: torch.device) -> int:
    """--batch_size -1: the batch that fills about 80% of the GPU's memory in a training step (16 on a
    CPU, pytorch-classifier's choice), at most the training images; rank 0's choice for every process."""
    from utils.models.registry import create_model

    chosen = 16
    if device.type == "cuda":
        amp_dtype, _ = amp_settings(device, args.amp)
        model = create_model(args.model_name, data.num_classes, args.image_channel).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)

        def probe_step(net: torch.nn.Module, x: torch.Tensor) -> None:
            with autocast(device, amp_dtype):
                net(x).float().sum().backward()

        chosen = autobatch(model, args.image_size, args.image_channel, device, step=probe_step)
        del model
    chosen = broadcast_object(min(chosen, data.train_size))
    LOGGER.info("--batch_size -1: %s -> batch size %d", "80% of GPU memory" if device.type == "cuda" else "no GPU", chosen)
    return chosen


def balanced_weights(image_set: ImageSet) -> list[float]:
    """--sampler balanced: each image's chance, the inverse of its class's frequency (for several
    labels, the mean over them), so every class is drawn about as often."""
    counts = image_set.class_counts()
    labels = [image_set.task.labels(t) for t in image_set.targets]
    return [sum(1.0 / counts[c] for c in cs) / len(cs) for cs in labels]
