"""main.py's training recipes as flags (augmentation, mixing, TTA, EMA/SWA, R-Drop, accumulation,
freezing, distillation), and the checks of every
main.py option's value, refused at start with one line each: the values, then the paths and the
model name (check_inputs), all before PyTorch loads and the data is scanned. Light: argparse,
utils.core and the torch-free split test of utils.data.sources only, so `main.py --help` and a mistake answer at once.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from utils.core.config import finite_float
from utils.core.distributed import launched_by_torchrun
from utils.core.log import UserError
from utils.core.names import AUGMENT_CHOICES, KD_METHODS, MIXUP_CHOICES, unknown_model_name
from utils.core.options import Options
from utils.core.schema import MAX_IMAGE_SIZE, RESIZE_MODES


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """The training recipes: augmentation, mixing, TTA, EMA/SWA, R-Drop, accumulation, freezing, distillation."""
    p = parser.add_argument
    p("--augment", "--Augment", dest="Augment", default="none", choices=list(AUGMENT_CHOICES), help="torchvision augmentation policy (the config's custom_augment replaces it)")
    p("--resize_mode", default="crop", choices=list(RESIZE_MODES), help="crop: short side + crop; letterbox: pad to square; squash: ignore aspect")
    p("--mixup", default="none", choices=list(MIXUP_CHOICES), help="mix pairs of images in a batch, after the other augmentations")
    p("--test_tta", action="store_true", help="validate with TenCrop test-time augmentation")
    p("--sync_bn", action="store_true", help="under torchrun: batch-norm statistics over all processes (CUDA)")
    p("--ema", action="store_true", help="keep an exponential moving average of the weights; validate and save it")
    p("--ema_decay", type=finite_float, default=0.9998, help="EMA decay (warmed up from 0)")
    p("--rdrop", action="store_true", help="R-Drop: two forward passes with a KL consistency term")
    p("--rdrop_alpha", type=finite_float, default=0.3, help="weight of R-Drop's KL term")
    p("--accumulate", type=int, default=1, help="optimizer step every N batches (gradient accumulation)")
    p("--freeze", type=int, default=0, help="train only the classifier head for the first N epochs (-1: always)")
    p("--clip_grad", type=finite_float, default=0.0, help="clip the gradient norm to this value (0 = off)")
    p("--swa", action="store_true", help="stochastic weight averaging over the last epochs (saved as swa.pt)")
    p("--swa_start", type=finite_float, default=0.75, help="fraction of the epochs after which SWA averaging starts")
    p("--kd", action="store_true", help="knowledge distillation from --teacher_path")
    p("--teacher_path", default="", help="run folder (or best.pt) of the teacher")
    p("--kd_method", default="SoftTarget", choices=list(KD_METHODS), help="distillation loss")
    p("--kd_ratio", type=finite_float, default=0.7, help="weight of the distillation loss")
    p("--kd_temperature", type=finite_float, default=4.0, help="SoftTarget temperature")


def check_inputs(args: argparse.Namespace) -> None:
    """The training split, --weight, the teacher and --model_name, checked before PyTorch loads (a
    resumed run's own are checked when it is read).

    Raises:
        UserError: a path that does not exist, naming its flag; an unknown model name.
    """
    if args.resume:
        return
    from utils.data.sources import split_exists  # noqa: PLC0415 - the scanners load only once the flags are read

    paths = [("train_path", "the training images (split a dataset with processing.py, or pass --data ROOT)"),
             ("weight", "a state_dict or checkpoint file"), ("teacher_path", "the teacher's run folder or best.pt")]
    for flag, what in paths:
        value = getattr(args, flag)
        if value and not (split_exists(value) if flag == "train_path" else Path(value).exists()):
            raise UserError(f"--{flag} {value}: not found; pass {what}")
    problem = unknown_model_name(args.model_name)
    if problem is not None:
        raise UserError(problem)


def add_lr_find_flags(parser: argparse.ArgumentParser) -> None:
    """The range of main.py --lr_find (utils.train.lr_find)."""
    p = parser.add_argument
    p("--lr_find_steps", type=int, default=100, help="--lr_find: optimizer updates of the range test")
    p("--lr_find_start", type=finite_float, default=1e-7, help="--lr_find: the lr of the first update")
    p("--lr_find_end", type=finite_float, default=10.0, help="--lr_find: the lr of the last update (rising exponentially)")


def check_values(args: argparse.Namespace) -> None:
    """Refuse the option values that cannot work, one line each (after the config and command line)."""
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise UserError(f"--layer_decay must be in (0, 1], got {args.layer_decay}")
    for name in ("image_size", "epoch"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be a positive number, got {getattr(args, name)}")
    if args.image_size > MAX_IMAGE_SIZE:
        raise UserError(f"--image_size must be at most {MAX_IMAGE_SIZE} pixels, got {args.image_size}")
    if args.batch_size == 0 or args.batch_size < -1:
        raise UserError(f"--batch_size must be positive (or -1 for automatic), got {args.batch_size}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    if args.shard_buffer < 0:
        raise UserError(f"--shard_buffer must be 0 or more images, got {args.shard_buffer}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if not 0 < args.reject_tpr <= 1:
        raise UserError(f"--reject_tpr must be a share in (0, 1], got {args.reject_tpr}")
    if not 0 <= args.warmup_ratios < 1:
        raise UserError(f"--warmup_ratios must be in [0, 1), got {args.warmup_ratios}")
    if args.kfold < 0 or args.kfold == 1:
        raise UserError(f"--kfold must be 2 or more (the number of folds; 0 = off), got {args.kfold}")
    if args.save_period < 1:
        raise UserError(f"--save_period must be 1 or more (last.pt every N epochs), got {args.save_period}")
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
    if not 0 < args.class_balance_beta < 1:
        raise UserError(f"--class_balance_beta must be in (0, 1), got {args.class_balance_beta}")
    if args.lr_find_steps < 5:
        raise UserError(f"--lr_find_steps must be 5 or more (a curve to read), got {args.lr_find_steps}")
    if not 0 < args.lr_find_start < args.lr_find_end:
        raise UserError(f"--lr_find_start and --lr_find_end must satisfy 0 < start < end, got {args.lr_find_start:g} "
                        f"and {args.lr_find_end:g}")
    check_combinations(args)


def check_combinations(args: argparse.Namespace | Options) -> None:
    """Refuse at start the combinations that cannot work (not after an epoch)."""
    if args.kd and args.rdrop:
        raise UserError("--kd and --rdrop cannot be combined: both replace the training objective; choose one")
    if args.swa and args.ema:
        raise UserError("--swa and --ema both average the weights: choose one")
    if args.teacher_path and not args.kd:
        raise UserError("--teacher_path is only used with --kd: add --kd, or drop --teacher_path")
    if getattr(args, "lr_find", False):
        check_lr_find(args)


def check_lr_find(args: argparse.Namespace | Options) -> None:
    """What --lr_find cannot be combined with: a range test trains a fresh model once, in one process."""
    if args.resume:
        raise UserError("--lr_find tests learning rates on a fresh model and saves none: it cannot --resume a run; "
                        "drop --resume")
    if args.kfold:
        raise UserError("--lr_find runs on the whole training set, not per fold: drop --kfold (its lr suits each fold)")
    if launched_by_torchrun():
        raise UserError("--lr_find runs in one process: start it with python main.py, not torchrun (pass --batch_size "
                        "N*B to test the batch N processes of B images make)")
