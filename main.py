"""Train an image classifier on a folder of class folders.

    python main.py --model_name resnet18 --image_size 224 --epoch 50       # dataset/train, val, test
    python main.py --model_name convnext_tiny --pretrained --amp --warmup
    python main.py --save_path runs/exp --resume                           # continue an interrupted run
    python main.py --list_models                                           # the model zoo

Everything the run writes goes into its own folder (--save_path, incremented if it exists:
runs/exp -> runs/exp2): args.yaml, label.txt, train.log, best.pt, last.pt, plots, TensorBoard.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from prettytable import PrettyTable

from utils.checkpoint import (FORMAT, TRAIN_LOG_FIELDS, Run, float_state_dict, half_state_dict, increment_path,
                              load_checkpoint, read_train_log, rng_state, set_rng_state, truncate_train_log)
from utils.augment import AUGMENT_CHOICES, MIXUP_CHOICES, BatchMix, train_augment
from utils.config import CONFIG_ONLY_KEYS, DEFAULT_CONFIG, ArgumentParser, args_to_dict, parse_with_config
from utils.data import (IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, EpochSampler, ImageDataset, Normalize, build_loader,
                        compute_mean_std, eval_transform, preprocess_spec, report_skipped, scan_split,
                        train_transform, tta_transform)
from utils.distill import KD_METHODS, Distiller, load_teacher
from utils.ema import EMA, SWA
from utils.device import amp_settings, autobatch, autocast, select_device
from utils.engine import NonFiniteLoss, evaluate, train_one_epoch, update_bn
from utils.log import UserError, run_cli
from utils.losses import LOSSES, RDrop, Supervised, build_loss, class_balance_weights
from utils.metrics import EpochSums
from utils.optim import OPTIMIZERS, HeadFreezer, build_optimizer
from utils.plots import plot_batch, plot_curves
from utils.registry import create_model, load_weights, model_table
from utils.schedule import EpochLR

LOGGER = logging.getLogger("main")

# Options a resumed run may change; every other option is the run's own (as pytorch-classifier did).
RESUME_OVERRIDES = ("epoch", "device", "workers", "patience")


def default_workers() -> int:
    """Loader processes. On 1-2 cores, none: decoding small images costs far less than the model
    step, and a worker process competing with the compute threads slows both down."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(4, cpus - 2)


def share_cpu(device: torch.device, workers: int) -> None:
    """On CPU, give the compute threads the cores the loader processes leave free: oversubscribed
    OpenMP threads spin against the workers and can make a step many times slower.
    An explicit OMP_NUM_THREADS is respected."""
    if device.type == "cpu" and workers > 0 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) - workers)
        if threads < torch.get_num_threads():
            torch.set_num_threads(threads)
            LOGGER.info("--workers %d on %d CPUs: %d compute thread(s)", workers, os.cpu_count(), threads)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Train an image classifier (pytorch-classifier's flags).",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p = parser.add_argument
    p("--model_name", default="resnet18", help="zoo name (see --list_models), any timm model, or a model/ model")
    p("--list_models", action="store_true", help="print the model zoo and exit")
    p("--pretrained", action="store_true", help="start from ImageNet weights (timm/torchvision caches)")
    p("--weight", default="", help="start from this state_dict or checkpoint (mismatched tensors are skipped)")
    p("--config", default=str(DEFAULT_CONFIG), help="YAML file: flag defaults and lr_scheduler, random_seed ...")
    p("--device", default="", help="'' (GPU if any), cpu, or a GPU index such as 0")
    p("--train_path", default="dataset/train", help="training images: <train_path>/<class>/<images>")
    p("--val_path", default="dataset/val", help="validation images (chooses best.pt); may be absent")
    p("--test_path", default="dataset/test", help="test images, evaluated with best.pt when training ends")
    p("--label_path", default="dataset/label.txt", help="class names of numbered class folders (old layout)")
    p("--image_size", type=int, default=224, help="model input size in pixels")
    p("--image_channel", type=int, default=3, choices=[1, 3], help="1 = grayscale, 3 = RGB")
    p("--workers", type=int, default=default_workers(), help="data loader processes (0 = main process)")
    p("--batch_size", type=int, default=64, help="images per step; -1 picks one filling ~80%% of GPU memory")
    p("--epoch", type=int, default=100, help="epochs to train")
    p("--save_path", default="runs/exp", help="run folder (incremented if it exists, unless --resume)")
    p("--resume", action="store_true", help="continue the run in --save_path from its last.pt")
    p("--loss", default="CrossEntropyLoss", choices=list(LOSSES), help="loss function")
    p("--optimizer", default="AdamW", choices=list(OPTIMIZERS), help="optimizer")
    p("--lr", type=float, default=1e-3, help="peak learning rate")
    p("--label_smoothing", type=float, default=0.1, help="label smoothing of the loss")
    p("--class_balance", action="store_true", help="weight classes by sqrt of sklearn's balanced weights")
    p("--weight_decay", type=float, default=5e-4, help="weight decay (not on biases and norm layers)")
    p("--momentum", type=float, default=0.9, help="momentum of SGD / RMSProp")
    p("--amp", action="store_true", help="mixed precision: float16 on CUDA, bfloat16 on CPU")
    p("--warmup", action="store_true", help="linear learning-rate warm-up")
    p("--warmup_ratios", type=float, default=0.05, help="fraction of the epochs spent warming up")
    p("--warmup_minlr", type=float, default=1e-6, help="warm-up start lr and the end of the default decay")
    p("--metrice", default="acc", choices=["loss", "acc", "mean_acc"], help="validation metric that picks best.pt")
    p("--patience", type=int, default=30, help="stop after this many epochs without improvement (0 = never)")
    p("--imagenet_meanstd", action="store_true", help="normalise with ImageNet's mean/std, not the train set's")
    # recipes
    p("--Augment", default="none", choices=list(AUGMENT_CHOICES), help="torchvision augmentation policy (the config's custom_augment replaces it)")
    p("--resize_mode", default="crop", choices=list(RESIZE_MODES), help="crop: short side + crop; letterbox: pad to square; squash: ignore aspect")
    p("--mixup", default="none", choices=list(MIXUP_CHOICES), help="mix pairs of images in a batch, after the other augmentations")
    p("--test_tta", action="store_true", help="validate with TenCrop test-time augmentation")
    p("--ema", action="store_true", help="keep an exponential moving average of the weights; validate and save it")
    p("--ema_decay", type=float, default=0.9998, help="EMA decay (warmed up from 0)")
    p("--rdrop", action="store_true", help="R-Drop: two forward passes with a KL consistency term")
    p("--rdrop_alpha", type=float, default=0.3, help="weight of R-Drop's KL term")
    p("--accumulate", type=int, default=1, help="optimizer step every N batches (gradient accumulation)")
    p("--freeze", type=int, default=0, help="train only the classifier head for the first N epochs (-1: always)")
    p("--clip_grad", type=float, default=0.0, help="clip the gradient norm to this value (0 = off)")
    p("--swa", action="store_true", help="stochastic weight averaging over the last epochs (saved as swa.pt)")
    p("--swa_start", type=float, default=0.75, help="fraction of the epochs after which SWA averaging starts")
    p("--kd", action="store_true", help="knowledge distillation from --teacher_path")
    p("--teacher_path", default="", help="run folder (or best.pt) of the teacher")
    p("--kd_method", default="SoftTarget", choices=list(KD_METHODS), help="distillation loss")
    p("--kd_ratio", type=float, default=0.7, help="weight of the distillation loss")
    p("--kd_temperature", type=float, default=4.0, help="SoftTarget temperature")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the options (config file, then command line)."""
    args = parse_with_config(get_args_parser(), argv, CONFIG_ONLY_KEYS | {"custom_augment": []})
    if args.list_models:
        return args
    for name in ("image_size", "epoch"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be a positive number, got {getattr(args, name)}")
    if args.batch_size == 0 or args.batch_size < -1:
        raise UserError(f"--batch_size must be positive (or -1 for automatic), got {args.batch_size}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.warmup_ratios < 1:
        raise UserError(f"--warmup_ratios must be in [0, 1), got {args.warmup_ratios}")
    if args.patience < 0:
        raise UserError(f"--patience must be 0 (off) or positive, got {args.patience}")
    if args.accumulate < 1:
        raise UserError(f"--accumulate must be 1 or more, got {args.accumulate}")
    if args.freeze < -1:
        raise UserError(f"--freeze must be -1 (always), 0 (off) or a number of epochs, got {args.freeze}")
    if not 0 <= args.swa_start < 1:
        raise UserError(f"--swa_start must be in [0, 1), got {args.swa_start}")
    if not 0 < args.ema_decay < 1:
        raise UserError(f"--ema_decay must be in (0, 1), got {args.ema_decay}")
    check_combinations(args)
    return args


def check_combinations(args: argparse.Namespace) -> None:
    """Refuse at start the combinations that cannot work (not after an epoch)."""
    if args.kd and args.rdrop:
        raise UserError("--kd and --rdrop cannot be combined: both replace the training objective; choose one")
    if args.swa and args.ema:
        raise UserError("--swa and --ema both average the weights: choose one")
    if args.teacher_path and not args.kd:
        raise UserError("--teacher_path is only used with --kd: add --kd, or drop --teacher_path")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so last.pt is saved before exit.

    A second Ctrl-C stops at once.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        LOGGER.warning("\n%s received: saving last.pt at the end of this step ...", signal.Signals(signum).name)

    def __call__(self) -> bool:
        return self.signal is not None

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------- helpers
def resume_options(args: argparse.Namespace) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The options of the run being resumed, with the few a resume may change, and its last.pt."""
    save_path = Path(args.save_path)
    ckpt = load_checkpoint(save_path / "last.pt", what="--resume: last checkpoint")
    saved = dict(ckpt["args"])
    ignored = sorted(k for k in args.explicit if k not in RESUME_OVERRIDES + ("resume", "save_path", "config"))
    if ignored:
        LOGGER.warning("--resume keeps the run's own options; ignored: %s", ", ".join(f"--{k}" for k in ignored))
    for key in RESUME_OVERRIDES:
        if key in args.explicit:
            saved[key] = getattr(args, key)
    saved.update(resume=True, save_path=str(save_path))
    resumed = argparse.Namespace(**saved)
    resumed.explicit = set()
    if ckpt["epoch"] >= resumed.epoch:
        raise UserError(f"{save_path} already trained all {ckpt['epoch']} epochs; pass --epoch N (N > {ckpt['epoch']}) to train longer")
    return resumed, ckpt


def print_summary(title: str, rows: list[list[Any]], fields: list[str]) -> None:
    table = PrettyTable(fields)
    table.title = title
    for row in rows:
        table.add_row(row)
    table.float_format = ".4"
    print(table, flush=True)


def metric_improved(name: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if name == "loss" else value > best


def finish_swa(swa: SWA, run: Run, meta: dict[str, Any], train_loader: Any, train_sampler: EpochSampler, val_loader: Any,
               criterion: torch.nn.Module, device: torch.device, num_classes: int, normalize: torch.nn.Module,
               amp_dtype: torch.dtype | None, args: argparse.Namespace, best_value: float | None) -> float | None:
    """Recompute the SWA model's batch-norm statistics, score it, save swa.pt, and make it best.pt
    if it beats the best epoch. Returns the best value afterwards."""
    if swa.count == 0:
        print(f"--swa: training stopped before epoch {swa.start_epoch + 1}, where averaging starts; no swa.pt", flush=True)
        return best_value
    train_sampler.set_epoch(args.epoch)
    update_bn(swa.module, train_loader, device, normalize)
    val = evaluate(swa.module, criterion, val_loader, device, num_classes, normalize, amp_dtype) if val_loader else None
    value = val[args.metrice] if val else None
    ckpt = meta | {"kind": "swa", "model": half_state_dict(swa.module), "epoch": args.epoch, "metrics": {"val": val},
                   "swa_epochs": swa.count, "best": {"metric": args.metrice, "value": value}}
    run.save("swa.pt", ckpt)
    text = f"swa.pt: average of the last {swa.count} epochs" + (f", val {args.metrice} {value:.4f}" if val else "")
    if value is not None and metric_improved(args.metrice, value, best_value):
        run.save("best.pt", ckpt | {"kind": "best"})
        text += " (better than the best epoch: now best.pt)"
        best_value = value
    print(text, flush=True)
    return best_value


# ------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns the final metrics (best epoch, best value, test metrics if a test set exists)."""
    if args.list_models:
        table = PrettyTable(["family", "model_name", "implementation"])
        for row in model_table():
            table.add_row(row)
        table.align = "l"
        print(table)
        print("Any timm model name works as well (timm.list_models()), and the models in model/.")
        return {}

    ckpt: dict[str, Any] | None = None
    if args.resume:
        args, ckpt = resume_options(args)
    seed_everything(args.random_seed)
    device = select_device(args.device)
    share_cpu(device, args.workers)

    # ---- data
    train_set = scan_split(args.train_path, label_path=args.label_path, what="train set")
    class_names = train_set.class_names
    if ckpt is not None and ckpt["class_names"] != class_names:
        raise UserError(f"--resume: the classes in {args.train_path} differ from those the run was trained on")
    report_skipped(train_set.skipped, f"train set {args.train_path}")
    val_set = None
    if args.val_path and Path(args.val_path).exists():
        val_set = scan_split(args.val_path, class_names=class_names, what="val set")
        report_skipped(val_set.skipped, f"val set {args.val_path}")
    else:
        LOGGER.warning("no validation set at '%s': best.pt is chosen on the training metrics", args.val_path)
    num_classes = len(class_names)
    if num_classes < 2:
        raise UserError(f"train set {args.train_path} has one class ({class_names[0]}): a classifier needs at least two")

    run = Run(Path(args.save_path) if ckpt is not None else increment_path(args.save_path))
    print(f"run folder: {run.path}", flush=True)

    if ckpt is not None:
        mean, std = ckpt["mean"], ckpt["std"]
    elif args.imagenet_meanstd:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        if args.image_channel == 1:
            mean, std = [sum(mean) / 3], [sum(std) / 3]
    else:
        mean, std = compute_mean_std(train_set.samples, args.image_size, args.image_channel, workers=0, seed=args.random_seed)
        LOGGER.info("train set mean %s, std %s", [round(m, 4) for m in mean], [round(s, 4) for s in std])
    spec = preprocess_spec(args.image_size, args.image_channel, mean, std, args.resize_mode)
    augment, augment_note = train_augment(args.Augment, args.custom_augment)
    print(f"augmentation: {augment_note}" + (f"; then --mixup {args.mixup}" if args.mixup != "none" else ""), flush=True)

    # ---- model
    model = create_model(args.model_name, num_classes, args.image_channel, pretrained=args.pretrained and ckpt is None)
    if args.weight and ckpt is None:
        loaded, skipped = load_weights(model, args.weight)
        LOGGER.info("--weight %s: loaded %d tensors", args.weight, len(loaded))
        for line in skipped:
            LOGGER.info("  skipped %s", line)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    amp_dtype, amp_note = amp_settings(device, args.amp)
    if args.amp:
        LOGGER.info("--amp: %s", amp_note)

    if args.batch_size == 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UserError(f"--batch_size 1 cannot train {args.model_name}: batch norm needs at least 2 images per batch")
    weight = class_balance_weights(train_set.targets, num_classes) if args.class_balance else None
    criterion = build_loss(args.loss, args.label_smoothing, weight).to(device)
    if args.batch_size == -1:
        import copy

        def probe_step(net: torch.nn.Module, x: torch.Tensor) -> None:
            with autocast(device, amp_dtype):
                net(x).float().sum().backward()

        args.batch_size = min(autobatch(copy.deepcopy(model), args.image_size, args.image_channel, device, step=probe_step),
                              len(train_set.samples))
        LOGGER.info("--batch_size -1: %s -> batch size %d", "80% of GPU memory" if device.type == "cuda" else "no GPU", args.batch_size)
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay, args.momentum)
    ema = EMA(model, args.ema_decay) if args.ema else None  # before any hooks are placed on the model
    swa = SWA(model, int(args.swa_start * args.epoch)) if args.swa else None
    objective: Any = Supervised(criterion)
    distiller = None
    if args.rdrop:
        objective = RDrop(criterion, args.rdrop_alpha)
    if args.kd:
        teacher, teacher_ckpt = load_teacher(args.teacher_path, class_names, args.image_channel, device)
        distiller = Distiller(criterion, model, teacher, args.kd_method, args.kd_ratio, args.image_channel,
                              (mean, std), (teacher_ckpt["mean"], teacher_ckpt["std"]), args.kd_temperature).to(device)
        objective = distiller
        learnable = [p for p in distiller.method.parameters() if p.requires_grad]
        if learnable:  # MGD's generation layers train with the student
            optimizer.add_param_group({"params": learnable, "weight_decay": args.weight_decay})
        print(f"distillation: {args.kd_method} from {teacher_ckpt['model_name']} ({args.teacher_path}), kd_ratio {args.kd_ratio}", flush=True)
    freezer = HeadFreezer(model, args.freeze) if args.freeze else None
    batch_mix = BatchMix(args.mixup, num_classes) if args.mixup != "none" else None
    schedule = EpochLR(optimizer, args.lr, args.epoch, args.warmup, args.warmup_ratios, args.warmup_minlr,
                       args.lr_scheduler, args.lr_scheduler_params)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start_epoch, start_step = 0, 0
    best_value, best_epoch, since_best = None, 0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        if swa is not None and ckpt.get("swa"):
            swa.load_state_dict(ckpt["swa"])
        if distiller is not None and ckpt.get("distill"):
            distiller.method.load_state_dict(ckpt["distill"])
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
        best_value, best_epoch, since_best = ckpt["best"]["value"], ckpt["best"]["epoch"], ckpt["best"]["since"]
        truncate_train_log(run / "train.log", start_epoch)
        print(f"resuming {run.path} at epoch {start_epoch + 1}" + (f", step {start_step}" if start_step else ""), flush=True)

    normalize = Normalize(mean, std).to(device)
    pin = device.type == "cuda"
    train_sampler = EpochSampler(len(train_set.samples), shuffle=True, seed=args.random_seed)
    train_loader = build_loader(ImageDataset(train_set.samples, train_transform(args.image_size, args.resize_mode, augment),
                                             args.image_channel, seed=args.random_seed),
                                args.batch_size, train_sampler, args.workers, pin,
                                drop_last=len(train_set.samples) % args.batch_size == 1 or (batch_mix is not None and len(train_set.samples) > args.batch_size))
    val_transform = tta_transform(spec) if args.test_tta else eval_transform(spec)
    val_loader = None
    if val_set is not None:
        val_loader = build_loader(ImageDataset(val_set.samples, val_transform, args.image_channel),
                                  args.batch_size, EpochSampler(len(val_set.samples), shuffle=False), args.workers, pin)

    # ---- what every checkpoint says about the model
    options = args_to_dict(args)
    options["save_path"] = str(run.path)
    meta = {
        "format": FORMAT, "model_name": args.model_name, "num_classes": num_classes, "class_names": class_names,
        "image_size": args.image_size, "image_channel": args.image_channel, "mean": list(mean), "std": list(std),
        "preprocess": spec, "args": options,
    }
    run.write_yaml("args.yaml", options | {"mean": list(mean), "std": list(std)})
    run.write_lines("label.txt", class_names)

    def save_last(epoch: int, step: int, sums: EpochSums | None, extra: dict[str, float] | None = None) -> None:
        run.save("last.pt", meta | {
            "kind": "last", "model": float_state_dict(model), "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "ema": ema.state_dict() if ema else None, "swa": swa.state_dict() if swa else None,
            "distill": {k: v.detach().cpu() for k, v in distiller.method.state_dict().items()} if distiller else None,
            "train_extra": extra if extra else None,
            "rng": rng_state(), "epoch": epoch, "step": step, "train_sums": sums.state_dict() if sums else None,
            "best": {"metric": args.metrice, "value": best_value, "epoch": best_epoch, "since": since_best},
        })

    tb = run.tensorboard()
    failed: list[tuple[str, str]] = []
    plot_count = int(args.plot_train_batch_count)

    def draw_batch(step: int, images: torch.Tensor, targets: torch.Tensor) -> None:
        if step >= plot_count:
            return
        pixels = (images.detach().float().cpu() * normalize.std.cpu() + normalize.mean.cpu()).clamp(0, 255).to(torch.uint8)
        if targets.ndim == 1:
            labels = [class_names[t] for t in targets.tolist()]
        else:  # mixed targets: the two classes with their shares
            top = targets.detach().float().cpu().topk(min(2, num_classes), dim=1)
            labels = [" ".join(f"{class_names[i]}:{v:.2f}" for v, i in zip(vals.tolist(), idx.tolist()) if v > 0.005)
                      for vals, idx in zip(top.values, top.indices)]
        run.savefig(plot_batch(pixels, labels, f"train batch {step}"), f"train_batch{step}.png")

    print(f"training {args.model_name} on {device} ({len(train_set.samples)} train images, {num_classes} classes, "
          f"batch {args.batch_size}, {args.epoch} epochs)", flush=True)
    last_val_loss = None
    result: dict[str, Any] = {}
    log_fields = TRAIN_LOG_FIELDS + (["kd_loss"] if args.kd else [])

    def scored_model() -> torch.nn.Module:
        """What validation scores and best.pt holds: the EMA weights with --ema."""
        return ema.module if ema is not None else model

    with StopFlag() as stop:
        for epoch in range(start_epoch, args.epoch):
            mid_epoch = epoch == start_epoch and start_step > 0
            lr = schedule.current() if mid_epoch else schedule.start_epoch(epoch, last_val_loss)
            frozen = freezer.start_epoch(epoch) if freezer else False
            train_sampler.set_epoch(epoch, skip=start_step * args.batch_size if mid_epoch else 0)
            sums, extra = EpochSums(num_classes), {}
            if mid_epoch and ckpt.get("train_sums"):
                sums.load_state_dict(ckpt["train_sums"])
                extra = dict(ckpt.get("train_extra") or {})
            t0 = time.time()
            try:
                train = train_one_epoch(model, objective, optimizer, train_loader, device, epoch, normalize, sums,
                                        scaler, amp_dtype, start_step=start_step if mid_epoch else 0, should_stop=stop,
                                        on_batch=draw_batch if epoch == 0 else None, failed=failed,
                                        batch_transform=batch_mix, accumulate=args.accumulate, clip_grad=args.clip_grad,
                                        ema=ema, train_mode=freezer.train_mode if freezer else None, extra_sums=extra)
            except NonFiniteLoss as err:
                raise UserError(f"training stopped: {err}; lower --lr (now {args.lr}) or drop --amp. "
                                f"The checkpoints in {run.path} are from the last good epoch and were not touched") from None
            if train["interrupted"]:
                save_last(epoch, int(train["steps"]), sums, extra)
                print(f"stopped at epoch {epoch + 1}, step {int(train['steps'])}: saved {run / 'last.pt'}; "
                      f"continue with: python main.py --save_path {run.path} --resume", flush=True)
                raise KeyboardInterrupt
            report_skipped(failed, "images that failed to decode (left out of training)")
            failed.clear()
            if swa is not None:
                swa.end_epoch(model, epoch)
            val = evaluate(scored_model(), criterion, val_loader, device, num_classes, normalize, amp_dtype, failed=failed) if val_loader else None
            report_skipped(failed, "val images that failed to decode")
            failed.clear()
            seconds = time.time() - t0
            last_val_loss = val["loss"] if val else None

            chosen = (val or train)[args.metrice]
            improved = metric_improved(args.metrice, chosen, best_value)
            if improved:
                best_value, best_epoch, since_best = chosen, epoch + 1, 0
                run.save("best.pt", meta | {"kind": "best", "model": half_state_dict(scored_model()), "epoch": epoch + 1,
                                            "metrics": {"train": train, "val": val}, "ema": ema is not None,
                                            "best": {"metric": args.metrice, "value": chosen}})
            else:
                since_best += 1
            save_last(epoch + 1, 0, None)

            row = {"epoch": epoch + 1, "lr": lr, "loss": train["loss"], "acc": train["acc"], "mean_acc": train["mean_acc"],
                   "test_loss": val["loss"] if val else None, "test_acc": val["acc"] if val else None,
                   "test_mean_acc": val["mean_acc"] if val else None, "kd_loss": train.get("kd_loss")}
            run.append_csv("train.log", row, log_fields)
            if tb is not None:
                for key, value in row.items():
                    if key != "epoch" and value is not None:
                        tb.add_scalar(key if key.startswith("test_") or key in ("lr", "kd_loss") else f"train_{key}", value, epoch + 1)
            for name, fig in plot_curves(read_train_log(run / "train.log")).items():
                run.savefig(fig, name)
            rows = [["train", train["loss"], train["acc"], train["mean_acc"]]]
            if val:
                rows.append(["val" + (" (EMA)" if ema else ""), val["loss"], val["acc"], val["mean_acc"]])
            notes = ("  head only" if frozen else "") + (f"  kd_loss {train['kd_loss']:.4f}" if "kd_loss" in train else "")
            print_summary(f"epoch {epoch + 1}/{args.epoch}  lr {lr:.3g}  {seconds:.1f}s{notes}"
                          + ("  * best" if improved else ""), rows, ["split", "loss", "acc", "mean_acc"])
            if stop():
                print(f"stopped after epoch {epoch + 1}: saved {run / 'last.pt'}; "
                      f"continue with: python main.py --save_path {run.path} --resume", flush=True)
                raise KeyboardInterrupt
            if args.patience and since_best >= args.patience:
                print(f"early stop: no improvement of val {args.metrice} for {args.patience} epochs "
                      f"(best {best_value:.4f} at epoch {best_epoch})", flush=True)
                break
    if swa is not None:
        best_value = finish_swa(swa, run, meta, train_loader, train_sampler, val_loader, criterion, device, num_classes,
                                normalize, amp_dtype, args, best_value)
    run.close()
    result.update(best_epoch=best_epoch, best_metric=args.metrice, best_value=best_value)
    print(f"best.pt: epoch {best_epoch}, {'val' if val_set else 'train'} {args.metrice} {best_value:.4f}", flush=True)

    # ---- the test split, with best.pt's weights
    if args.test_path and Path(args.test_path).exists():
        test_set = scan_split(args.test_path, class_names=class_names, what="test set")
        report_skipped(test_set.skipped, f"test set {args.test_path}")
        best = load_checkpoint(run / "best.pt")
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in best["model"].items()})
        loader = build_loader(ImageDataset(test_set.samples, val_transform, args.image_channel), args.batch_size,
                              EpochSampler(len(test_set.samples), shuffle=False), 0, pin)
        test = evaluate(model, criterion, loader, device, num_classes, normalize, amp_dtype, desc="test")
        result["test"] = test
        print(f"test ({len(test_set.samples)} images, best.pt): acc {test['acc']:.4f}, mean_acc {test['mean_acc']:.4f}, "
              f"loss {test['loss']:.4f}", flush=True)
    print(f"done: {run.path}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
