"""A training run, from its data to the test score of best.pt (main.py's library).

    data = load_data(args, resumed=None)                      # utils.train.setup: the splits, task, mean/std, augmentation
    args = resolve_options(args, data, device)                # utils.train.setup: the options, resolved once
    trainer = Trainer(args, data, Run("runs/exp"), device)   # model, optimizer, schedule, EMA/SWA/KD, loaders
    result = trainer.fit()                                    # the epochs: train, validate, save, log
    test = trainer.test_best()                                # best.pt on the test split

`Trainer` reads the options and never writes them; it builds every part from them and registers the stateful ones in a TrainState, so
last.pt is one `state_dict()` and --resume one `load_state_dict()`. The epoch itself is
utils.train.engine (no I/O); what is kept is utils.train.saver.CheckpointSaver; what is shown is
utils.train.epoch_log.EpochLog. docs/architecture.md shows the whole flow.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from utils.core.checkpoint import float_weights, load_checkpoint
from utils.core.config import args_to_dict
from utils.core.device import amp_settings
from utils.core.distributed import (all_equal, any_true, broadcast_buffers, broadcast_module, broadcast_object, reduce_sum,
                                    resume_command, world_info)
from utils.core.files import DiskFull
from utils.core.log import StopFlag, UserError
from utils.core.run import Run, RunFolder
from utils.core.schema import Checkpoint, ModelMeta
from utils.data.augment import BatchMix
from utils.data.image_cache import ImageCache, cache_budget
from utils.data.imageset import ImageSet, report_skipped
from utils.data.loaders import EpochSampler, ImageDataset, build_loader
from utils.data.sources import scan_split, source_options, split_exists
from utils.data.stream_loader import StreamDataset, StreamLoader
from utils.data.transforms import Normalize, image_transform, train_transform
from utils.evaluate.metrics import EpochSums, MultiLabelSums, best_f1_thresholds, multilabel_scores, new_sums
from utils.infer.calibration import calibration_scores, fit_temperature, fit_text
from utils.infer.ood import fit_model_ood, with_ood
from utils.models.registry import create_model
from utils.models.weights import load_module_state, load_weights
from utils.train.distill import Distiller, load_teacher
from utils.train.ema import EMA, SWA
from utils.train.engine import (NonFiniteLoss, StepParts, TemperatureScaled, evaluate, predict_logits, train_one_epoch,
                                update_bn)
from utils.train.epoch_log import EpochLog, EpochRecord
from utils.train.losses import RDrop, Supervised, build_loss, class_balance_weights
from utils.train.optim import HeadFreezer, build_optimizer
from utils.train.results import EpochTimes, forward_speed, model_section, write_run_results
from utils.train.saver import CheckpointSaver
from utils.train.schedule import LRSchedule
from utils.train.setup import TrainData, balanced_weights
from utils.train.state import ModuleState, TrainState
from utils.train.trackers import create_tracker

LOGGER = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_determinism(device: torch.device, deterministic: bool) -> None:
    """--deterministic: deterministic kernels only (an op without one raises); otherwise on CUDA,
    cudnn.benchmark picks the fastest convolution algorithm for each input shape. A CPU run is
    reproducible either way."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def compile_model(model: nn.Module, backend: str, device: torch.device) -> nn.Module:
    """--compile: torch.compile(model) with a backend checked first, so a wrong name or a missing
    compiler is one line here rather than an error deep inside the first training step."""
    import torch._dynamo

    names = torch._dynamo.list_backends(exclude_tags=())
    if backend not in names:
        raise UserError(f"--compile {backend}: unknown backend; choose one of {', '.join(names)}")
    compiler = os.environ.get("CXX", "g++")
    if backend == "inductor" and device.type == "cpu" and shutil.which(compiler) is None:
        raise UserError(f"--compile inductor on the CPU builds C++ kernels, and no compiler ({compiler}) was found: "
                        "install g++ (or set CXX), or pass --compile aot_eager")
    print(f"--compile: torch.compile, backend {backend} (the first steps are slow while it compiles)", flush=True)
    return torch.compile(model, backend=backend)


# --------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds every part of a training run from its options, and runs it.

    Args:
        args: the resolved options (main.py's parse_args, or the resumed run's own).
        data: the splits (load_data).
        run: the run folder.
        device: where to train.
        resumed: the last.pt to continue from, or None.
        on_epoch: called after each epoch with (epoch, value): the epoch number (1-based) and its value of
            --metrice on the split that picks best.pt; a true answer ends training after that epoch as
            --patience does (tune.py prunes a trial so). One process only: under torchrun the processes
            would not agree to stop.
    """

    def __init__(self, args: argparse.Namespace, data: TrainData, run: Run, device: torch.device,
                 resumed: Checkpoint | None = None, on_epoch: Callable[[int, float], bool | None] | None = None) -> None:
        self.args, self.data, self.run, self.device = args, data, run, device
        self.on_epoch = on_epoch
        print(f"augmentation: {data.augment_note}" + (f"; then --mixup {args.mixup}" if args.mixup != "none" else ""), flush=True)
        self.model = self._build_model(pretrained=resumed is None)
        self.amp_dtype, amp_note = amp_settings(device, args.amp)
        if args.amp:
            LOGGER.info("--amp: %s", amp_note)
        self._refuse_batch_of_one()
        weight = self._class_weights() if args.class_balance not in ("none", None, False) else None
        self.criterion = build_loss(args.loss, args.label_smoothing, weight, data.task).to(device)
        self.optimizer = build_optimizer(self.model, args.optimizer, args.lr, args.weight_decay, args.momentum,
                                         getattr(args, "layer_decay", None))
        self.ema = EMA(self.model, args.ema_decay) if args.ema else None  # before any hooks are placed on the model
        self.swa = SWA(self.model, int(args.swa_start * args.epoch)) if args.swa else None
        self.objective, self.distiller = self._build_objective()
        self.freezer = HeadFreezer(self.model, args.freeze) if args.freeze else None
        self.batch_mix = BatchMix(args.mixup, data.num_classes, multilabel=data.task.multilabel) if args.mixup != "none" else None
        self.rank, self.world = world_info()
        self.train_sampler, self.train_loader, self.val_loader = self._build_loaders()
        self.schedule = LRSchedule(self.optimizer, args.lr, args.epoch, args.warmup, args.warmup_ratios, args.warmup_minlr,
                                   args.lr_scheduler, args.lr_scheduler_params,
                                   steps_per_epoch=-(-len(self.train_loader) // args.accumulate))
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.train_model = self._wrap_distributed()
        if args.compile:  # only the training step: checkpoints, EMA and validation keep the model itself
            self.train_model = compile_model(self.train_model, args.compile, self.device)
        shared = [p for p in self.distiller.method.parameters() if p.requires_grad] if self.distiller else []
        self.step_parts = StepParts(self.objective, self.optimizer, self.scaler, self.amp_dtype, self.batch_mix,
                                    args.accumulate, args.clip_grad, self.ema,
                                    self.freezer.train_mode if self.freezer else None, shared, self.schedule.after_step)

        self.meta = ModelMeta(args.model_name, tuple(data.class_names), data.spec, task=data.task.name)
        self.options = args_to_dict(args) | {"save_path": str(run.path)}
        self.saver = CheckpointSaver(run, self.meta, self.options, args.metrice, args.patience,
                                     weights="ema" if self.ema else "raw", background=True)
        self.save_period = int(args.get("save_period") or 1)  # last.pt every N epochs (runs before the flag: 1)
        self.state = self._build_state()
        self.start_step = self.start_samples = 0
        self.saved_epoch = -1  # the epoch whose end last.pt holds (-1: not written by this process yet)
        self.timing = EpochTimes()  # seconds per epoch: train, val, checkpoints, logs and plots (kept in last.pt)
        self.state.add("timing", self.timing, required=False)  # absent from runs written before results.json
        if resumed is not None:
            self.state.load_state_dict(resumed.train_state)
            self.saved_epoch = -1 if self.state.step else self.state.epoch  # what last.pt holds already
            # where the epoch stopped, over all processes (files without `samples` come from one process)
            self.start_samples = self.state.samples or self.state.step * args.batch_size
            self.start_step = self.start_samples // (args.batch_size * self.world)
            print(f"resuming {run.path} at epoch {self.state.epoch + 1}"
                  + (f", step {self.start_step}" if self.start_step else ""), flush=True)
        self.normalize = Normalize(data.spec.mean, data.spec.std, args.channels_last).to(device)
        run.write_yaml(RunFolder.ARGS, self.options | {"mean": list(data.spec.mean), "std": list(data.spec.std)})
        run.write_lines(RunFolder.LABELS, data.class_names)
        self.tracker = (create_tracker(getattr(args, "tracker", "none"), run.path,
                                       getattr(args, "tracker_project", "pytorch-classifier")) if run.main else None)
        if self.tracker is not None:
            self.tracker.log_params(self.options)
        self.log = EpochLog(run, args.epoch, ["kd_loss"] if args.kd else [], "val (EMA)" if self.ema else "val", data.task,
                            self.tracker)
        if resumed is not None:
            self.log.resume(self.state.epoch)

    # ---------------------------------------------------------------------------- building
    def _build_model(self, pretrained: bool) -> nn.Module:
        args = self.args
        model = create_model(args.model_name, self.data.num_classes, args.image_channel, pretrained=args.pretrained and pretrained)
        if args.weight and pretrained:
            loaded, skipped = load_weights(model, args.weight)
            LOGGER.info("--weight %s: loaded %d tensors", args.weight, len(loaded))
            for line in skipped:
                LOGGER.info("  skipped %s", line)
        model = model.to(self.device)
        if args.channels_last:  # the weights NHWC in memory; Normalize hands batches over in the same layout
            model = model.to(memory_format=torch.channels_last)
        if args.sync_bn and world_info()[1] > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _class_weights(self) -> torch.Tensor:
        """--class_balance's weights: from the training targets, or a stream's index (its class counts)."""
        args, data = self.args, self.data
        if data.stream is not None:
            return class_balance_weights(None, data.num_classes, args.class_balance, args.class_balance_beta, data.task,
                                         counts=(data.stream.class_counts, data.stream.total))
        return class_balance_weights(data.train_set.targets, data.num_classes, args.class_balance, args.class_balance_beta,
                                     data.task)

    def _refuse_batch_of_one(self) -> None:
        """Batch norm cannot train on one image per batch: say so before the first step."""
        args = self.args
        if args.batch_size == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            raise UserError(f"--batch_size 1 cannot train {args.model_name}: batch norm needs at least 2 images per batch")

    def _build_objective(self) -> tuple[Any, Distiller | None]:
        """Supervised, R-Drop, or distillation from a teacher (whose learnable layers join the optimizer)."""
        args = self.args
        if args.rdrop:
            return RDrop(self.criterion, args.rdrop_alpha), None
        if not args.kd:
            return Supervised(self.criterion), None
        teacher, teacher_ckpt = load_teacher(args.teacher_path, self.data.class_names, args.image_channel, self.device,
                                             self.data.task.name)
        spec, t_spec = self.data.spec, teacher_ckpt.meta.preprocess
        distiller = Distiller(self.criterion, self.model, teacher, args.kd_method, args.kd_ratio, args.image_channel,
                              (list(spec.mean), list(spec.std)), (list(t_spec.mean), list(t_spec.std)),
                              args.kd_temperature, self.data.task.multilabel).to(self.device)
        learnable = [p for p in distiller.method.parameters() if p.requires_grad]
        if learnable:  # MGD's generation layers train with the student
            self.optimizer.add_param_group({"params": learnable, "weight_decay": args.weight_decay})
        print(f"distillation: {args.kd_method} from {teacher_ckpt.meta.model_name} ({args.teacher_path}), "
              f"kd_ratio {args.kd_ratio}", flush=True)
        return distiller, distiller

    def _wrap_distributed(self) -> nn.Module:
        """The model the training step runs: DistributedDataParallel around it under torchrun (the
        model itself otherwise). Checkpoints, EMA and validation use the model itself."""
        if self.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        if self.rank == 0:
            print(f"distributed: {self.world} processes ({'NCCL' if self.device.type == 'cuda' else 'gloo'}), batch "
                  f"{self.args.batch_size} per process = {self.args.batch_size * self.world} per step", flush=True)
        return DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       find_unused_parameters=bool(self.args.freeze))  # frozen layers get no gradient

    def _build_state(self) -> TrainState:
        """Every stateful part, under the names last.pt stores them by."""
        state = TrainState()
        state.add("model", ModuleState(self.model))
        state.add("optimizer", self.optimizer)
        state.add("scheduler", self.schedule)
        state.add("scaler", self.scaler, required=False)  # a CPU run may resume on a GPU
        state.add("ema", self.ema)
        state.add("swa", self.swa)
        state.add("distill", ModuleState(self.distiller.method) if self.distiller else None)
        state.add("best", self.saver)
        if isinstance(self.train_sampler, StreamLoader):  # the reader layout a mid-epoch resume needs again
            state.add("stream", self.train_sampler, required=False)
        return state

    def _build_stream_loader(self, transform: Any) -> StreamLoader:
        """A streamed training split's loader, which is its own sampler (utils.data.stream_loader)."""
        args, data = self.args, self.data
        dataset = StreamDataset(data.stream, transform, args.image_channel, args.random_seed, args.batch_size, self.rank,
                                self.world, args.workers, args.get("shard_buffer", 1000), data.num_classes, data.task)
        if dataset.steps() == 0:
            raise UserError(f"{args.train_path}: {data.stream.total} images over {self.world} processes x "
                            f"{max(1, args.workers)} loader workers make no whole batch of {args.batch_size} for one of "
                            "them; lower --batch_size or --workers")
        print(f"streaming {len(data.stream.urls)} shards of {args.train_path}: {dataset.steps()} steps per epoch, "
              f"shuffle buffer {dataset.buffer}; {dataset.steps() * args.batch_size * self.world} of {data.stream.total} "
              "training images per epoch (the rest, fewer than a batch per reader, sit out)", flush=True)
        return StreamLoader(dataset, args.workers, self.device.type == "cuda")

    def _build_loaders(self) -> tuple[EpochSampler | StreamLoader, Any, Any]:
        args, data = self.args, self.data
        pin = self.device.type == "cuda"
        n = len(data.train_set.samples)
        sampler = EpochSampler(n, shuffle=True, seed=args.random_seed, rank=self.rank, world_size=self.world,
                               weights=balanced_weights(data.train_set) if args.sampler == "balanced" else None)
        transform = train_transform(args.image_size, args.resize_mode, data.augment, data.spec.interpolation)
        # a last batch of one image cannot train batch norm; mixing needs pairs
        per_rank = -(-n // self.world)
        drop_last = per_rank % args.batch_size == 1 or (self.batch_mix is not None and per_rank > args.batch_size)
        caches = self._image_caches(transform)
        train_loader = build_loader(ImageDataset(data.train_set.samples, transform, args.image_channel, seed=args.random_seed,
                                                 num_classes=data.num_classes, cache=caches[0], task=data.task),
                                    args.batch_size, sampler, args.workers, pin, drop_last=drop_last)
        if data.stream is not None:
            sampler = train_loader = self._build_stream_loader(transform)
        val_loader = None
        if data.val_set is not None:
            val_loader = build_loader(ImageDataset(data.val_set.samples, image_transform(data.spec, args.test_tta), args.image_channel,
                                                   num_classes=data.num_classes, cache=caches[1], task=data.task),
                                      args.batch_size, self.eval_sampler(len(data.val_set.samples)), args.workers, pin)
        return sampler, train_loader, val_loader

    def _image_caches(self, train_transform: Any) -> tuple[ImageCache | None, ImageCache | None]:
        """--cache_images: the training, then the validation images, in memory within one budget
        (each process of this machine holds its own)."""
        args, data = self.args, self.data
        mode = getattr(args, "cache_images", "off")
        budget = cache_budget(mode, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), args.workers)
        train = ImageCache.build([path for path, _ in data.train_set.samples], args.image_channel, train_transform, mode,
                                 budget, args.workers, "training images")
        if data.val_set is None:
            return train, None
        val = ImageCache.build([path for path, _ in data.val_set.samples], args.image_channel,
                               image_transform(data.spec, args.test_tta), mode, budget - (train.nbytes if train else 0),
                               args.workers, "validation images")
        return train, val

    def new_sums(self) -> EpochSums | MultiLabelSums:
        """What an epoch's metrics are summed in: a confusion matrix, or a multi-label model's scores."""
        return new_sums(self.data.task, self.data.num_classes)

    def eval_sampler(self, size: int) -> EpochSampler:
        """Each process evaluates its share of a split once (no padding); metrics are summed over them."""
        return EpochSampler(size, shuffle=False, rank=self.rank, world_size=self.world, pad=False)

    # ---------------------------------------------------------------------------- training
    def scored_model(self) -> nn.Module:
        """What validation scores and best.pt holds: the EMA weights with --ema."""
        return self.ema.module if self.ema is not None else self.model

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs (stopping early on --patience or a signal), then finish SWA.

        Returns:
            {"best_epoch", "best_metric", "best_value"}.
        """
        args = self.args
        print(f"training {args.model_name} on {self.device} ({self.data.train_size} train images, "
              f"{self.data.num_classes} classes, batch {args.batch_size}, {args.epoch} epochs)", flush=True)
        with StopFlag("saving last.pt at the end of this step") as stop:
            try:
                for epoch in range(self.state.epoch, args.epoch):
                    record = self.run_epoch(epoch, stop)
                    if any_true(stop())[0]:  # a signal may reach the processes a step apart: all stop together
                        self.save_last(background=False)
                        print(f"stopped after epoch {epoch + 1}: saved {self.run / 'last.pt'}; "
                              f"continue with: {self.resume_command()}", flush=True)
                        raise KeyboardInterrupt
                    if self.on_epoch is not None and self.on_epoch(epoch + 1, (record.val or record.train)[args.metrice]):
                        print(f"stopped after epoch {epoch + 1}: its caller asked to stop here (tune.py: the trial is "
                              "pruned)", flush=True)
                        break
                    if self.saver.patience_exhausted:
                        print(f"early stop: no improvement of val {args.metrice} for {args.patience} epochs "
                              f"(best {self.saver.best_value:.4f} at epoch {self.saver.best_epoch})", flush=True)
                        break
                self.save_last(background=False)  # the last epoch trained, when --save_period skipped it
                self.run.wait_saves()  # best.pt and last.pt on the disk before anything reads them back
            except DiskFull as err:
                with contextlib.suppress(Exception):
                    self.run.wait_saves()
                with contextlib.suppress(DiskFull):
                    self.log.close()  # the curves too, if there is room left for them
                raise self.full_disk(err) from None
            except BaseException:
                self.finish_saves()
                self.log.close()  # the curves are drawn however the loop ends
                raise
            self.log.close()
        if self.swa is not None:
            self.finish_swa()
        self.calibrate()  # before the thresholds: they are tuned on the calibrated probabilities
        self.tune_thresholds()
        self.fit_ood()
        if self.world > 1:  # DistributedDataParallel keeps the copies equal; say so, or say it did not
            same = all_equal([t for t in self.model.state_dict().values() if t.is_floating_point()])
            print(f"weights {'identical' if same else 'DIFFERENT (a bug: please report it)'} on all {self.world} "
                  "processes", flush=True)
        self.print_timing()
        saver = self.saver
        print(f"best.pt: epoch {saver.best_epoch}, {'val' if self.val_loader else 'train'} {args.metrice} "
              f"{saver.best_value:.4f}", flush=True)
        return {"best_epoch": saver.best_epoch, "best_metric": args.metrice, "best_value": saver.best_value}

    def full_disk(self, err: DiskFull) -> DiskFull:
        """A full disk while training, with what is intact and how to go on: a checkpoint the disk
        had no room for replaced nothing (utils.core.files.atomic_write)."""
        if not self.run.last.is_file():
            return err.with_hint("or pass --save_path on a larger disk; then train again")
        return err.with_hint(f"the checkpoints in {self.run.path} are intact (a write that did not fit replaced "
                             f"nothing); then continue with: {resume_command(self.resume_path)} --epoch {self.args.epoch}")

    def run_epoch(self, epoch: int, stop: StopFlag) -> EpochRecord:
        """Train one epoch (or the rest of it), validate, choose best.pt, log, save last.pt."""
        args, state = self.args, self.state
        start_step = self.start_step if epoch == state.epoch else 0
        lr = self.schedule.resume(epoch, start_step // args.accumulate) if start_step else self.schedule.start_epoch(epoch)
        frozen = self.freezer.start_epoch(epoch) if self.freezer else False
        self.train_sampler.set_epoch(epoch, skip=self.start_samples if start_step else 0)
        sums, extra = self.new_sums(), {}
        if start_step and state.sums and self.rank == 0:
            sums.load_state_dict(state.sums)
            extra = dict(state.extra or {})
        t0 = time.perf_counter()
        train = self.train_epoch(epoch, sums, extra, start_step, stop)
        t_train = time.perf_counter()
        self.start_step = 0
        if train["interrupted"]:
            done = (self.start_samples if start_step else 0) + (int(train["steps"]) - start_step) * args.batch_size * self.world
            state.epoch, state.step, state.samples = epoch, int(train["steps"]), done
            # the epoch's sums of every process go to rank 0's last.pt; a resumed run starts the others at zero
            state.sums = sums.reduced().state_dict()
            state.extra = {k: float(v) for k, v in zip(sorted(extra), reduce_sum(torch.tensor(
                [extra[k] for k in sorted(extra)], dtype=torch.float64)).tolist())} if extra else {}
            self.saver.save_last(state)
            any_true()  # the other processes wait until rank 0 has written last.pt
            print(f"stopped at epoch {epoch + 1}, step {state.step}: saved {self.run / 'last.pt'}; "
                  f"continue with: {self.resume_command()}", flush=True)
            raise KeyboardInterrupt
        # batch-norm statistics are each process's own: rank 0's are the run's (checkpoints hold them)
        broadcast_buffers(self.model)
        if self.ema is not None:
            broadcast_module(self.ema.module)
        if self.swa is not None:
            self.swa.end_epoch(self.model, epoch)
        val = self.validate(self.scored_model())
        t_val = time.perf_counter()
        self.schedule.end_epoch(val["loss"] if val else None)
        improved = self.saver.end_epoch(epoch + 1, (val or train)[args.metrice], self.scored_model(),
                                        {"train": train, "val": val})
        t_best = time.perf_counter()
        notes = (["head only"] if frozen else []) + ([f"kd_loss {train['kd_loss']:.4f}"] if "kd_loss" in train else [])
        record = EpochRecord(epoch + 1, lr, t_val - t0, train, val, improved, notes)
        self.log.write(record)  # before last.pt: a kill in between redoes this epoch, and its row with it
        t_log = time.perf_counter()
        spent = {"train": t_train - t0, "val": t_val - t_train, "checkpoints": t_best - t_val, "logs and plots": t_log - t_best}
        self.timing.epochs.append(spent)  # before last.pt, which keeps it for a resumed run's results.json
        state.epoch, state.step, state.samples, state.sums, state.extra = epoch + 1, 0, 0, None, None
        if (epoch + 1) % self.save_period == 0 or epoch + 1 == args.epoch:  # a snapshot; written while the next trains
            self.save_last(background=True)
        spent["checkpoints"] += time.perf_counter() - t_log
        return record

    def save_last(self, background: bool) -> None:
        """last.pt at the state's position, unless it already holds it (--save_period saves every N epochs;
        a run that stops saves where it stopped).

        Args:
            background: snapshot now and write in the run's checkpoint writer (else written before returning).
        """
        if self.saved_epoch == self.state.epoch and not self.state.step:
            if not background:
                self.run.wait_saves()
            return
        if background and not (self.run / "last.pt").exists():
            background = False  # nothing on the disk to resume from yet: the first last.pt is written before going on
        self.saver.save_last(self.state, background=background)
        self.saved_epoch = self.state.epoch

    def finish_saves(self) -> None:
        """On the way out of a failed or interrupted run: wait for the background checkpoint writes, so
        none is cut short by the process's end; a write that failed too is logged, not raised over the first error."""
        try:
            self.run.wait_saves()
        except Exception as err:  # noqa: BLE001 - the error that ended the run is the one to raise
            LOGGER.error("%s", err)

    @property
    def resume_path(self) -> Path:
        """The folder --resume continues: the run's own, or for a fold of --kfold (options `fold`) the
        whole cross-validation's, its parent (a fold is never resumed alone)."""
        return self.run.path.parent if self.args.get("fold") else self.run.path

    def resume_command(self) -> str | None:
        """The command that continues this run from its last.pt, launched as this one was (torchrun
        with its process count, or python); None while no last.pt has been written."""
        if self.state.epoch == 0 and self.state.step == 0:
            return None
        return resume_command(self.resume_path)

    def print_timing(self) -> None:
        """Where the epochs' time went, on average: training, validation, checkpoints, logs and plots."""
        epochs = self.timing.epochs
        if not epochs:
            return
        mean = {k: sum(t.get(k, 0.0) for t in epochs) / len(epochs) for k in epochs[0]}
        total = sum(mean.values())
        print("time per epoch: " + ", ".join(f"{k} {v:.2f}s ({v / total:.0%})" for k, v in mean.items()), flush=True)

    def train_epoch(self, epoch: int, sums: EpochSums, extra: dict[str, float], start_step: int, stop: StopFlag) -> dict[str, float]:
        """utils.train.engine.train_one_epoch with this run's parts; a non-finite loss ends the run in one line."""
        failed: list[tuple[str, str]] = []
        draw = (self.log.batch_drawer(self.data.class_names, self.data.spec.mean, self.data.spec.std,
                                      int(self.args.plot_train_batch_count)) if epoch == 0 else None)
        try:
            train = train_one_epoch(self.train_model, self.step_parts, self.train_loader, self.device, epoch, self.normalize, sums,
                                    start_step=start_step, should_stop=stop, on_batch=draw, failed=failed, extra_sums=extra)
        except NonFiniteLoss as err:
            raise UserError(f"training stopped: {err}; lower --lr (now {self.args.lr}) or drop --amp. "
                            f"The checkpoints in {self.run.path} are from the last good epoch and were not touched") from None
        report_skipped(failed, "images that failed to decode (left out of training)")
        return train

    def validate(self, model: nn.Module) -> dict[str, float] | None:
        """Loss, acc and mean_acc of `model` on the val split (None without one)."""
        if self.val_loader is None:
            return None
        failed: list[tuple[str, str]] = []
        val = evaluate(model, self.criterion, self.val_loader, self.device, self.new_sums(), self.normalize,
                       self.amp_dtype, failed=failed)
        report_skipped(failed, "val images that failed to decode")
        return val

    def finish_swa(self) -> None:
        """Recompute the SWA model's batch-norm statistics, score it, save swa.pt, and make it
        best.pt if it beats the best epoch."""
        swa = self.swa
        if swa.count == 0:
            print(f"--swa: training stopped before epoch {swa.start_epoch + 1}, where averaging starts; no swa.pt", flush=True)
            return
        self.train_sampler.set_epoch(self.args.epoch)
        update_bn(swa.module, self.train_loader, self.device, self.normalize)
        broadcast_buffers(swa.module)  # each process saw its shard: rank 0's statistics for all
        val = self.validate(swa.module)
        value = val[self.args.metrice] if val else None
        promoted = self.saver.offer_swa(swa.module, self.args.epoch, {"val": val}, value, swa.count)
        print(f"swa.pt: average of the last {swa.count} epochs" + (f", val {self.args.metrice} {value:.4f}" if val else "")
              + (" (better than the best epoch: now best.pt)" if promoted else ""), flush=True)

    def load_best(self) -> None:
        """best.pt's weights into the model, in every process (best.pt is on rank 0's disk)."""
        any_true()  # rank 0 has written best.pt
        if self.rank == 0:
            load_module_state(self.model, float_weights(load_checkpoint(self.run.best).model))
        broadcast_module(self.model)

    def calibrate(self) -> None:
        """Fit best.pt's temperature on the validation split (the NLL minimiser, Guo et al., ICML 2017;
        utils.infer.calibration) and store it in best.pt (and the saver's meta): predict.py, metrice.py,
        serve.py and every export then give calibrated probabilities. Without a val split best.pt stays
        uncalibrated (temperature 1)."""
        if self.val_loader is None:
            print("calibration: no val split, so best.pt stays uncalibrated (temperature 1); metrice.py --task calibrate "
                  "--val_path DIR fits one later", flush=True)
            return
        self.load_best()
        task = self.data.task
        logits, targets = predict_logits(self.model, self.val_loader, self.device, self.normalize, task,
                                         self.data.num_classes, self.amp_dtype, desc="calibration")
        if not len(logits):
            print("calibration: no val image could be read, so best.pt stays uncalibrated (temperature 1)", flush=True)
            return
        fit = broadcast_object(fit_temperature(logits.numpy(), targets.numpy(), task))  # rank 0's, for all
        before = calibration_scores(targets.numpy(), task.probabilities(logits.numpy()), task)
        after = calibration_scores(targets.numpy(), task.probabilities(logits.numpy(), fit.stored), task)
        self.meta = dataclasses.replace(self.meta, temperature=fit.stored)
        self.saver.meta = self.meta
        if self.rank == 0:
            best = load_checkpoint(self.run.best)
            best.meta = self.meta
            self.run.save(RunFolder.BEST, best)
        print(fit_text(fit, before, after, self.data.class_names) + (" (stored in best.pt)" if fit.stored else ""),
              flush=True)

    def tune_thresholds(self) -> None:
        """Multi-label: per class, the threshold that gives best.pt its best F1 on the validation
        split (of its calibrated probabilities), stored in best.pt (and used by metrice.py, predict.py,
        exports and serve.py)."""
        if not self.data.task.multilabel or self.val_loader is None:
            return
        self.load_best()
        sums = self.new_sums()
        scored = TemperatureScaled(self.model, self.meta.temperature).to(self.device)  # the probabilities predict.py gives
        evaluate(scored, self.criterion, self.val_loader, self.device, sums, self.normalize, self.amp_dtype, desc="thresholds")
        probs, targets, _, _ = sums.arrays()
        thresholds = best_f1_thresholds(targets, probs)
        before, after = multilabel_scores(targets, probs)["f1"], multilabel_scores(targets, probs, thresholds)["f1"]
        self.meta = dataclasses.replace(self.meta, thresholds=tuple(thresholds))
        self.saver.meta = self.meta
        if self.rank == 0:
            best = load_checkpoint(self.run.best)
            best.meta = self.meta
            self.run.save(RunFolder.BEST, best)
        print(f"thresholds tuned on the val split for each class's best F1: macro F1 {before:.4f} at 0.5 -> {after:.4f} "
              "(stored in best.pt)", flush=True)

    def fit_ood(self) -> None:
        """Unknown images (predict.py --reject): best.pt's Mahalanobis statistics on the training split,
        and each out-of-distribution score's threshold keeping --reject_tpr of the validation split
        known (of the training split, said, without one), stored in best.pt (utils.infer.ood)."""
        if self.data.task.multilabel:
            return
        args, data = self.args, self.data
        if data.stream is not None:
            print("unknown images (--reject): not fitted, the training split is streamed (its feature statistics need "
                  "the images by name); predict.py --reject needs a run trained on local images", flush=True)
            return
        self.load_best()
        held_out = data.val_set if data.val_set is not None else data.train_set
        if data.val_set is None:
            print("--reject_tpr: no val split, so the rejection thresholds are fitted on the training images (which the "
                  "model has seen: it will call more new images unknown than --reject_tpr says)", flush=True)
        spec, stats, line = fit_model_ood(self.model, self.meta, data.train_set.samples, held_out.samples,
                                          args.get("reject_tpr", 0.95), args.batch_size, args.workers, self.device)
        self.meta = dataclasses.replace(self.meta, ood=spec)
        self.saver.meta = self.meta
        if self.rank == 0:  # the run's meta as it stands (a temperature, thresholds), with the rejection
            best = load_checkpoint(self.run.best)
            best.meta = self.meta
            self.run.save(RunFolder.BEST, with_ood(best, spec, stats))
        print(f"unknown images (--reject): {line} (stored in best.pt)", flush=True)

    def test_best(self) -> dict[str, float] | None:
        """best.pt's loss, acc and mean_acc on the test split (None when there is no test folder)."""
        args = self.args
        if not args.test_path or not split_exists(args.test_path):
            return None
        test_set = scan_split(args.test_path, class_names=self.data.class_names, what="test set",
                              reading=source_options(args)).as_task(self.data.task)
        report_skipped(test_set.skipped, f"test set {args.test_path}")
        return self.score_best(test_set, "test")

    def score_best(self, image_set: ImageSet, what: str) -> dict[str, float]:
        """best.pt's metrics on a labelled split as validation computes them (the run's loss, acc,
        mean_acc ...; the test-time transform, TenCrop with --test_tta), summed over the processes.

        Args:
            image_set: the images (encoded for the run's task).
            what: its name in the progress bar and the printed line (test, held-out).
        """
        args = self.args
        self.load_best()
        loader = build_loader(ImageDataset(image_set.samples, image_transform(self.data.spec, args.test_tta), args.image_channel,
                                           num_classes=self.data.num_classes, task=self.data.task),
                              args.batch_size, self.eval_sampler(len(image_set.samples)), 0, self.device.type == "cuda")
        scores = evaluate(self.model, self.criterion, loader, self.device, self.new_sums(), self.normalize,
                          self.amp_dtype, desc=what)
        first, second = self.log.metrics
        print(f"{what} ({len(image_set.samples)} images, best.pt): {first} {scores[first]:.4f}, {second} "
              f"{scores[second]:.4f}, loss {scores['loss']:.4f}", flush=True)
        return scores

    def write_results(self, summary: dict[str, Any], test: dict[str, float] | None) -> None:
        """results.json (train, test and model sections, kept beside metrice.py's) and results.png in the
        run folder (utils.train.results); the first process alone, with a short speed measurement.

        Args:
            summary: fit's {"best_epoch", "best_metric", "best_value"}.
            test: test_best's metrics, or None.
        """
        if not self.run.main:
            return
        speed = forward_speed(self.model, self.data.spec, self.args.batch_size, self.device, self.amp_dtype)
        write_run_results(self.run, load_checkpoint(self.run.best), summary, test,
                          model_section(self.model, self.run, speed), self.state.epoch, self.timing, self.device,
                          self.log.metrics)

    def close_tracker(self, result: dict[str, Any] | None = None) -> None:
        """Send the final metrics and files (best.pt, swa.pt, train.log, args.yaml, label.txt, the plots)
        to the --tracker and close it; without `result` (the run failed or stopped) only close it."""
        tracker, self.tracker = self.tracker, None
        if tracker is None:
            return
        try:
            if result is not None:
                final = {f"test/{k}": float(v) for k, v in (result.get("test") or {}).items()}
                final |= {"best/epoch": float(result["best_epoch"]), f"best/{result['best_metric']}": float(result["best_value"])}
                tracker.log_metrics(final)
                names = [RunFolder.BEST, RunFolder.SWA, RunFolder.LOG, RunFolder.ARGS, RunFolder.LABELS]
                tracker.log_artifacts([self.run / n for n in names] + sorted(self.run.path.glob("*.png")))
        finally:
            tracker.close()
